//! The RESP server: worker threads, each with its own single-threaded runtime and its
//! own `SO_REUSEPORT` listener (the kernel spreads connections; a connection never
//! crosses threads, so no request pays a wakeup of another thread), sharing the
//! sharded keyspace. One task per connection parses requests from the read buffer as
//! they complete (pipelining: every complete request is answered before the next read,
//! in order, in one write); a task on the first worker expires keys in the background.
//!
//! A client that stops reading its replies stops being read (the write waits), so it
//! holds at most one batch of replies and its unread requests: it costs memory for
//! itself, never for others. A protocol error is answered and the connection closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cmd::{self, Flow, Node, Session};
use crate::config::CacheConfig;
use crate::db::Keyspace;
use crate::resp::{self, Reply};

/// Replies buffered before they are written even with requests still queued.
const FLUSH_BYTES: usize = 64 * 1024;

/// A running cache node's state (shared by its connections).
pub struct Cache {
    node: Node,
    cfg: CacheConfig,
    clients: AtomicUsize,
    next_id: AtomicU64,
}

impl Cache {
    /// A cache with `cfg`, serving on `port` (for `INFO`).
    pub fn new(cfg: CacheConfig, port: u16) -> Arc<Cache> {
        let shards = cfg
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 4);
        Arc::new(Cache {
            node: Node {
                keyspace: Keyspace::new(shards),
                password: cfg.password.clone(),
                commands: Default::default(),
                hits: Default::default(),
                misses: Default::default(),
                connections: AtomicU64::new(0),
                started_ms: cmd::now_ms(),
                port,
                settings: vec![
                    ("maxclients", cfg.max_clients.to_string()),
                    ("databases", crate::db::DATABASES.to_string()),
                    ("proto-max-bulk-len", cfg.limits.max_bulk_bytes.to_string()),
                    (
                        "client-query-buffer-limit",
                        cfg.max_query_buffer_bytes.to_string(),
                    ),
                    ("port", port.to_string()),
                    ("save", String::new()),
                    ("appendonly", "no".into()),
                    ("maxmemory", cfg.maxmemory.to_string()),
                    ("maxmemory-policy", cfg.policy.name().into()),
                    ("maxmemory-samples", cfg.samples.to_string()),
                    ("timeout", "0".into()),
                ],
                pubsub: crate::pubsub::PubSub::default(),
                maxmemory: (cfg.maxmemory, cfg.policy, cfg.samples.max(1)),
                exec_lock: Default::default(),
                clients: crate::clients::Clients::default(),
                slowlog: crate::clients::SlowLog::new(
                    cfg.slowlog_slower_than_us,
                    cfg.slowlog_max_len,
                ),
                ops_per_sec: AtomicU64::new(0),
            },
            cfg,
            clients: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    /// The data and counters.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Runs one command as the node itself (database 0, authenticated, never
    /// blocking), as a client would.
    pub fn query(&self, args: &[&[u8]]) -> Reply {
        let args: Vec<bytes::Bytes> = args
            .iter()
            .map(|a| bytes::Bytes::copy_from_slice(a))
            .collect();
        let mut s = Session::new(0, true);
        cmd::execute(&self.node, &mut s, &args).0
    }

    /// What the console shows: memory, keys, hits, throughput, clients, evictions,
    /// the newest slow commands and the SDK caches' reported counters.
    pub fn stats(&self, slow: usize) -> Stats {
        let n = &self.node;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let dbs = n
            .keyspace
            .dbs()
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let (mut keys, mut expires) = (0, 0);
                for sh in d.lock_all() {
                    keys += sh.len();
                    expires += sh.expiring();
                }
                (keys > 0).then_some(DbStats {
                    db: i,
                    keys,
                    expires,
                })
            })
            .collect();
        let t = n.keyspace.totals();
        Stats {
            port: n.port,
            uptime_s: cmd::now_ms().saturating_sub(n.started_ms) / 1000,
            used_bytes: n.keyspace.used_bytes() as u64,
            maxmemory: n.maxmemory.0 as u64,
            policy: n.maxmemory.1.name().to_owned(),
            dbs,
            hits: n.hits.get(),
            misses: n.misses.get(),
            commands: n.commands.get(),
            ops_per_sec: r(&n.ops_per_sec),
            clients: self.clients(),
            max_clients: self.cfg.max_clients,
            connections: r(&n.connections),
            expired: r(&t.expired),
            evicted: r(&t.evicted),
            slowlog_len: n.slowlog.len(),
            slowlog_slower_than_us: n.slowlog.slower_than_us(),
            slowlog: n.slowlog.newest(Some(slow)),
            sdk: self.sdk_stats(),
        }
    }

