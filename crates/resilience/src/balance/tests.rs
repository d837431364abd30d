use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use tower::ServiceExt;

use super::*;
use crate::outlier::OutlierConfig;

fn pick_with(p: &mut dyn Picker, hash: u64, unavailable: &BTreeSet<u32>) -> Option<EndpointId> {
    let available = |id: EndpointId| !unavailable.contains(&id.0);
    let load = |id: EndpointId| f64::from(id.0 % 7);
    p.pick(&PickContext {
        request_hash: Some(hash),
        available: &available,
        load: &load,
    })
}

fn pickers() -> Vec<(&'static str, Box<dyn Picker>)> {
    vec![
        ("p2c", Box::new(P2c::default())),
        ("wrr", Box::new(SmoothWrr::default())),
        ("random", Box::new(RandomPicker::default())),
        ("ring", Box::new(Ring::new(20))),
        ("maglev", Box::new(Maglev::new(1009))),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, u32),
    Remove(u32),
    Eject(u32),
    Return(u32),
    Pick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..12, 1u32..5).prop_map(|(k, w)| Op::Insert(k, w)),
        (0u32..12).prop_map(Op::Remove),
        (0u32..12).prop_map(Op::Eject),
        (0u32..12).prop_map(Op::Return),
        any::<u64>().prop_map(Op::Pick),
        any::<u64>().prop_map(Op::Pick),
    ]
}

