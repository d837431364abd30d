//! `meshwork kv` and `meshwork status`: a small, human-friendly etcd client.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_store::prefix_range_end;
use serde_json::json;
use tokio_stream::StreamExt;

/// Where to connect and how to print.
#[derive(Args, Clone)]
pub(crate) struct Conn {
    /// Comma-separated HOST:PORT list of etcd v3 endpoints.
    #[arg(
        long,
        env = "MESHWORK_ENDPOINTS",
        default_value = "127.0.0.1:2479",
        value_delimiter = ',',
        global = true
    )]
    pub(crate) endpoints: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Log in to a store with auth on as `USER:PASSWORD` (as etcdctl's `--user`).
    #[arg(
        long,
        env = "MESHWORK_STORE_USER",
        hide_env_values = true,
        global = true
    )]
    pub(crate) user: Option<String>,
    /// CA certificates to trust: talk TLS to the endpoints.
    #[arg(long, env = "MESHWORK_CACERT", global = true)]
    pub(crate) cacert: Option<std::path::PathBuf>,
    /// This client's certificate (mutual TLS).
    #[arg(
        long = "cert",
        env = "MESHWORK_CERT",
        global = true,
        requires = "tls_key"
    )]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// This client's key (mutual TLS).
    #[arg(
        long = "key",
        env = "MESHWORK_KEY",
        global = true,
        requires = "tls_cert"
    )]
    pub(crate) tls_key: Option<std::path::PathBuf>,
}

/// `meshwork kv`.
#[derive(Args)]
pub(crate) struct KvArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    op: KvOp,
}