    /// The counters SDK caches reported into this node (`meshwork:caches` and each
    /// name's `meshwork:cache:{name}:stats` hash), for the first [`SDK_SHOWN`]
    /// names in byte order.
    fn sdk_stats(&self) -> Vec<SdkStats> {
        let mut names: Vec<bytes::Bytes> = match self.query(&[b"SMEMBERS", b"meshwork:caches"]) {
            Reply::Set(v) | Reply::Array(v) => v
                .into_iter()
                .filter_map(|r| match r {
                    Reply::Bulk(b) => Some(b),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        // Any client may add names: the first ones only, so a flood of them costs
        // the console page a bounded amount of work.
        names.sort();
        names.truncate(SDK_SHOWN);
        names
            .into_iter()
            .map(|name| {
                let key = [b"meshwork:cache:", &name[..], b":stats"].concat();
                let mut s = SdkStats {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    ..SdkStats::default()
                };
                let fields = match self.query(&[b"HGETALL", &key]) {
                    Reply::Map(v) | Reply::Pairs(v) => v,
                    _ => Vec::new(),
                };
                for (f, v) in fields {
                    let (Reply::Bulk(f), Reply::Bulk(v)) = (f, v) else {
                        continue;
                    };
                    let v: u64 = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    match &f[..] {
                        b"l1_hits" => s.l1_hits = v,
                        b"l2_hits" => s.l2_hits = v,
                        b"misses" => s.misses = v,
                        b"rejected" => s.rejected = v,
                        b"loads" => s.loads = v,
                        b"l2_errors" => s.l2_errors = v,
                        b"reported_ms" => s.reported_ms = v,
                        _ => {}
                    }
                }
                s
            })
            .collect()
    }

    /// Loads the snapshot, when one is configured (see [`crate::snapshot`]).
    fn restore(&self) {
        let Some(path) = &self.cfg.snapshot else {
            return;
        };
        match crate::snapshot::load(&self.node.keyspace, path, cmd::now_ms()) {
            Ok(n) => tracing::info!(keys = n, path = %path.display(), "cache snapshot loaded"),
            Err(e) => tracing::error!(error = %e, "cache snapshot not loaded; starting empty"),
        }
    }

    /// Writes the snapshot, when one is configured.
    fn persist(&self) {
        let Some(path) = &self.cfg.snapshot else {
            return;
        };
        match crate::snapshot::save(&self.node.keyspace, path, cmd::now_ms()) {
            Ok(n) => tracing::info!(keys = n, path = %path.display(), "cache snapshot written"),
            Err(e) => tracing::error!(error = %e, "cache snapshot not written"),
        }
    }
}

/// SDK caches [`Cache::stats`] reports at most.
pub const SDK_SHOWN: usize = 100;

/// One database's keys.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DbStats {
    /// Its number (0 to 15).
    pub db: usize,
    /// Keys held (expired ones not yet removed included, as Redis counts them).
    pub keys: usize,
    /// Of which with a time to live.
    pub expires: usize,
}

/// One SDK cache's counters, summed over every process that reported.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SdkStats {
    /// The cache's name (`mw.cache(name)`).
    pub name: String,
    /// Reads answered by a process's L1.
    pub l1_hits: u64,
    /// Reads answered by L2.
    pub l2_hits: u64,
    /// Reads that found nothing in either level.
    pub misses: u64,
    /// Reads the Bloom filter answered "absent".
    pub rejected: u64,
    /// Loader runs.
    pub loads: u64,
    /// L2 commands that failed.
    pub l2_errors: u64,
    /// The last report (ms since the epoch).
    pub reported_ms: u64,
}

/// A cache node's figures (see [`Cache::stats`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    /// The RESP port.
    pub port: u16,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Approximate bytes of data held.
    pub used_bytes: u64,
    /// `maxmemory` (0: no limit).
    pub maxmemory: u64,
    /// `maxmemory-policy`.
    pub policy: String,
    /// The databases that hold keys.
    pub dbs: Vec<DbStats>,
    /// Reads that found their key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Commands processed.
    pub commands: u64,
    /// Commands per second, lately.
    pub ops_per_sec: u64,
    /// Connected clients.
    pub clients: usize,
    /// `maxclients`.
    pub max_clients: usize,
    /// Connections accepted since start.
    pub connections: u64,
    /// Keys removed because their time ran out.
    pub expired: u64,
    /// Keys evicted under `maxmemory`.
    pub evicted: u64,
    /// Slow-log entries held.
    pub slowlog_len: usize,
    /// The slow log's threshold in µs (negative: off).
    pub slowlog_slower_than_us: i64,
    /// The newest slow commands.
    pub slowlog: Vec<crate::clients::SlowEntry>,
    /// SDK caches' counters reported into this node.
    pub sdk: Vec<SdkStats>,
}

