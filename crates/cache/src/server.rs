//! The RESP server: one task per connection, requests parsed from the read buffer as
//! they complete (pipelining: every complete request is answered before the next read,
//! in order, in one write), and a task that expires keys in the background.
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
                commands: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                started_ms: cmd::now_ms(),
                port,
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
}

/// Serves RESP on `listener` until `stop` changes.
pub async fn serve(listener: TcpListener, cache: Arc<Cache>, mut stop: watch::Receiver<bool>) {
    let expirer = tokio::spawn(expire_loop(cache.clone(), stop.clone()));
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
        let _ = stream.set_nodelay(true);
        let c = cache.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &c, stop).await {
                tracing::debug!(%peer, error = %e, "cache: connection ended");
            }
        });
    }
    expirer.abort();
}

/// Removes expired keys in the background: every 100 ms, a bounded amount per shard,
/// again at once while a pass found its full budget due (Redis' active expiry, in
/// expiry order rather than by sampling).
async fn expire_loop(cache: Arc<Cache>, mut stop: watch::Receiver<bool>) {
    let budget = cache.cfg.active_expire_budget;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
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

/// Releases a client slot when the connection ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    mut stream: TcpStream,
    cache: &Cache,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let n = cache.clients.fetch_add(1, Ordering::Relaxed);
    let _slot = Slot(&cache.clients);
    if n >= cache.cfg.max_clients {
        stream
            .write_all(b"-ERR max number of clients reached\r\n")
            .await?;
        return Ok(());
    }
    cache.node.connections.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        id: cache.next_id.fetch_add(1, Ordering::Relaxed),
        db: 0,
        proto: 2,
        name: None,
        authed: cache.node.password.is_none(),
    };
    let limits = cache.cfg.limits;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        loop {
            match resp::parse(&mut buf, &limits) {
                Ok(Some(args)) if args.is_empty() => {}
                Ok(Some(args)) => {
                    let (reply, flow) = cmd::execute(&cache.node, &mut session, &args);
                    reply.write(session.proto, &mut out);
                    if flow == Flow::Close {
                        stream.write_all(&out).await?;
                        return Ok(());
                    }
                    if out.len() >= FLUSH_BYTES {
                        stream.write_all(&out).await?;
                        out.clear();
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
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let read = tokio::select! {
            r = stream.read_buf(&mut buf) => r?,
            _ = stop.changed() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
    }
}
