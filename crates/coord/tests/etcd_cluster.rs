//! Coordination on a real 3-member etcd cluster (Debian's etcd-server, started here
//! on loopback): the shared suite, and a fault test that SIGKILLs the etcd member a
//! Meshwork node uses while registrations churn, config is published, a lock is
//! contended and a health check runs. Skips when etcd is not installed, fails under
//! `MESHWORK_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use futures_util::StreamExt;
use meshwork_coord::backend::{Backend, BackendOptions, LeaseKeeper, WatchItem, is_delete};
use meshwork_coord::config::{ClientIdentity, ConfigEntry, ConfigKey, Format, Listening, Publish};
use meshwork_coord::registry::model::{health_key, instance_key, service_prefix, settings_key};
use meshwork_coord::registry::{Filter, HealthStatus, InstanceSpec, ServiceSettings};
use meshwork_coord::{Coord, CoordError, CoordOptions, lock};
use parking_lot::Mutex;
use tokio::time::Instant;

use meshwork_testkit::etcd_cluster::{self as cluster, EtcdCluster};

macro_rules! on_cluster {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(c) = EtcdCluster::start(3).await else { return };
                suite::$name(c.client_urls()).await;
            }
        )*
    };
}

suite::for_each_suite_test!(on_cluster);

// ---------------------------------------------------------------------------------
// The fault test.

const CHURN: &str = "churn";
const CHECKED: &str = "checked";
const LOCK: &str = "fault-lock";
/// Instance slots per churning node.
const SLOTS: usize = 8;
/// Hard caps, so the workload is bounded by count as well as by time.
const MAX_CHURN_OPS: usize = 3000;
const MAX_PUBLISH_ROUNDS: u64 = 500;
/// Bound of each "this should happen soon" wait.
const SOON: Duration = Duration::from_secs(10);

fn backend_options() -> BackendOptions {
    BackendOptions {
        request_timeout: Duration::from_secs(2),
        retry_for: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(1),
        credentials: None,
        tls: None,
    }
}

async fn start_node(endpoints: &[String], name: &str) -> Coord {
    Coord::start(
        endpoints,
        CoordOptions {
            node_name: name.to_string(),
            node_ttl: 3,
            run_checks: true,
            backend: backend_options(),
            ..CoordOptions::default()
        },
    )
    .await
    .unwrap()
}

use meshwork_testkit::eventually;

fn now_ms() -> u64 {
    meshwork_coord::registry::model::now_ms()
}

/// Shared progress counters and phase flags.
#[derive(Default)]
struct Progress {
    /// Set when the etcd member is killed.
    killed: AtomicBool,
    /// Writers stop when set.
    stop: AtomicBool,
    churn_acks: [AtomicUsize; 2],
    churn_acks_after: [AtomicUsize; 2],
    publish_acks: AtomicUsize,
    publish_acks_after: AtomicUsize,
    lock_acqs: AtomicUsize,
    lock_acqs_after: AtomicUsize,
}

impl Progress {
    fn after(&self) -> bool {
        self.killed.load(SeqCst)
    }
    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
}

async fn grant_retry(backend: &Backend, ttl: i64, p: &Progress) -> Option<i64> {
    loop {
        match backend.grant(ttl).await {
            Ok(l) => return Some(l),
            Err(e) if p.stopped() => {
                eprintln!("grant failed at stop: {e}");
                return None;
            }
            Err(_) => continue,
        }
    }
}

// ---- (a) registration churn

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Registration acknowledged at `revision`, with this port and lease.
    Present {
        port: u16,
        lease: i64,
        revision: i64,
    },
    /// Deregistration acknowledged (or the instance was never registered).
    Absent,
    /// The last operation failed: its outcome is unknown.
    Unknown,
}

#[derive(Default)]
struct ChurnLog {
    slots: BTreeMap<String, Slot>,
    /// Every acknowledged registration: (id, revision).
    registrations: Vec<(String, i64)>,
    /// Deregistrations answered NotFound for an instance acknowledged present: the
    /// first attempt may have landed before a retry (checked against the history).
    not_found_deregs: Vec<(String, i64)>,
    deregistrations: usize,
    errors: Vec<String>,
    /// The session lease of the ephemeral instances (kept alive by `keeper`).
    lease: i64,
    keeper: Option<LeaseKeeper>,
}