/// Running cache workers; dropping them stops them (without waiting).
pub struct Workers {
    /// The bound address (port 0 resolved).
    pub addr: std::net::SocketAddr,
    cache: Arc<Cache>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// The cache they serve.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Stops accepting, closes every connection and waits for the threads; then
    /// writes the snapshot when one is configured.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.cache.persist();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn reuseport_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Serves RESP on `addr` (port 0 picks a free one) with `workers` threads (default:
/// one per CPU).
pub fn spawn_workers(
    addr: std::net::SocketAddr,
    cfg: CacheConfig,
    workers: Option<usize>,
) -> std::io::Result<Workers> {
    spawn_workers_tls(addr, cfg, workers, None)
}

/// [`spawn_workers`], speaking TLS with `tls` when given (what `redis-cli
/// --tls` and Redis 6+ clients speak): every client handshakes first, within
/// [`TLS_HANDSHAKE`].
pub fn spawn_workers_tls(
    addr: std::net::SocketAddr,
    cfg: CacheConfig,
    workers: Option<usize>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Workers> {
    let n = workers
        .or(cfg.workers)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let first = reuseport_listener(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(reuseport_listener(addr)?);
    }
    let cache = Cache::new(cfg, addr.port());
    cache.restore();
    let (stop, stop_rx) = watch::channel(false);
    let mut threads = Vec::with_capacity(n);
    for (i, l) in listeners.into_iter().enumerate() {
        let (cache, stop_rx, tls) = (cache.clone(), stop_rx.clone(), tls.clone());
        let t = std::thread::Builder::new()
            .name(format!("cache-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cache worker: no runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cache worker: listener");
                            return;
                        }
                    };
                    serve(listener, cache, stop_rx, i, tls).await;
                });
            })?;
        threads.push(t);
    }
    tracing::info!(%addr, workers = n, "cache listening");
    Ok(Workers {
        addr,
        cache,
        stop,
        threads,
    })
}

/// Serves RESP on `listener` as worker `worker` until `stop` changes (the first
/// worker also expires keys in the background).
async fn serve(
    listener: TcpListener,
    cache: Arc<Cache>,
    mut stop: watch::Receiver<bool>,
    worker: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slot = worker % (crate::stripe::SLOTS - 1);
    let expirer = (worker == 0).then(|| tokio::spawn(expire_loop(cache.clone(), stop.clone())));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: the listener stays; try again shortly.
                tracing::warn!(error = %e, "cache: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let c = cache.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &c, stop, slot, tls).await {
                tracing::debug!(%peer, error = %e, "cache: connection ended");
            }
        });
    }
    if let Some(e) = expirer {
        e.abort();
    }
}