proptest! {
    /// No picker ever returns a removed or ejected endpoint, and each finds
    /// one whenever one is available.
    #[test]
    fn pickers_never_pick_removed_or_ejected(ops in proptest::collection::vec(op(), 1..120)) {
        for (name, mut p) in pickers() {
            let mut present = BTreeSet::new();
            let mut ejected = BTreeSet::new();
            for op in &ops {
                match *op {
                    Op::Insert(k, w) => { p.insert(EndpointId(k), mix(u64::from(k)), w); present.insert(k); }
                    Op::Remove(k) => { p.remove(EndpointId(k)); present.remove(&k); }
                    Op::Eject(k) => { ejected.insert(k); }
                    Op::Return(k) => { ejected.remove(&k); }
                    Op::Pick(h) => {
                        let got = pick_with(p.as_mut(), h, &ejected);
                        let live: Vec<_> = present.difference(&ejected).collect();
                        match got {
                            Some(id) => {
                                prop_assert!(present.contains(&id.0), "{name} picked removed {id:?}");
                                prop_assert!(!ejected.contains(&id.0), "{name} picked ejected {id:?}");
                            }
                            None => prop_assert!(live.is_empty(), "{name} found nothing among {live:?}"),
                        }
                    }
                }
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Removing one of n endpoints moves only (ring) or almost only (Maglev)
    /// the keys it owned, about 1/n of them; adding one moves keys only to
    /// the newcomer.
    #[test]
    fn consistent_hashing_moves_about_one_nth(n in 3u32..16, victim in any::<prop::sample::Index>(), seed in any::<u64>()) {
        const KEYS: u64 = 4000;
        let victim = victim.index(n as usize) as u32;
        let none = BTreeSet::new();
        for (name, make) in [
            ("ring", Box::new(|| Box::new(Ring::new(160)) as Box<dyn Picker>) as Box<dyn Fn() -> Box<dyn Picker>>),
            ("maglev", Box::new(|| Box::new(Maglev::new(DEFAULT_TABLE_SIZE)) as Box<dyn Picker>)),
        ] {
            let mut p = make();
            for k in 0..n { p.insert(EndpointId(k), mix(seed ^ u64::from(k)), 1); }
            let before: Vec<_> = (0..KEYS).map(|h| pick_with(p.as_mut(), mix(h), &none).unwrap()).collect();
            p.remove(EndpointId(victim));
            let after: Vec<_> = (0..KEYS).map(|h| pick_with(p.as_mut(), mix(h), &none).unwrap()).collect();
            let moved_others = before.iter().zip(&after).filter(|(b, a)| b != a && b.0 != victim).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let frac = moved as f64 / KEYS as f64;
            let ideal = 1.0 / f64::from(n);
            if name == "ring" {
                prop_assert_eq!(moved_others, 0, "ring moved keys of survivors");
            } else {
                prop_assert!((moved_others as f64) < 0.03 * KEYS as f64, "maglev moved {} keys of survivors", moved_others);
            }
            prop_assert!(frac > ideal * 0.4 && frac < ideal * 2.0 + 0.03, "{name}: moved {frac}, ideal {ideal}");
            // Add it back: only keys going to the newcomer move.
            p.insert(EndpointId(victim), mix(seed ^ u64::from(victim)), 1);
            let again: Vec<_> = (0..KEYS).map(|h| pick_with(p.as_mut(), mix(h), &none).unwrap()).collect();
            let wrong = after.iter().zip(&again).filter(|(a, g)| a != g && g.0 != victim).count();
            if name == "ring" {
                prop_assert_eq!(&again, &before, "ring is a function of the member set");
                prop_assert_eq!(wrong, 0);
            } else {
                prop_assert_eq!(&again, &before, "maglev table is a function of the member set");
            }
        }
    }
}

#[test]
fn smooth_wrr_follows_weights() {
    let mut w = SmoothWrr::default();
    for (k, weight) in [(0, 1), (1, 2), (2, 7)] {
        w.insert(EndpointId(k), 0, weight);
    }
    let none = BTreeSet::new();
    let mut counts = HashMap::new();
    for _ in 0..1000 {
        *counts
            .entry(pick_with(&mut w, 0, &none).unwrap().0)
            .or_insert(0) += 1;
    }
    assert_eq!((counts[&0], counts[&1], counts[&2]), (100, 200, 700));
}

#[test]
fn maglev_spreads_evenly_and_by_weight() {
    let mut m = Maglev::new(10_007);
    for k in 0..4 {
        m.insert(
            EndpointId(k),
            mix(u64::from(k) + 99),
            if k == 3 { 2 } else { 1 },
        );
    }
    let mut counts = [0u32; 4];
    for slot in m.slots() {
        counts[slot.0 as usize] += 1;
    }
    for c in &counts[..3] {
        assert!((1950..=2050).contains(c), "{counts:?}");
    }
    assert!((3950..=4050).contains(&counts[3]), "{counts:?}");
}

type BoxSvc = tower::util::BoxCloneSyncService<u64, u32, BoxError>;

fn endpoint(id: u32, fail: bool) -> BoxSvc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: u64| async move {
        if fail {
            Err::<u32, BoxError>("down".into())
        } else {
            Ok(id)
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn balance_follows_changes_and_ejects_outliers() {
    let (tx, changes) = channel();
    for id in 0..3 {
        tx.send(Change::Insert {
            key: id,
            service: endpoint(id, id == 2),
            weight: 1,
        })
        .unwrap();
    }
    let detector = Arc::new(Mutex::new(
        OutlierDetector::new(OutlierConfig {
            consecutive_failures: Some(2),
            success_rate: None,
            ..Default::default()
        })
        .unwrap(),
    ));
    let mut lb = Balance::new(changes, RandomPicker::default())
        .with_outlier_detection(detector.clone(), ErrorsAsFailures);
    let mut failures = 0;
    for _ in 0..200 {
        if lb.ready().await.unwrap().call(1).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "endpoint 2 ejected after two failures");
    assert!(detector.lock().is_ejected(&2, Instant::now()));
    tx.send(Change::Remove(0)).unwrap();
    for _ in 0..50 {
        assert_eq!(lb.ready().await.unwrap().call(1).await.unwrap(), 1);
    }
    tx.send(Change::Remove(1)).unwrap();
    let e = lb.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(
        !e.is::<NoEndpoint>(),
        "only the ejected one is left: panic mode sends to it rather than fail"
    );
}

#[tokio::test]
async fn a_preference_keeps_requests_in_their_lane_until_it_is_empty() {
    let (tx, changes) = channel();
    for id in 0..4 {
        tx.send(Change::Insert {
            key: id,
            service: endpoint(id, false),
            weight: 1,
        })
        .unwrap();
    }
    // Odd requests prefer odd endpoints, even requests even ones.
    let mut lb =
        Balance::new(changes, P2c::default()).with_preference(Arc::new(|req: &u64, key: &u32| {
            u64::from(*key) % 2 == req % 2
        }));
    for req in 0..100u64 {
        let served = lb.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(
            u64::from(served) % 2,
            req % 2,
            "request {req} left its lane"
        );
    }
    tx.send(Change::Remove(1)).unwrap();
    tx.send(Change::Remove(3)).unwrap();
    let served = lb.ready().await.unwrap().call(1).await.unwrap();
    assert_eq!(served % 2, 0, "an empty lane falls back to the others");
}

#[tokio::test]
async fn ring_balance_is_sticky_per_key() {
    let (tx, changes) = channel();
    for id in 0..5 {
        tx.send(Change::Insert {
            key: id,
            service: endpoint(id, false),
            weight: 1,
        })
        .unwrap();
    }
    let mut lb =
        Balance::new(changes, Ring::default()).with_request_hash(Arc::new(|x: &u64| mix(*x)));
    for key in 0..50u64 {
        let first = lb.ready().await.unwrap().call(key).await.unwrap();
        for _ in 0..3 {
            assert_eq!(lb.ready().await.unwrap().call(key).await.unwrap(), first);
        }
    }
}

#[derive(Debug, Clone)]
enum ServiceOp {
    Insert(u32),
    Weight(u32, u32),
    Remove(u32),
    Eject(u32),
    Call(u64),
}

fn service_op() -> impl Strategy<Value = ServiceOp> {
    prop_oneof![
        (0u32..8).prop_map(ServiceOp::Insert),
        (0u32..8, 0u32..4).prop_map(|(k, w)| ServiceOp::Weight(k, w)),
        (0u32..8).prop_map(ServiceOp::Remove),
        (0u32..8).prop_map(ServiceOp::Eject),
        any::<u64>().prop_map(ServiceOp::Call),
        any::<u64>().prop_map(ServiceOp::Call),
        any::<u64>().prop_map(ServiceOp::Call),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Through the real `Balance` service fed by a change stream: a request
    /// is never served by an endpoint that was removed or is ejected, and
    /// fails with `NoEndpoint` only when none is available.
    #[test]
    fn balance_service_never_routes_to_removed_or_ejected(ops in proptest::collection::vec(service_op(), 1..80), which in 0usize..5) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let (tx, changes) = channel();
            let detector = Arc::new(Mutex::new(
                OutlierDetector::new(OutlierConfig {
                    consecutive_failures: Some(1),
                    success_rate: None,
                    max_ejection_percent: 100,
                    panic_threshold_percent: 0,
                    ..Default::default()
                })
                .unwrap(),
            ));
            let picker: Box<dyn Picker> = pickers().remove(which).1;
            let mut lb = Balance::new(changes, picker)
                .with_request_hash(Arc::new(|x: &u64| mix(*x)))
                .with_outlier_detection(detector.clone(), ErrorsAsFailures);
            let mut present = BTreeSet::new();
            // Endpoints set to weight 0 (only weight-aware pickers skip them).
            let mut zero_weight = BTreeSet::new();
            for op in ops {
                match op {
                    ServiceOp::Insert(k) => {
                        tx.send(Change::Insert { key: k, service: endpoint(k, false), weight: 1 + k % 3 }).unwrap();
                        present.insert(k);
                        zero_weight.remove(&k);
                    }
                    ServiceOp::Weight(k, w) => {
                        tx.send(Change::Weight(k, w)).unwrap();
                        if w == 0 {
                            zero_weight.insert(k);
                        } else {
                            zero_weight.remove(&k);
                        }
                    }
                    ServiceOp::Remove(k) => {
                        tx.send(Change::Remove(k)).unwrap();
                        zero_weight.remove(&k);
                        present.remove(&k);
                    }
                    ServiceOp::Eject(k) => {
                        // Changes are applied on the next poll_ready; apply them first.
                        lb.ready().await.unwrap();
                        detector.lock().record(&k, false, Instant::now());
                    }
                    ServiceOp::Call(x) => {
                        let res = lb.ready().await.unwrap().call(x).await;
                        let now = Instant::now();
                        let live: Vec<u32> =
                            present.iter().copied().filter(|k| !detector.lock().is_ejected(k, now)).collect();
                        match res {
                            Ok(id) => {
                                prop_assert!(present.contains(&id), "served by removed {id}");
                                prop_assert!(!detector.lock().is_ejected(&id, now), "served by ejected {id}");
                                let weighted = which == 1 || which == 3 || which == 4;
                                prop_assert!(!(weighted && zero_weight.contains(&id)), "served by weight-0 {id}");
                            }
                            Err(e) => {
                                prop_assert!(e.is::<NoEndpoint>());
                                let weighted = which == 1 || which == 3 || which == 4; // wrr, ring, maglev
                                let usable: Vec<_> = live.iter().filter(|k| !(weighted && zero_weight.contains(*k))).collect();
                                prop_assert!(usable.is_empty(), "NoEndpoint with {usable:?} available");
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
}