fn churn_spec(id: &str, port: u16, ephemeral: bool) -> InstanceSpec {
    serde_json::from_value(serde_json::json!({
        "id": id, "address": "127.0.0.1", "port": port, "protocol": "tcp",
        "ephemeral": ephemeral, "ttl_seconds": 10, "tags": ["churn"], "version": "v1",
    }))
    .unwrap()
}

async fn churn(coord: Coord, who: usize, p: Arc<Progress>) -> ChurnLog {
    let mut log = ChurnLog::default();
    let Some(lease) = grant_retry(&coord.backend, 10, &p).await else {
        return log;
    };
    log.lease = lease;
    log.keeper = Some(coord.backend.keep_alive(lease, 10));
    let prefix = if who == 0 { "a" } else { "b" };
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for op in 0..MAX_CHURN_OPS {
        if p.stopped() {
            break;
        }
        pace.tick().await;
        let slot = op % SLOTS;
        let id = format!("{prefix}-{slot}");
        let ephemeral = slot % 2 == 1;
        let after = p.after();
        let cur = log.slots.get(&id).copied().unwrap_or(Slot::Absent);
        let acked = match cur {
            Slot::Present { revision, .. } => match coord.registry.deregister(CHURN, &id).await {
                Ok(()) => {
                    log.slots.insert(id, Slot::Absent);
                    log.deregistrations += 1;
                    true
                }
                Err(CoordError::NotFound(_)) => {
                    log.not_found_deregs.push((id.clone(), revision));
                    log.slots.insert(id, Slot::Absent);
                    false
                }
                Err(e) => {
                    log.errors.push(format!("deregister {id}: {e}"));
                    log.slots.insert(id, Slot::Unknown);
                    false
                }
            },
            Slot::Absent | Slot::Unknown => {
                let port = 10_000 + (op % 50_000) as u16;
                let spec = churn_spec(&id, port, ephemeral);
                match coord
                    .registry
                    .register(CHURN, spec, "fault-test", ephemeral.then_some(lease))
                    .await
                {
                    Ok(r) => {
                        log.registrations.push((id.clone(), r.revision));
                        log.slots.insert(
                            id,
                            Slot::Present {
                                port,
                                lease: r.lease,
                                revision: r.revision,
                            },
                        );
                        true
                    }
                    Err(e) => {
                        log.errors.push(format!("register {id}: {e}"));
                        log.slots.insert(id, Slot::Unknown);
                        false
                    }
                }
            }
        };
        if acked {
            p.churn_acks[who].fetch_add(1, SeqCst);
            if after {
                p.churn_acks_after[who].fetch_add(1, SeqCst);
            }
        }
    }
    log
}

// ---- (b) config publishing

#[derive(Default)]
struct PublishLog {
    /// Every acknowledged publish: (entry index, version, checksum, changed).
    acked: Vec<(usize, u64, String, bool)>,
    errors: Vec<String>,
}

fn config_keys() -> Vec<ConfigKey> {
    (0..3)
        .map(|i| ConfigKey::new("fault", "svc", &format!("entry-{i}.json")).unwrap())
        .collect()
}

async fn publisher(coord: Coord, p: Arc<Progress>) -> PublishLog {
    let keys = config_keys();
    let mut log = PublishLog::default();
    let mut pace = tokio::time::interval(Duration::from_millis(30));
    for n in 1..=MAX_PUBLISH_ROUNDS {
        if p.stopped() {
            break;
        }
        pace.tick().await;
        for (i, key) in keys.iter().enumerate() {
            let after = p.after();
            let publish = Publish {
                content: format!("{{\"entry\": {i}, \"round\": {n}}}"),
                format: Format::Json,
                author: "fault-test".into(),
                description: format!("round {n}"),
                if_version: None,
                secret: None,
            };
            match coord.config.publish(key, publish).await {
                Ok(r) => {
                    log.acked
                        .push((i, r.entry.version, r.entry.checksum, r.changed));
                    p.publish_acks.fetch_add(1, SeqCst);
                    if after {
                        p.publish_acks_after.fetch_add(1, SeqCst);
                    }
                }
                Err(e) => log.errors.push(format!("publish {key} round {n}: {e}")),
            }
        }
    }
    log
}

// ---- (c) lock contention