#[derive(Subcommand)]
enum KvOp {
    /// Read a key (or every key with a prefix).
    Get {
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Read at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Most keys to return (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Attach to this lease (hex or decimal ID).
        #[arg(long)]
        lease: Option<String>,
    },
    /// Delete a key (or every key with a prefix).
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Print changes to a key (or prefix) as they happen.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (replays history).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Stop after this many events (0 = run until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

/// `meshwork status`.
#[derive(Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

/// The (key, range_end) pair for `key`, as etcd's clientv3 builds it: a prefix
/// of "" is every key, sent as `["\0", "\0")` because etcd (and Meshwork) refuse
/// an empty key with or without a range end.
fn range_of(key: &str, prefix: bool) -> (Vec<u8>, Vec<u8>) {
    match (prefix, key.is_empty()) {
        (true, true) => (vec![0], vec![0]),
        (true, false) => (key.as_bytes().to_vec(), prefix_range_end(key.as_bytes())),
        (false, _) => (key.as_bytes().to_vec(), Vec::new()),
    }
}

fn parse_lease(s: &str) -> Result<i64> {
    let t = s.trim_start_matches("0x");
    i64::from_str_radix(t, 16)
        .or_else(|_| s.parse::<i64>())
        .with_context(|| format!("lease {s:?}: expected a hex or decimal lease ID"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) async fn connect(conn: &Conn) -> Result<Client> {
    let tls = conn
        .cacert
        .clone()
        .map(|ca_file| meshwork_etcd::client::ClientTls {
            ca_file,
            cert_file: conn.tls_cert.clone(),
            key_file: conn.tls_key.clone(),
        });
    let c = Client::connect_with(&conn.endpoints, tls.as_ref()).await?;
    if let Some(u) = &conn.user {
        let creds = meshwork_etcd::client::Credentials::parse(u)
            .context("--user: expected USER:PASSWORD")?;
        c.authenticate(&creds).await.map_err(grpc)?;
    }
    Ok(c)
}

fn grpc(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub(crate) async fn run(a: KvArgs) -> Result<()> {
    let mut c = connect(&a.conn).await?;
    let json = a.conn.json;
    match a.op {
        KvOp::Get {
            key,
            prefix,
            rev,
            limit,
            keys_only,
        } => {
            let (key, range_end) = range_of(&key, prefix);
            let req = pb::RangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                revision: rev,
                limit,
                keys_only,
                ..Default::default()
            };
            let r = c.kv.range(req).await.map_err(grpc)?.into_inner();
            if json {
                let kvs: Vec<_> = r.kvs.iter().map(|kv| json!({"key": text(&kv.key), "value": text(&kv.value), "create_revision": kv.create_revision, "mod_revision": kv.mod_revision, "version": kv.version, "lease": kv.lease})).collect();
                println!(
                    "{}",
                    json!({"revision": r.header.map(|h| h.revision), "count": r.count, "more": r.more, "kvs": kvs})
                );
            } else {
                for kv in &r.kvs {
                    println!("{}", text(&kv.key));
                    if !keys_only {
                        println!("{}", text(&kv.value));
                    }
                }
            }
        }
        KvOp::Put { key, value, lease } => {
            let lease = lease.as_deref().map(parse_lease).transpose()?.unwrap_or(0);
            let r =
                c.kv.put(pb::PutRequest {
                    key: key.into(),
                    value: value.into(),
                    lease,
                    ..Default::default()
                })
                .await
                .map_err(grpc)?
                .into_inner();
            let rev = r.header.map(|h| h.revision).unwrap_or(0);
            if json {
                println!("{}", json!({"revision": rev}))
            } else {
                println!("OK (revision {rev})")
            }
        }
        KvOp::Del { key, prefix } => {
            let (key, range_end) = range_of(&key, prefix);
            let r =
                c.kv.delete_range(pb::DeleteRangeRequest {
                    key: key.into(),
                    range_end: range_end.into(),
                    prev_kv: false,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    json!({"deleted": r.deleted, "revision": r.header.map(|h| h.revision)})
                )
            } else {
                println!("{}", r.deleted)
            }
        }
        KvOp::Watch {
            key,
            prefix,
            rev,
            count,
        } => {
            let (key, range_end) = range_of(&key, prefix);
            let create = pb::WatchCreateRequest {
                key: key.into(),
                range_end: range_end.into(),
                start_revision: rev,
                ..Default::default()
            };
            let first = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(first).await.ok();
            let mut stream = c
                .watch
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(grpc)?
                .into_inner();
            let mut seen = 0u64;
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = tokio::signal::ctrl_c() => break,
                };
                let Some(msg) = msg else {
                    bail!("watch stream closed by the server")
                };
                let resp = msg.map_err(grpc)?;
                if resp.canceled {
                    bail!(
                        "watch cancelled: {} (compact revision {})",
                        resp.cancel_reason,
                        resp.compact_revision
                    );
                }
                for ev in resp.events {
                    let kind = if ev.r#type == 1 { "DELETE" } else { "PUT" };
                    let kv = ev.kv.unwrap_or_default();
                    if json {
                        println!(
                            "{}",
                            json!({"type": kind, "key": text(&kv.key), "value": text(&kv.value), "mod_revision": kv.mod_revision})
                        );
                    } else {
                        println!("{kind}\n{}\n{}", text(&kv.key), text(&kv.value));
                    }
                    seen += 1;
                    if count > 0 && seen >= count {
                        drop(tx);
                        return Ok(());
                    }
                }
            }
            drop(tx);
        }
    }
    Ok(())
}

pub(crate) async fn status(a: StatusArgs) -> Result<()> {
    let mut c = connect(&a.conn).await?;
    let s = c
        .maintenance
        .status(pb::StatusRequest {})
        .await
        .map_err(grpc)?
        .into_inner();
    let members = c
        .cluster
        .member_list(pb::MemberListRequest {
            linearizable: false,
        })
        .await
        .map_err(grpc)?
        .into_inner();
    let h = s.header.unwrap_or_default();
    if a.conn.json {
        println!(
            "{}",
            json!({"endpoints": a.conn.endpoints, "member_id": format!("{:x}", h.member_id), "cluster_id": format!("{:x}", h.cluster_id), "revision": h.revision, "version": s.version, "db_size": s.db_size, "db_size_in_use": s.db_size_in_use, "leader": format!("{:x}", s.leader), "raft_term": s.raft_term, "errors": s.errors, "members": members.members.iter().map(|m| json!({"id": format!("{:x}", m.id), "name": m.name, "client_urls": m.client_ur_ls})).collect::<Vec<_>>()})
        );
    } else {
        println!("endpoint     {}", a.conn.endpoints.join(","));
        println!(
            "member       {:x} ({})",
            h.member_id,
            members
                .members
                .first()
                .map(|m| m.name.as_str())
                .unwrap_or("?")
        );
        println!("version      {}", s.version);
        println!("revision     {}", h.revision);
        println!(
            "db size      {} bytes ({} in use)",
            s.db_size, s.db_size_in_use
        );
        println!("leader       {:x}", s.leader);
        println!(
            "alarms       {}",
            if s.errors.is_empty() {
                "none".to_string()
            } else {
                s.errors.join(", ")
            }
        );
    }
    Ok(())
}