/// Removes expired keys in the background: every 100 ms, a bounded amount per shard,
/// again at once while a pass found its full budget due (Redis' active expiry, in
/// expiry order rather than by sampling).
async fn expire_loop(cache: Arc<Cache>, mut stop: watch::Receiver<bool>) {
    let budget = cache.cfg.active_expire_budget;
    let mut tick = 0u64;
    // Commands per 100 ms over the last 16 ticks (Redis' instantaneous_ops_per_sec).
    let mut ops = [0u64; 16];
    let mut last = (std::time::Instant::now(), cache.node.commands.get());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
        let now = (std::time::Instant::now(), cache.node.commands.get());
        let ms = now.0.duration_since(last.0).as_millis().max(1) as u64;
        ops[(tick % 16) as usize] = now.1.saturating_sub(last.1) * 1000 / ms;
        last = now;
        cache
            .node
            .ops_per_sec
            .store(ops.iter().sum::<u64>() / 16, Ordering::Relaxed);
        tick += 1;
        if tick % 10 == 1 {
            export_gauges(&cache);
        }
        // Bounded passes, yielding between them, so a mass expiry never stalls clients.
        for _ in 0..10 {
            let n = cache.node.keyspace.expire_cycle(cmd::now_ms(), budget);
            if n < budget {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Sets the cache's Prometheus gauges (every second, from the expiry task).
fn export_gauges(cache: &Cache) {
    let node = &cache.node;
    let keys: usize = node.keyspace.dbs().iter().map(crate::db::Db::len).sum();
    metrics::gauge!("meshwork_cache_keys").set(keys as f64);
    metrics::gauge!("meshwork_cache_used_bytes").set(node.keyspace.used_bytes() as f64);
    metrics::gauge!("meshwork_cache_maxmemory_bytes").set(node.maxmemory.0 as f64);
    metrics::gauge!("meshwork_cache_clients").set(cache.clients() as f64);
    metrics::counter!("meshwork_cache_commands_total").absolute(node.commands.get());
    metrics::counter!("meshwork_cache_keyspace_hits_total").absolute(node.hits.get());
    metrics::counter!("meshwork_cache_keyspace_misses_total").absolute(node.misses.get());
}

/// Releases a client slot when the connection ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Longest a client may take to complete a TLS handshake.
pub const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

async fn connection(
    stream: TcpStream,
    cache: &Cache,
    stop: watch::Receiver<bool>,
    slot: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let n = cache.clients.fetch_add(1, Ordering::Relaxed);
    // Freed before the connection closes (below), so that a client that saw
    // its connection end may connect again at once.
    let guard = Slot(&cache.clients);
    let full = n >= cache.cfg.max_clients;
    let addr =
        |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    let who = (
        addr(stream.peer_addr()),
        addr(stream.local_addr()),
        i64::from(std::os::fd::AsRawFd::as_raw_fd(&stream)),
    );
    match tls {
        None => {
            let mut stream = stream;
            let r = client(&mut stream, cache, stop, slot, full, who).await;
            drop(guard);
            r
        }
        Some(acceptor) => {
            let mut stream = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            let r = client(&mut stream, cache, stop, slot, full, who).await;
            drop(guard);
            r
        }
    }
}

/// Serves one client on its (plain or TLS) stream; `full`: only says so.
async fn client<S>(
    stream: &mut S,
    cache: &Cache,
    mut stop: watch::Receiver<bool>,
    slot: usize,
    full: bool,
    (peer, local, fd): (String, String, i64),
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + PeerClosed,
{
    if full {
        stream
            .write_all(b"-ERR max number of clients reached\r\n")
            .await?;
        return Ok(());
    }
    cache.node.connections.fetch_add(1, Ordering::Relaxed);
    let mut session = Session::new(
        cache.next_id.fetch_add(1, Ordering::Relaxed),
        cache.node.password.is_none(),
    );
    session.worker = slot;
    let meta = Arc::new(crate::clients::ClientMeta::new(
        session.id,
        peer,
        local,
        fd,
        cmd::now_ms(),
    ));
    cache.node.clients.add(meta.clone());
    session.meta = Some(meta);
    let r = requests(stream, cache, &mut session, &mut stop).await;
    cache.node.clients.remove(session.id);
    session.unwatch(&cache.node);
    // Whatever ended it, its subscriptions go.
    if let Some(mut s) = session.sub.take() {
        cache.node.pubsub.forget(&mut s);
    }
    r
}

/// The next message for a subscriber; never, for a connection without subscriptions.
async fn next_message(
    sub: &mut Option<crate::pubsub::Subscriber>,
) -> Option<crate::pubsub::Message> {
    match sub {
        Some(s) => s.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves one connection's requests (and its subscriptions' messages).
async fn requests<S>(
    stream: &mut S,
    cache: &Cache,
    session: &mut Session,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + PeerClosed,
{
    let limits = cache.cfg.limits;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // One clock read per command: each command's time runs from the end of the
        // previous one (its parsing included); the wall clock once per batch.
        let now = cmd::now_ms();
        let mut mark = std::time::Instant::now();
        loop {
            match resp::parse(&mut buf, &limits) {
                Ok(Some(args)) if args.is_empty() => {}
                Ok(Some(args)) => {
                    let (reply, flow) = cmd::execute(&cache.node, session, &args);
                    let done = std::time::Instant::now();
                    let micros = done.duration_since(mark).as_micros() as u64;
                    mark = done;
                    if let Some(m) = &session.meta {
                        m.after(session, now);
                    }
                    cache
                        .node
                        .slowlog
                        .observe(micros, &args, session.meta.as_deref(), now);
                    reply.write(session.proto, &mut out);
                    match flow {
                        Flow::Continue => {}
                        Flow::Close => {
                            stream.write_all(&out).await?;
                            return Ok(());
                        }
                        Flow::Block {
                            keys,
                            left,
                            deadline_ms,
                        } => {
                            // What came before is answered first; then wait.
                            stream.write_all(&out).await?;
                            out.clear();
                            let reply = blocked_pop(
                                stream,
                                &mut buf,
                                cache,
                                session,
                                &keys,
                                left,
                                deadline_ms,
                                stop,
                            )
                            .await?;
                            let Some(reply) = reply else { return Ok(()) };
                            reply.write(session.proto, &mut out);
                            mark = std::time::Instant::now();
                        }
                    }
                    if out.len() >= FLUSH_BYTES {
                        stream.write_all(&out).await?;
                        out.clear();
                        mark = std::time::Instant::now();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Reply::Error(e.0.clone()).write(session.proto, &mut out);
                    stream.write_all(&out).await?;
                    tracing::debug!(error = %e.0, "cache: protocol error; connection closed");
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > 1024 * 1024 {
                out.shrink_to(16 * 1024);
            }
        }
        if buf.len() > cache.cfg.max_query_buffer_bytes {
            return Ok(());
        }
        if session
            .sub
            .as_ref()
            .is_some_and(|s| s.handle.cut.load(Ordering::Acquire))
        {
            // Its messages overflowed while it was not reading.
            return Ok(());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            r = stream.read_buf(&mut buf) => {
                if r? == 0 {
                    return Ok(());
                }
            }
            m = next_message(&mut session.sub) => {
                let Some(m) = m else { return Ok(()) };
                let Some(s) = session.sub.as_mut() else { return Ok(()) };
                s.handle.queued.fetch_sub(m.size(), Ordering::AcqRel);
                m.reply().write(session.proto, &mut out);
                // What else is queued goes in the same write.
                while out.len() < FLUSH_BYTES {
                    match s.rx.try_recv() {
                        Ok(m) => {
                            s.handle.queued.fetch_sub(m.size(), Ordering::AcqRel);
                            m.reply().write(session.proto, &mut out);
                        }
                        Err(_) => break,
                    }
                }
                // A subscriber that does not read is cut off even mid-write.
                let handle = s.handle.clone();
                tokio::select! {
                    r = stream.write_all(&out) => r?,
                    _ = handle.cut_signal.notified() => return Ok(()),
                }
                out.clear();
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Whether the peer of a connection has closed it, asked of the kernel
/// without waiting or consuming anything (a `MSG_PEEK` read of one byte on
/// the non-blocking socket: 0 bytes is its close).
pub(crate) trait PeerClosed {
    /// True when nothing is left to read but the peer's close.
    fn peer_closed(&self) -> bool;
}

impl PeerClosed for tokio::net::TcpStream {
    fn peer_closed(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(self).peek(&mut byte), Ok(0))
    }
}

impl<S: PeerClosed> PeerClosed for tokio_rustls::server::TlsStream<S> {
    fn peer_closed(&self) -> bool {
        self.get_ref().0.peer_closed()
    }
}

/// Counts a connection waiting in BLPOP/BRPOP while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits in BLPOP/BRPOP until one of `keys` has an element (the answer), the deadline
/// passes (a null array), or the connection ends (`None`). Requests the client sends
/// meanwhile are kept for after, as Redis does.
#[allow(clippy::too_many_arguments)]
async fn blocked_pop<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    cache: &Cache,
    session: &Session,
    keys: &[bytes::Bytes],
    left: bool,
    deadline_ms: Option<u64>,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<Option<Reply>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + PeerClosed,
{
    let Some(db) = cache.node.keyspace.db(session.db) else {
        return Ok(Some(Reply::NilArray));
    };
    db.blocked.fetch_add(1, Ordering::AcqRel);
    let _waiting = Waiting(&db.blocked);
    loop {
        let pushed = db.next_push();
        tokio::pin!(pushed);
        pushed.as_mut().enable();
        // Before taking an element, ask the kernel (not the runtime's cached
        // readiness, which may not have seen the close yet) whether the
        // client has gone: one whose BLPOP arrived with its close, or that
        // closed while we were woken, must not take an element with it.
        if stream.peer_closed() {
            return Ok(None);
        }
        let now = cmd::now_ms();
        match crate::types::pop_first(db, keys, left, now) {
            Ok(Some((k, v))) => {
                return Ok(Some(Reply::Array(vec![Reply::Bulk(k), Reply::Bulk(v)])));
            }
            Err(e) => return Ok(Some(e)),
            Ok(None) => {}
        }
        let left_ms = match deadline_ms {
            Some(d) if d <= now => return Ok(Some(Reply::NilArray)),
            Some(d) => Some(d - now),
            None => None,
        };
        let timer = async {
            match left_ms {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => std::future::pending().await,
            }
        };
        // The socket first: a client already gone must not take an element with it.
        tokio::select! {
            biased;
            r = stream.read_buf(buf) => {
                if r? == 0 {
                    return Ok(None);
                }
                if buf.len() > cache.cfg.max_query_buffer_bytes {
                    return Ok(None);
                }
            }
            _ = stop.changed() => return Ok(None),
            _ = pushed => {}
            _ = timer => {}
        }
    }
}

/// `(P)SUBSCRIBE` and `(P)UNSUBSCRIBE`: one confirmation per channel or pattern, each
/// with the connection's subscription count after it.
pub(crate) fn subscriptions(
    node: &cmd::Node,
    s: &mut Session,
    name: &str,
    targets: &[bytes::Bytes],
) -> Reply {
    let id = s.id;
    let sub = s
        .sub
        .get_or_insert_with(|| crate::pubsub::Subscriber::new(id));
    let ps = &node.pubsub;
    let kind = name.to_ascii_lowercase();
    let confirm = |kind: &str, target: Reply, count: usize| {
        Reply::Push(vec![
            Reply::bulk(kind.to_string()),
            target,
            Reply::Int(count as i64),
        ])
    };
    let mut out = Vec::new();
    match name {
        "SUBSCRIBE" | "PSUBSCRIBE" => {
            for t in targets {
                if name == "SUBSCRIBE" {
                    ps.subscribe(sub, t);
                } else {
                    ps.psubscribe(sub, t);
                }
                out.push(confirm(&kind, Reply::Bulk(t.clone()), sub.count()));
            }
        }
        _ => {
            let patterns = name == "PUNSUBSCRIBE";
            let all: Vec<bytes::Bytes> = if targets.is_empty() {
                if patterns {
                    sub.patterns.iter().cloned().collect()
                } else {
                    sub.channels.iter().cloned().collect()
                }
            } else {
                targets.to_vec()
            };
            if all.is_empty() {
                out.push(confirm(&kind, Reply::Nil, sub.count()));
            }
            for t in all {
                if patterns {
                    ps.punsubscribe(sub, &t);
                } else {
                    ps.unsubscribe(sub, &t);
                }
                out.push(confirm(&kind, Reply::Bulk(t), sub.count()));
            }
        }
    }
    Reply::Many(out)
}