#[derive(Default)]
struct LockShared {
    /// Contender currently inside the critical section (0 = nobody).
    holder: AtomicUsize,
    /// Highest fencing token seen inside the critical section.
    last_token: AtomicI64,
    /// Every acquisition, in critical-section order: (token, contender).
    tokens: Mutex<Vec<(i64, usize)>>,
    violations: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
    leases_lost: AtomicUsize,
}

async fn contender(backend: Backend, me: usize, shared: Arc<LockShared>, p: Arc<Progress>) {
    'lease: while !p.stopped() {
        let Some(lease) = grant_retry(&backend, 10, &p).await else {
            return;
        };
        let keeper = backend.keep_alive(lease, 10);
        while !p.stopped() {
            let held = match lock::lock(
                &backend,
                LOCK,
                lease,
                &format!("contender-{me}"),
                Some(Duration::from_secs(8)),
            )
            .await
            {
                Ok(h) => h,
                Err(e) => {
                    shared.errors.lock().push(format!("lock by {me}: {e}"));
                    if matches!(e, CoordError::NotFound(_)) || keeper.is_lost() {
                        shared.leases_lost.fetch_add(1, SeqCst);
                        continue 'lease;
                    }
                    continue;
                }
            };
            let after = p.after();
            // The critical section.
            let prev = shared.holder.swap(me, SeqCst);
            if prev != 0 {
                shared.violations.lock().push(format!(
                    "contender {me} got the lock (token {}) while {prev} held it",
                    held.fencing_token
                ));
            }
            let last = shared.last_token.fetch_max(held.fencing_token, SeqCst);
            if held.fencing_token <= last {
                shared.violations.lock().push(format!(
                    "fencing token went {last} -> {} (contender {me})",
                    held.fencing_token
                ));
            }
            shared.tokens.lock().push((held.fencing_token, me));
            if keeper.is_lost() {
                shared.violations.lock().push(format!(
                    "contender {me} got the lock on an expired lease {lease:x}"
                ));
            }
            // Hold it for a moment of simulated work so that contenders overlap.
            tokio::time::sleep(Duration::from_millis(3)).await;
            if shared
                .holder
                .compare_exchange(me, 0, SeqCst, SeqCst)
                .is_err()
            {
                shared.violations.lock().push(format!(
                    "someone replaced contender {me} inside its critical section"
                ));
            }
            p.lock_acqs.fetch_add(1, SeqCst);
            if after {
                p.lock_acqs_after.fetch_add(1, SeqCst);
            }
            // Release; a retry after an unknown outcome answers false (already gone).
            let mut released = false;
            for _ in 0..3 {
                match lock::unlock(&backend, &held).await {
                    Ok(_) => {
                        released = true;
                        break;
                    }
                    Err(e) => shared.errors.lock().push(format!("unlock by {me}: {e}")),
                }
            }
            if !released {
                // Our key may still be queued: a new lease gives a fresh key.
                let _ = backend.revoke(lease).await;
                continue 'lease;
            }
        }
        drop(keeper);
        let _ = backend.revoke(lease).await;
    }
}

// ---- (d) the health-checked instance

