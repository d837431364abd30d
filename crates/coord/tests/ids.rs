//! The ID generator against a real Meshwork etcd server: worker ids claimed
//! uniquely through leases, a clear error when all are taken, and a worker taken
//! over after its lease ended issuing only ids above everything its previous
//! holder issued.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshwork_coord::CoordError;
use meshwork_coord::backend::{Backend, BackendOptions};
use meshwork_coord::ids::{
    IdGenerator, IdLayout, IdOptions, SystemClock, WORKERS_PREFIX, claim_worker, hwm_key,
    worker_key,
};

struct Server {
    backend: Backend,
    _store: meshwork_testkit::store::Embedded,
}

async fn start() -> Server {
    let store = meshwork_testkit::store::embedded().await;
    let backend = Backend::connect(
        std::slice::from_ref(&store.endpoint),
        BackendOptions::default(),
    )
    .await
    .unwrap();
    Server {
        backend,
        _store: store,
    }
}

fn one_bit() -> IdLayout {
    IdLayout {
        worker_bits: 1,
        ..IdLayout::default()
    }
}

fn fast() -> IdOptions {
    IdOptions {
        reserve: Duration::from_millis(1000),
        ..IdOptions::default()
    }
}

async fn generator(b: &Backend, layout: &IdLayout, lease: i64, node: &str) -> IdGenerator {
    let claim = claim_worker(b, layout, lease, node).await.unwrap();
    IdGenerator::start_claimed(b, claim, fast(), Arc::new(SystemClock::new()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_two_leases_get_different_workers_and_disjoint_ids() {
    let s = start().await;
    let layout = IdLayout::default();
    let (l1, l2) = (
        s.backend.grant(10).await.unwrap(),
        s.backend.grant(10).await.unwrap(),
    );
    // The same node name twice: the hash picks the same start, the scan moves on.
    let a = generator(&s.backend, &layout, l1, "node-1").await;
    let b = generator(&s.backend, &layout, l2, "node-1").await;
    assert_ne!(a.worker(), b.worker());
    assert_eq!(a.claim().lease(), l1);

    let (kvs, _) = s.backend.get_prefix(WORKERS_PREFIX, 0).await.unwrap();
    assert_eq!(kvs.len(), 2);
    let held: HashSet<i64> = kvs.iter().map(|kv| kv.lease).collect();
    assert_eq!(held, HashSet::from([l1, l2]));
    let rec: serde_json::Value = serde_json::from_slice(&kvs[0].value).unwrap();
    assert_eq!(rec["node"], "node-1");
    assert!(rec["claimed_at_ms"].as_u64().unwrap() > layout.epoch_ms);

    let mut all = HashSet::new();
    for g in [&a, &b] {
        let mut ids = g.next_batch(5000).unwrap();
        ids.push(g.next().unwrap());
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        for id in ids {
            let (ts, worker, _) = layout.decompose(id);
            assert_eq!(worker, g.worker());
            assert!(ts > g.claim().high_water_mark_ms());
            assert!(ts < g.reserved_until_ms());
            assert!(all.insert(id), "duplicate id {id}");
        }
    }
    // The reservation is stored (as the high-water mark) before it is used.
    let published = a.reserved_until_ms();
    let (hwm, _) = s.backend.get(hwm_key(a.worker())).await.unwrap();
    let hwm: u64 = std::str::from_utf8(&hwm.unwrap().value)
        .unwrap()
        .parse()
        .unwrap();
    assert!(hwm >= published, "{hwm} >= {published}");
    assert!(hwm > layout.epoch_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_third_claim_fails_clearly_when_all_workers_are_taken() {
    let s = start().await;
    let layout = one_bit();
    let l1 = s.backend.grant(10).await.unwrap();
    let l2 = s.backend.grant(10).await.unwrap();
    let l3 = s.backend.grant(10).await.unwrap();
    let a = claim_worker(&s.backend, &layout, l1, "a").await.unwrap();
    let b = claim_worker(&s.backend, &layout, l2, "b").await.unwrap();
    assert_ne!(a.worker(), b.worker());
    let e = claim_worker(&s.backend, &layout, l3, "c")
        .await
        .unwrap_err();
    assert!(matches!(e, CoordError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("all 2 worker ids"), "{e}");
    assert!(e.to_string().contains("more worker bits"), "{e}");
    // Bad arguments are refused before touching the store.
    assert!(matches!(
        claim_worker(&s.backend, &layout, 0, "c").await.unwrap_err(),
        CoordError::Invalid(_)
    ));
    assert!(matches!(
        claim_worker(&s.backend, &layout, l3, "").await.unwrap_err(),
        CoordError::Invalid(_)
    ));
    let bad = IdLayout {
        worker_bits: 20,
        ..IdLayout::default()
    };
    assert!(matches!(
        claim_worker(&s.backend, &bad, l3, "c").await.unwrap_err(),
        CoordError::Invalid(_)
    ));
    // Releasing one frees it for the third.
    let ga = IdGenerator::start_claimed(&s.backend, a, fast(), Arc::new(SystemClock::new()))
        .await
        .unwrap();
    let freed = ga.worker();
    ga.release().await.unwrap();
    let c = claim_worker(&s.backend, &layout, l3, "c").await.unwrap();
    assert_eq!(c.worker(), freed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_worker_taken_over_after_revoke_issues_only_greater_ids() {
    let s = start().await;
    let layout = one_bit();
    let l1 = s.backend.grant(30).await.unwrap();
    let l2 = s.backend.grant(30).await.unwrap();
    let a = generator(&s.backend, &layout, l1, "old").await;
    // The other worker id is busy, so the new claimer can only get `a`'s.
    let _other = claim_worker(&s.backend, &layout, l2, "busy").await.unwrap();
    let worker = a.worker();

    let mut issued = Vec::new();
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        issued.extend(a.next_batch(500).unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    s.backend.revoke(l1).await.unwrap();
    let (claim_kv, _) = s.backend.get(worker_key(worker)).await.unwrap();
    assert!(claim_kv.is_none(), "the claim key went with the lease");

    let l3 = s.backend.grant(30).await.unwrap();
    let claim = claim_worker(&s.backend, &layout, l3, "new").await.unwrap();
    assert_eq!(claim.worker(), worker);
    let hwm = claim.high_water_mark_ms();

    // The old holder may keep issuing until its reservation runs out (it cannot
    // renew any more): collect everything it manages to issue.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stop_err = loop {
        match a.next_batch(500) {
            Ok(ids) => issued.extend(ids),
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline, "old generator never stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        matches!(stop_err, CoordError::Unavailable(_)),
        "{stop_err:?}"
    );
    assert!(!issued.is_empty());
    let old_max = *issued.iter().max().unwrap();
    let (old_max_ts, ..) = layout.decompose(old_max);
    assert!(
        old_max_ts < hwm,
        "old ids {old_max_ts} stay below the mark {hwm}"
    );
    // It notices the lost claim at its next renewal.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.is_live() {
        assert!(Instant::now() < deadline, "lost claim not detected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.next().unwrap_err().to_string().contains("is gone"));

    // The new holder waits past the mark (at most `reserve` ahead) and goes on above.
    let b = IdGenerator::start_claimed(&s.backend, claim, fast(), Arc::new(SystemClock::new()))
        .await
        .unwrap();
    let first = b.next().unwrap();
    assert!(first > old_max, "{first} > {old_max}");
    let (ts, w, _) = layout.decompose(first);
    assert_eq!(w, worker);
    assert!(ts > hwm);
    let more = b.next_batch(10_000).unwrap();
    assert!(more[0] > first);
    let old: HashSet<i64> = issued.into_iter().collect();
    assert!(more.iter().all(|id| !old.contains(id)));

    // Caller-side invalidation stops it at once.
    b.invalidate();
    assert!(!b.is_live());
    let e = b.next().unwrap_err();
    assert!(e.to_string().contains("invalidated"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_mark_far_ahead_is_refused_and_the_claim_released() {
    let s = start().await;
    let layout = one_bit();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for w in 0..2 {
        s.backend
            .put(hwm_key(w), (now_ms + 60_000).to_string(), 0)
            .await
            .unwrap();
    }
    let l1 = s.backend.grant(10).await.unwrap();
    let claim = claim_worker(&s.backend, &layout, l1, "skewed")
        .await
        .unwrap();
    assert_eq!(claim.high_water_mark_ms(), now_ms + 60_000);
    let e = match IdGenerator::start_claimed(
        &s.backend,
        claim,
        IdOptions::default(),
        Arc::new(SystemClock::new()),
    )
    .await
    {
        Ok(_) => panic!("started on a clock a minute behind the mark"),
        Err(e) => e,
    };
    assert!(matches!(e, CoordError::ClockBackwards(_)), "{e:?}");
    assert!(e.to_string().contains("behind the high-water mark"), "{e}");
    let (kvs, _) = s.backend.get_prefix(WORKERS_PREFIX, 0).await.unwrap();
    assert!(kvs.is_empty(), "the refused claim was released");

    // A corrupt mark is reported as such.
    s.backend.put(hwm_key(0), "soon", 0).await.unwrap();
    s.backend.put(hwm_key(1), "soon", 0).await.unwrap();
    let e = claim_worker(&s.backend, &layout, l1, "x")
        .await
        .unwrap_err();
    assert!(matches!(e, CoordError::Corrupt { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_start_claims_and_generates_with_defaults() {
    let s = start().await;
    let lease = s.backend.grant(10).await.unwrap();
    let g = IdGenerator::start(&s.backend, IdLayout::default(), lease, "node-a")
        .await
        .unwrap();
    let ids = g.next_batch(10_000).unwrap();
    assert_eq!(ids.len(), 10_000);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(g.next_batch(10_001).is_err());
    assert!(g.next_batch(0).is_err());
    let (kv, _) = s.backend.get(worker_key(g.worker())).await.unwrap();
    assert_eq!(kv.unwrap().lease, lease);
}