/// A TCP endpoint the test takes down and brings back on the same port.
struct TcpTarget {
    port: u16,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl TcpTarget {
    async fn bind(port: u16) -> TcpTarget {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        TcpTarget {
            port,
            accept: Some(accept),
        }
    }

    /// Stops listening (the port refuses connections).
    async fn down(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn up(&mut self) {
        *self = TcpTarget::bind(self.port).await;
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
        }
    }
}

async fn health_record(backend: &Backend, id: &str) -> Option<HealthStatus> {
    let (kv, _) = backend.get(health_key(CHECKED, id)).await.ok()?;
    serde_json::from_slice(&kv?.value).ok()
}

// ---- (e) watchers on the second node

/// What the registry watch of the second node saw last: instance ids and index.
#[derive(Default)]
struct WatchSeen {
    latest: Option<(BTreeSet<String>, i64)>,
    updates: usize,
    updates_after_kill: usize,
    index_went_back: Vec<(i64, i64)>,
}

/// What the config long-poll listener of the second node holds.
#[derive(Default)]
struct ListenSeen {
    /// Checksum held per entry.
    held: HashMap<ConfigKey, String>,
    /// Versions observed per entry, in order.
    versions: HashMap<ConfigKey, Vec<u64>>,
    wakeups: usize,
    wakeups_after_kill: usize,
}

async fn listener(coord: Coord, seen: Arc<Mutex<ListenSeen>>, p: Arc<Progress>) {
    let keys = config_keys();
    loop {
        let items: Vec<Listening> = {
            let s = seen.lock();
            keys.iter()
                .map(|k| Listening {
                    key: k.clone(),
                    checksum: s.held.get(k).cloned().unwrap_or_default(),
                })
                .collect()
        };
        let changed = coord
            .config
            .listen(
                &items,
                &ClientIdentity::default(),
                Duration::from_millis(500),
            )
            .await;
        let mut s = seen.lock();
        for k in changed {
            let e = coord.config.get(&k);
            s.held.insert(
                k.clone(),
                e.as_ref().map(|e| e.checksum.clone()).unwrap_or_default(),
            );
            s.versions
                .entry(k)
                .or_default()
                .push(e.map(|e| e.version).unwrap_or(0));
            s.wakeups += 1;
            if p.after() {
                s.wakeups_after_kill += 1;
            }
        }
    }
}

/// The instance ids of `service` as stored, read directly from etcd.
async fn stored_instances(backend: &Backend, service: &str) -> BTreeMap<String, Vec<u8>> {
    let prefix = instance_key(service, "");
    let (kvs, _) = backend.get_prefix(prefix.clone(), 0).await.unwrap();
    kvs.into_iter()
        .map(|kv| {
            let k = String::from_utf8_lossy(&kv.key);
            (k.trim_start_matches(&prefix).to_string(), kv.value.to_vec())
        })
        .collect()
}

/// The current entry as stored, read directly from etcd.
async fn stored_entry(backend: &Backend, key: &ConfigKey) -> Option<ConfigEntry> {
    // Layout documented in meshwork_coord::config: /meshwork/config/live/items/{ns}/{group}/{id}
    let (kv, _) = backend
        .get(format!("/meshwork/config/live/items/{key}"))
        .await
        .unwrap();
    kv.map(|kv| serde_json::from_slice(&kv.value).unwrap())
}

/// Waits (bounded) for a worker task to finish.
async fn join<T>(h: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(25), h)
        .await
        .expect("worker stops in time")
        .unwrap()
}

/// Every event of `service`'s keys from revision 1 on: (revision, key, is_delete).
/// The test cluster never compacts, so this is the full history. Completeness: a
/// sentinel write (the service's settings) is made first, and events arrive in
/// revision order, so once the sentinel arrived everything before it has too.
async fn full_history(coord: &Coord, service: &str) -> Vec<(i64, String, bool)> {
    coord
        .registry
        .put_settings(service, &ServiceSettings::default())
        .await
        .unwrap();
    let sentinel = settings_key(service);
    let mut w = coord.backend.watch_prefix(service_prefix(service), 1);
    let mut out = Vec::new();
    tokio::time::timeout(SOON, async {
        loop {
            match w.next().await {
                Some(WatchItem::Events { events, .. }) => {
                    for e in &events {
                        let kv = e.kv.as_ref().unwrap();
                        let key = String::from_utf8_lossy(&kv.key).into_owned();
                        let done = key == sentinel && !is_delete(e);
                        out.push((kv.mod_revision, key, is_delete(e)));
                        if done {
                            return;
                        }
                    }
                }
                Some(WatchItem::Reset { compacted }) => {
                    panic!("history compacted at {compacted}")
                }
                None => panic!("history watch ended"),
            }
        }
    })
    .await
    .expect("the full history of the churn service arrives");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_killed_during_churn_publish_lock_and_checks() {
    let t0 = Instant::now();
    let Some(mut cluster) = EtcdCluster::start(3).await else {
        return;
    };
    let started_in = t0.elapsed();
    let urls = cluster.client_urls();
    // Node A uses the leader first (the member we kill), node B another member.
    let victim = cluster.leader().await;
    let order =
        |first: usize| -> Vec<String> { (0..3).map(|i| urls[(first + i) % 3].clone()).collect() };
    let a = start_node(&order(victim), "node-a").await;
    let b = start_node(&order(victim + 1), "node-b").await;
    eventually("both nodes see each other", SOON, || async {
        (a.membership.members().len() == 2 && b.membership.members().len() == 2).then_some(())
    })
    .await;

    // (d) A health-checked instance whose check node A owns.
    let id = (0..256)
        .map(|i| format!("hc-{i}"))
        .find(|id| {
            meshwork_coord::nodes::owner(
                ["node-a", "node-b"].into_iter(),
                &format!("{CHECKED}/{id}"),
            ) == Some("node-a")
        })
        .unwrap();
    let mut target = TcpTarget::bind(cluster::free_port()).await;
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "id": id, "address": "127.0.0.1", "port": target.port, "protocol": "tcp",
        "ephemeral": false,
        "check": {"type": "tcp", "interval_ms": 150, "timeout_ms": 100,
                  "healthy_threshold": 1, "unhealthy_threshold": 1},
    }))
    .unwrap();
    a.registry
        .register(CHECKED, spec, "fault-test", None)
        .await
        .unwrap();
    eventually(
        "node a reports the checked instance healthy",
        SOON,
        || async {
            health_record(&b.backend, &id)
                .await
                .filter(|h| h.healthy && h.checker == "node-a")
        },
    )
    .await;

    // (e) Watchers on node B.
    let p = Arc::new(Progress::default());
    let watch_seen = Arc::new(Mutex::new(WatchSeen::default()));
    let watch_task = {
        let mut stream = Box::pin(b.registry.watch(CHURN, Filter::default()));
        let (seen, p) = (watch_seen.clone(), p.clone());
        tokio::spawn(async move {
            while let Some(d) = stream.next().await {
                let ids: BTreeSet<String> = d
                    .instances
                    .iter()
                    .map(|v| v.instance.spec.id.clone())
                    .collect();
                let mut s = seen.lock();
                if let Some((_, prev)) = &s.latest
                    && d.index < *prev
                {
                    let prev = *prev;
                    s.index_went_back.push((prev, d.index));
                }
                s.latest = Some((ids, d.index));
                s.updates += 1;
                if p.after() {
                    s.updates_after_kill += 1;
                }
            }
        })
    };
    let listen_seen = Arc::new(Mutex::new(ListenSeen::default()));
    let listen_task = tokio::spawn(listener(b.clone(), listen_seen.clone(), p.clone()));

    // (a), (b), (c) The writers.
    let churn_a = tokio::spawn(churn(a.clone(), 0, p.clone()));
    let churn_b = tokio::spawn(churn(b.clone(), 1, p.clone()));
    let publish = tokio::spawn(publisher(a.clone(), p.clone()));
    let lock_shared = Arc::new(LockShared::default());
    let contenders: Vec<_> = (1..=4)
        .map(|me| {
            let backend = if me % 2 == 1 { &a } else { &b }.backend.clone();
            tokio::spawn(contender(backend, me, lock_shared.clone(), p.clone()))
        })
        .collect();

    eventually(
        "progress before the kill",
        Duration::from_secs(15),
        || async {
            (p.churn_acks[0].load(SeqCst) >= 40
                && p.churn_acks[1].load(SeqCst) >= 40
                && p.publish_acks.load(SeqCst) >= 30
                && p.lock_acqs.load(SeqCst) >= 10)
                .then_some(())
        },
    )
    .await;

    // Kill the member node A is connected to (the leader).
    let kill_ms = now_ms();
    let killed_at = Instant::now();
    p.killed.store(true, SeqCst);
    cluster.kill(victim);
    let new_leader = cluster.leader().await;
    let new_leader_in = killed_at.elapsed();
    assert_ne!(new_leader, victim);

    // Health checks keep running on node A after its failover: take the target down
    // and up again, and see the stored status follow.
    eventually("node a keeps working after the kill", SOON, || async {
        (p.churn_acks_after[0].load(SeqCst) >= 1).then_some(())
    })
    .await;
    let first_ack_after_kill = killed_at.elapsed();
    target.down().await;
    let down_ms = now_ms();
    let h = eventually("the checked instance turns unhealthy", SOON, || async {
        health_record(&b.backend, &id)
            .await
            .filter(|h| !h.healthy && h.checked_at_ms >= down_ms)
    })
    .await;
    assert!(h.checked_at_ms >= kill_ms);
    eventually("node b's discovery sees it failing", SOON, || async {
        let d = b.registry.discover(CHECKED, &Filter::default());
        (d.instances.len() == 1 && d.instances[0].health == "failing").then_some(())
    })
    .await;
    target.up().await;
    let up_ms = now_ms();
    let h = eventually("the checked instance turns healthy again", SOON, || async {
        health_record(&b.backend, &id)
            .await
            .filter(|h| h.healthy && h.since_ms >= up_ms)
    })
    .await;
    let checker_after = h.checker.clone();
    eventually("node b's discovery sees it passing", SOON, || async {
        let d = b.registry.discover(
            CHECKED,
            &Filter {
                healthy: true,
                ..Filter::default()
            },
        );
        (d.instances.len() == 1 && d.instances[0].health == "passing").then_some(())
    })
    .await;

    eventually(
        "progress after the kill",
        Duration::from_secs(20),
        || async {
            (p.churn_acks_after[0].load(SeqCst) >= 80
                && p.churn_acks_after[1].load(SeqCst) >= 80
                && p.publish_acks_after.load(SeqCst) >= 60
                && p.lock_acqs_after.load(SeqCst) >= 20)
                .then_some(())
        },
    )
    .await;

    // Stop the writers (bounded: a call retries for at most 10 s).
    p.stop.store(true, SeqCst);
    let churn_a = join(churn_a).await;
    let churn_b = join(churn_b).await;
    let publish = join(publish).await;
    for c in contenders {
        join(c).await;
    }
    let workload_for = killed_at.elapsed();

    // Nothing acknowledged is lost: the final registry state.
    let stored = stored_instances(&b.backend, CHURN).await;
    let mut unknown = 0;
    for log in [&churn_a, &churn_b] {
        assert!(
            !log.keeper.as_ref().unwrap().is_lost(),
            "the session lease of the ephemeral instances expired"
        );
        for (id, slot) in &log.slots {
            match slot {
                Slot::Present { port, lease, .. } => {
                    let v = stored
                        .get(id)
                        .unwrap_or_else(|| panic!("acknowledged registration of {id} is lost"));
                    let inst: meshwork_coord::registry::Instance =
                        serde_json::from_slice(v).unwrap();
                    assert_eq!((inst.spec.port, inst.lease), (*port, *lease), "{id}");
                }
                Slot::Absent => assert!(
                    !stored.contains_key(id),
                    "acknowledged deregistration of {id} is undone"
                ),
                Slot::Unknown => unknown += 1,
            }
        }
    }
    // Every acknowledged registration is in etcd's history at its revision, and every
    // NotFound deregistration follows a real delete of that registration.
    let history = full_history(&b, CHURN).await;
    let puts: BTreeSet<(i64, String)> = history
        .iter()
        .filter(|e| !e.2)
        .map(|e| (e.0, e.1.clone()))
        .collect();
    for log in [&churn_a, &churn_b] {
        for (id, rev) in &log.registrations {
            assert!(
                puts.contains(&(*rev, instance_key(CHURN, id))),
                "acknowledged registration of {id} at revision {rev} is not in etcd's history"
            );
        }
        for (id, rev) in &log.not_found_deregs {
            let key = instance_key(CHURN, id);
            assert!(
                history.iter().any(|e| e.2 && e.1 == key && e.0 > *rev),
                "{id} (registered at {rev}) vanished without a delete in etcd's history"
            );
        }
    }

    // Every acknowledged config version is in the history with its checksum.
    let keys = config_keys();
    for (i, key) in keys.iter().enumerate() {
        let hist: BTreeMap<u64, String> = a
            .config
            .history(key, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.entry.version, v.entry.checksum))
            .collect();
        let mut last = 0;
        for (_, version, sum, _) in publish.acked.iter().filter(|x| x.0 == i) {
            assert_eq!(
                hist.get(version),
                Some(sum),
                "acknowledged version {version} of {key} is missing or differs in its history"
            );
            assert!(
                *version > last,
                "{key}: acknowledged versions went {last} -> {version}"
            );
            last = *version;
        }
        let cur = stored_entry(&a.backend, key).await.unwrap();
        assert!(cur.version >= last);
        assert_eq!(hist.get(&cur.version), Some(&cur.checksum));
    }

    // Watchers, long-polls and both nodes' local copies converge to the stored state.
    let direct: BTreeSet<String> = stored.keys().cloned().collect();
    eventually("registry watch and caches converge", SOON, || async {
        let watched = watch_seen.lock().latest.as_ref().map(|l| l.0.clone());
        let ids = |c: &Coord| -> BTreeSet<String> {
            c.registry
                .discover(CHURN, &Filter::default())
                .instances
                .iter()
                .map(|v| v.instance.spec.id.clone())
                .collect()
        };
        (watched.as_ref() == Some(&direct) && ids(&a) == direct && ids(&b) == direct).then_some(())
    })
    .await;
    let mut direct_entries = HashMap::new();
    for k in &keys {
        direct_entries.insert(k.clone(), stored_entry(&b.backend, k).await.unwrap());
    }
    eventually("config long-poll and caches converge", SOON, || async {
        let s = listen_seen.lock();
        keys.iter()
            .all(|k| {
                let d = &direct_entries[k];
                s.held.get(k) == Some(&d.checksum)
                    && a.config.get(k).as_ref() == Some(d)
                    && b.config.get(k).as_ref() == Some(d)
            })
            .then_some(())
    })
    .await;
    watch_task.abort();
    listen_task.abort();
    let (watch_updates, watch_after, went_back) = {
        let s = watch_seen.lock();
        (s.updates, s.updates_after_kill, s.index_went_back.clone())
    };
    assert!(
        went_back.is_empty(),
        "registry watch index went back: {went_back:?}"
    );
    assert!(
        watch_after > 0,
        "the registry watch saw nothing after the kill"
    );
    let (wakeups, wakeups_after) = {
        let s = listen_seen.lock();
        for (k, v) in &s.versions {
            assert!(
                v.windows(2).all(|w| w[0] <= w[1]),
                "long-poll saw {k} go back in version: {v:?}"
            );
        }
        (s.wakeups, s.wakeups_after_kill)
    };
    assert!(
        wakeups_after > 0,
        "the long-poll saw nothing after the kill"
    );

    // The lock: never two holders, fencing tokens strictly increasing.
    let violations = lock_shared.violations.lock().clone();
    assert!(violations.is_empty(), "lock violations: {violations:#?}");
    let tokens = lock_shared.tokens.lock().clone();
    assert!(
        tokens.windows(2).all(|w| w[0].0 < w[1].0),
        "tokens not increasing: {tokens:?}"
    );

    // Both nodes are still members (their sessions survived, or were re-established).
    eventually("both nodes still members", SOON, || async {
        (a.membership.members().len() == 2 && b.membership.members().len() == 2).then_some(())
    })
    .await;

    let lock_errors = lock_shared.errors.lock().len();
    eprintln!(
        "etcd fault test: cluster up in {started_in:?}; killed member m{victim} (leader), \
         new leader m{new_leader} seen after {new_leader_in:?}; node A's first acknowledged \
         registration after the kill at {first_ack_after_kill:?}; workload ran {workload_for:?} after the kill\n\
         churn: A {} acks ({} after kill, {} errors, {} NotFound deregs), B {} acks ({} after kill, \
         {} errors), {unknown} slots left unknown, {} instances stored\n\
         config: {} publishes acknowledged ({} after kill, {} errors); long-poll wakeups {wakeups} \
         ({wakeups_after} after kill); registry watch updates {watch_updates} ({watch_after} after kill)\n\
         lock: {} acquisitions ({} after kill), {lock_errors} errors, {} leases lost, no overlap, \
         tokens increasing; health: unhealthy and healthy again after the kill, checked by {checker_after}\n\
         total {:?}",
        p.churn_acks[0].load(SeqCst),
        p.churn_acks_after[0].load(SeqCst),
        churn_a.errors.len(),
        churn_a.not_found_deregs.len(),
        p.churn_acks[1].load(SeqCst),
        p.churn_acks_after[1].load(SeqCst),
        churn_b.errors.len(),
        stored.len(),
        publish.acked.len(),
        p.publish_acks_after.load(SeqCst),
        publish.errors.len(),
        tokens.len(),
        p.lock_acqs_after.load(SeqCst),
        lock_shared.leases_lost.load(SeqCst),
        t0.elapsed(),
    );
    for e in churn_a
        .errors
        .iter()
        .chain(&churn_b.errors)
        .chain(&publish.errors)
        .take(10)
    {
        eprintln!("  error: {e}");
    }
    drop(a);
    drop(b);
    drop(cluster);
}
