//! `meshwork svc | config | lock | id`: the coordination API from the command line.
//! Every command is a call to a node's HTTP API (`--http`, default 127.0.0.1:7070),
//! so it works the same on the embedded store and on an external etcd cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, print_json, time_ms};

/// Where the node's HTTP API is.
#[derive(Args, Clone)]
pub(crate) struct Http {
    /// The node's HTTP address.
    #[arg(
        long,
        env = "MESHWORK_HTTP",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    http: String,
}

impl Http {
    /// The address.
    pub(crate) fn addr(&self) -> &str {
        &self.http
    }
}

async fn req(h: &Http, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| Bytes::from(b.to_string()));
    call(&h.http, method, path, body).await?.json()
}

/// `meshwork svc`.
#[derive(Args)]
pub(crate) struct SvcArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: SvcCmd,
}

#[derive(Subcommand)]
enum SvcCmd {
    /// List services with healthy/total instances.
    List,
    /// Register an instance. Ephemeral (default): heartbeats until Ctrl-C, then
    /// deregisters. `--persistent`: stays registered after the command exits.
    Register(Register),
    /// Deregister an instance.
    Deregister {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
    /// Show a service's instances.
    Get(Discover),
    /// Follow a service's instances with blocking queries; prints each change.
    Watch(Discover),
    /// Recent registry events.
    Events {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Take an instance out of rotation (or back in with --enable).
    Disable {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// Enable instead.
        #[arg(long)]
        enable: bool,
    },
}

#[derive(Args)]
struct Register {
    /// Service name.
    service: String,
    /// Address clients connect to.
    #[arg(long)]
    address: String,
    /// Port clients connect to.
    #[arg(long)]
    port: u16,
    /// Instance id [default: ADDRESS:PORT].
    #[arg(long)]
    id: Option<String>,
    /// http, https, grpc or tcp.
    #[arg(long, default_value = "http")]
    protocol: String,
    /// Load-balancing weight.
    #[arg(long, default_value_t = 100)]
    weight: u32,
    /// Zone.
    #[arg(long, default_value = "")]
    zone: String,
    /// Version of the instance's software.
    #[arg(long = "instance-version", default_value = "")]
    instance_version: String,
    /// Tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "meta")]
    meta: Vec<String>,
    /// Stay registered without heartbeats.
    #[arg(long)]
    persistent: bool,
    /// Lease TTL of an ephemeral instance, seconds.
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// Active check: `http:/path`, `tcp` or `grpc[:service]`.
    #[arg(long)]
    check: Option<String>,
    /// Check interval, ms.
    #[arg(long, default_value_t = 5000)]
    interval_ms: u64,
    /// Check timeout, ms [default: the smaller of 2000 and half the interval].
    #[arg(long)]
    timeout_ms: Option<u64>,
}

#[derive(Args)]
struct Discover {
    /// Service name.
    service: String,
    /// Only healthy instances.
    #[arg(long)]
    healthy: bool,
    /// Required tags, comma-separated.
    #[arg(long)]
    tags: Option<String>,
    /// Zone.
    #[arg(long)]
    zone: Option<String>,
    /// Only instances of this software version.
    #[arg(long = "instance-version")]
    instance_version: Option<String>,
}

impl Discover {
    fn query(&self) -> String {
        let mut q = format!("healthy={}", self.healthy);
        for (k, v) in [
            ("tags", &self.tags),
            ("zone", &self.zone),
            ("version", &self.instance_version),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", enc(v)));
            }
        }
        q
    }
}

fn check_json(spec: &str, interval_ms: u64, timeout_ms: u64) -> Result<Value> {
    let mut v = if let Some(path) = spec.strip_prefix("http:") {
        json!({"type": "http", "path": if path.is_empty() { "/healthz" } else { path }})
    } else if spec == "tcp" {
        json!({"type": "tcp"})
    } else if let Some(rest) = spec.strip_prefix("grpc") {
        json!({"type": "grpc", "service": rest.trim_start_matches(':')})
    } else {
        bail!("--check {spec:?}: use http:/path, tcp or grpc[:service]");
    };
    v["interval_ms"] = json!(interval_ms);
    v["timeout_ms"] = json!(timeout_ms);
    Ok(v)
}

pub(crate) async fn svc(a: SvcArgs) -> Result<()> {
    let h = &a.http;
    match a.cmd {
        SvcCmd::List => {
            let v = req(h, "GET", "/v1/services", None).await?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&["SERVICE", "HEALTHY", "TOTAL", "INDEX"]);
                for s in v["services"].as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&s["name"]),
                        cell(&s["healthy"]),
                        cell(&s["instances"]),
                        cell(&s["index"]),
                    ]);
                }
                t
            });
        }
        SvcCmd::Register(r) => {
            let mut metadata = serde_json::Map::new();
            for m in &r.meta {
                let (k, v) = m
                    .split_once('=')
                    .with_context(|| format!("--meta {m:?}: expected KEY=VALUE"))?;
                metadata.insert(k.to_string(), json!(v));
            }
            let mut body = json!({
                "address": r.address, "port": r.port, "protocol": r.protocol,
                "weight": r.weight, "zone": r.zone, "version": r.instance_version, "tags": r.tags,
                "metadata": metadata, "ephemeral": !r.persistent, "ttl_seconds": r.ttl,
            });
            if let Some(id) = &r.id {
                body["id"] = json!(id);
            }
            if let Some(c) = &r.check {
                let timeout = r.timeout_ms.unwrap_or((r.interval_ms / 2).min(2000));
                body["check"] = check_json(c, r.interval_ms, timeout)?;
            }
            let path = format!("/v1/services/{}/instances", enc(&r.service));
            let v = req(h, "POST", &path, Some(body)).await?;
            a.out.print(&v, |v, wide| {
                instances_table(std::slice::from_ref(&v["instance"]), wide)
            });
            if r.persistent {
                return Ok(());
            }
            let id = v["instance"]["id"].as_str().unwrap_or_default().to_string();
            let hb = format!(
                "/v1/services/{}/instances/{}/heartbeat",
                enc(&r.service),
                enc(&id)
            );
            eprintln!(
                "registered {}/{id}; heartbeating every {} s until Ctrl-C",
                r.service,
                (r.ttl / 3).max(1)
            );
            let mut tick = tokio::time::interval(Duration::from_secs((r.ttl as u64 / 3).max(1)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = req(h, "PUT", &hb, None).await {
                            eprintln!("heartbeat failed: {e:#}");
                        }
                    }
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            let path = format!("/v1/services/{}/instances/{}", enc(&r.service), enc(&id));
            let _ = req(h, "DELETE", &path, None).await;
            eprintln!("deregistered {}/{id}", r.service);
        }
        SvcCmd::Deregister { service, id } => {
            let path = format!("/v1/services/{}/instances/{}", enc(&service), enc(&id));
            req(h, "DELETE", &path, None).await?;
            println!("deregistered {service}/{id}");
        }
        SvcCmd::Get(d) => {
            let path = format!("/v1/services/{}/instances?{}", enc(&d.service), d.query());
            let v = req(h, "GET", &path, None).await?;
            a.out.print(&v, |v, wide| {
                instances_table(v["instances"].as_array().map_or(&[], Vec::as_slice), wide)
            });
        }
        SvcCmd::Watch(d) => {
            let mut index = 0i64;
            loop {
                let path = format!(
                    "/v1/services/{}/instances?{}&index={index}&wait=60s",
                    enc(&d.service),
                    d.query()
                );
                let v = req(h, "GET", &path, None).await?;
                let new = v["index"].as_i64().unwrap_or(0);
                if new != index {
                    index = new;
                    println!("{}", v);
                }
            }
        }
        SvcCmd::Events { service, limit } => {
            let mut path = format!("/v1/registry/events?limit={limit}");
            if let Some(s) = service {
                path.push_str(&format!("&service={}", enc(&s)));
            }
            let v = req(h, "GET", &path, None).await?;
            a.out.print(&v, |v, wide| {
                let mut t = if wide {
                    Table::new(&["REVISION", "SEEN", "SERVICE", "INSTANCE", "EVENT", "DETAIL"])
                } else {
                    Table::new(&["REVISION", "SERVICE", "INSTANCE", "EVENT", "DETAIL"])
                };
                for e in v["events"].as_array().into_iter().flatten() {
                    let mut row = vec![cell(&e["revision"])];
                    if wide {
                        row.push(time_ms(&e["seen_at_ms"]));
                    }
                    row.extend([
                        cell(&e["service"]),
                        cell(&e["instance"]),
                        cell(&e["kind"]),
                        cell(&e["detail"]),
                    ]);
                    t.row(row);
                }
                t
            });
        }
        SvcCmd::Disable {
            service,
            id,
            enable,
        } => {
            let path = format!(
                "/v1/services/{}/instances/{}/enabled",
                enc(&service),
                enc(&id)
            );
            let v = req(h, "PUT", &path, Some(json!({ "enabled": enable }))).await?;
            a.out
                .print(&v, |v, wide| instances_table(std::slice::from_ref(v), wide));
        }
    }
    Ok(())
}

/// `meshwork config`.
#[derive(Args)]
pub(crate) struct ConfigArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: ConfigCmd,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Publish content (validated in its format).
    Publish {
        /// namespace/group/data_id
        path: String,
        /// Read the content from this file (- for stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Or give it inline.
        #[arg(long)]
        content: Option<String>,
        /// text, json, toml, yaml or properties.
        #[arg(long, default_value = "text")]
        format: String,
        /// Author.
        #[arg(long, default_value = "")]
        author: String,
        /// What changed.
        #[arg(long, default_value = "")]
        description: String,
        /// Publish only if the current version is this (0 = absent).
        #[arg(long)]
        if_version: Option<u64>,
        /// Mark the entry secret: encrypted at rest, hidden in the console,
        /// readable only with the scope secrets:read:NAMESPACE. Give the
        /// content with --file, not --content (which `ps` shows).
        #[arg(long, conflicts_with = "not_secret")]
        secret: bool,
        /// Unmark a secret entry.
        #[arg(long)]
        not_secret: bool,
    },
    /// Show the secrets' keys (ids only): master key, active data key, entries per key.
    Secrets,
    /// Rotate the secrets' keys: a new data key, every data key rewrapped under
    /// the node's master key, every secret entry resealed.
    RotateKeys,
    /// Print an entry (`--raw`: only the content).
    Get {
        /// namespace/group/data_id
        path: String,
        /// Content only.
        #[arg(long)]
        raw: bool,
    },
    /// List entries.
    List {
        /// Namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Versions of an entry, newest first.
    History {
        /// namespace/group/data_id
        path: String,
    },
    /// Unified diff between two versions.
    Diff {
        /// namespace/group/data_id
        path: String,
        /// Older version.
        from: u64,
        /// Newer version.
        to: u64,
    },
    /// Restore an earlier version (as a new version).
    Rollback {
        /// namespace/group/data_id
        path: String,
        /// Version to restore.
        #[arg(value_name = "VERSION")]
        to_version: u64,
    },
    /// Delete an entry (history stays).
    Delete {
        /// namespace/group/data_id
        path: String,
    },
    /// Long-poll entries and print each change until Ctrl-C.
    Listen {
        /// namespace/group/data_id (repeatable).
        paths: Vec<String>,
    },
}

fn split_path(p: &str) -> Result<(String, String, String)> {
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [a, b, c] => Ok((a.to_string(), b.to_string(), c.to_string())),
        _ => bail!("{p:?}: expected namespace/group/data_id"),
    }
}

fn cfg_path(p: &str) -> Result<String> {
    let (a, b, c) = split_path(p)?;
    Ok(format!("/v1/config/{}/{}/{}", enc(&a), enc(&b), enc(&c)))
}

pub(crate) async fn config(a: ConfigArgs) -> Result<()> {
    let h = &a.http;
    match a.cmd {
        ConfigCmd::Publish {
            path,
            file,
            content,
            format,
            author,
            description,
            if_version,
            secret,
            not_secret,
        } => {
            let content = match (file, content) {
                (Some(f), None) if f.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin()).context("reading stdin")?
                }
                (Some(f), None) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, Some(c)) => c,
                _ => bail!("give the content with exactly one of --file or --content"),
            };
            let mut body = json!({"content": content, "format": format, "author": author, "description": description});
            if let Some(v) = if_version {
                body["if_version"] = json!(v);
            }
            if secret || not_secret {
                body["secret"] = json!(secret);
            }
            let v = req(h, "PUT", &cfg_path(&path)?, Some(body)).await?;
            println!(
                "{} version {} ({})",
                path,
                v["entry"]["version"],
                if v["changed"].as_bool() == Some(true) {
                    "published"
                } else {
                    "unchanged"
                }
            );
        }
        ConfigCmd::Get { path, raw } => {
            let v = req(h, "GET", &cfg_path(&path)?, None).await?;
            if raw {
                crate::output::out(v["content"].as_str().unwrap_or(""));
            } else {
                print_json(&v);
            }
        }
        ConfigCmd::List { namespace, group } => {
            let mut q = String::new();
            if let Some(n) = namespace {
                q.push_str(&format!("namespace={}&", enc(&n)));
            }
            if let Some(g) = group {
                q.push_str(&format!("group={}", enc(&g)));
            }
            let v = req(h, "GET", &format!("/v1/config?{q}"), None).await?;
            a.out.print(&v, |v, wide| {
                let mut cols = vec![
                    "NAMESPACE",
                    "GROUP",
                    "DATA ID",
                    "FORMAT",
                    "VERSION",
                    "UPDATED",
                ];
                if wide {
                    cols.extend(["AUTHOR", "CHECKSUM", "DESCRIPTION"]);
                }
                let mut t = Table::new(&cols);
                for e in v["entries"].as_array().into_iter().flatten() {
                    let mut row = vec![
                        cell(&e["namespace"]),
                        cell(&e["group"]),
                        cell(&e["data_id"]),
                        cell(&e["format"]),
                        cell(&e["version"]),
                        time_ms(&e["updated_at_ms"]),
                    ];
                    if wide {
                        row.extend([
                            cell(&e["author"]),
                            cell(&e["checksum"]).chars().take(12).collect(),
                            cell(&e["description"]),
                        ]);
                    }
                    t.row(row);
                }
                t
            });
        }
        ConfigCmd::Secrets => {
            let v = req(h, "GET", "/v1/config/secrets", None).await?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&[
                    "DATA KEY",
                    "MASTER KEY",
                    "USABLE",
                    "ENTRIES",
                    "CREATED",
                    "ACTIVE",
                ]);
                for k in v["keys"].as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&k["id"]),
                        cell(&k["master"]),
                        cell(&k["usable"]),
                        cell(&k["entries"]),
                        time_ms(&k["created_at_ms"]),
                        if k["id"] == v["active"] {
                            "*".into()
                        } else {
                            String::new()
                        },
                    ]);
                }
                t
            });
        }
        ConfigCmd::RotateKeys => {
            let v = req(h, "POST", "/v1/config/secrets/rotate", None).await?;
            println!(
                "active data key {}: {} data keys rewrapped, {} secret entries resealed, {} skipped (changed meanwhile)",
                v["active"].as_str().unwrap_or(""),
                v["rewrapped"],
                v["resealed"],
                v["skipped"]
            );
            for e in v["unreadable"].as_array().into_iter().flatten() {
                eprintln!(
                    "warning: {} does not open (tampered with, or under a key this node lacks); left as it is",
                    e.as_str().unwrap_or("")
                );
            }
        }
        ConfigCmd::History { path } => {
            let v = req(h, "GET", &format!("{}/history", cfg_path(&path)?), None).await?;
            a.out.print(&v, |v, wide| {
                let mut cols = vec!["VERSION", "OP", "AUTHOR", "CHECKSUM", "DESCRIPTION"];
                if wide {
                    cols.insert(1, "AT");
                }
                let mut t = Table::new(&cols);
                for e in v["versions"].as_array().into_iter().flatten() {
                    let mut row = vec![cell(&e["version"])];
                    if wide {
                        row.push(time_ms(&e["updated_at_ms"]));
                    }
                    row.extend([
                        cell(&e["op"]),
                        cell(&e["author"]),
                        cell(&e["checksum"]).chars().take(12).collect(),
                        cell(&e["description"]),
                    ]);
                    t.row(row);
                }
                t
            });
        }
        ConfigCmd::Diff { path, from, to } => {
            let v = req(
                h,
                "GET",
                &format!("{}/diff?from={from}&to={to}", cfg_path(&path)?),
                None,
            )
            .await?;
            crate::output::out(v["unified"].as_str().unwrap_or(""));
        }
        ConfigCmd::Rollback {
            path,
            to_version: version,
        } => {
            let v = req(
                h,
                "POST",
                &format!("{}/rollback", cfg_path(&path)?),
                Some(json!({ "version": version })),
            )
            .await?;
            println!(
                "{path} rolled back to {version}: now version {}",
                v["entry"]["version"]
            );
        }
        ConfigCmd::Delete { path } => {
            let v = req(h, "DELETE", &cfg_path(&path)?, None).await?;
            println!("{path} deleted (version {})", v["version"]);
        }
        ConfigCmd::Listen { paths } => {
            if paths.is_empty() {
                bail!("name at least one namespace/group/data_id");
            }
            let mut items = Vec::new();
            for p in &paths {
                let (n, g, d) = split_path(p)?;
                items.push(json!({"namespace": n, "group": g, "data_id": d, "checksum": ""}));
            }
            loop {
                let v = req(
                    h,
                    "POST",
                    "/v1/config/listener",
                    Some(json!({"items": items, "timeout_ms": 30000})),
                )
                .await?;
                for k in v["changed"].as_array().into_iter().flatten() {
                    let p = format!(
                        "{}/{}/{}",
                        k["namespace"].as_str().unwrap_or(""),
                        k["group"].as_str().unwrap_or(""),
                        k["data_id"].as_str().unwrap_or("")
                    );
                    let cur = req(h, "GET", &cfg_path(&p)?, None).await;
                    let sum = match &cur {
                        Ok(e) => e["checksum"].as_str().unwrap_or("").to_string(),
                        Err(_) => String::new(),
                    };
                    match cur {
                        Ok(e) => println!(
                            "{p} version {}: {}",
                            e["version"],
                            e["content"].as_str().unwrap_or("")
                        ),
                        Err(_) => println!("{p} deleted"),
                    }
                    for it in items.iter_mut() {
                        let same = it["namespace"] == k["namespace"]
                            && it["group"] == k["group"]
                            && it["data_id"] == k["data_id"];
                        if same {
                            it["checksum"] = json!(sum);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `meshwork lock`.
#[derive(Args)]
pub(crate) struct LockArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: LockCmd,
}

#[derive(Subcommand)]
enum LockCmd {
    /// Acquire a lock, print its fencing token, hold it until Ctrl-C.
    Acquire {
        /// Lock name.
        name: String,
        /// Lease TTL, seconds.
        #[arg(long, default_value_t = 15)]
        ttl: i64,
        /// Give up after this many ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Every held lock.
    List,
    /// The leader of an election.
    Leader {
        /// Election name.
        name: String,
    },
}

pub(crate) async fn lock(a: LockArgs) -> Result<()> {
    let h = &a.http;
    match a.cmd {
        LockCmd::Acquire {
            name,
            ttl,
            timeout_ms,
        } => {
            let mut body = json!({ "ttl_seconds": ttl });
            if let Some(t) = timeout_ms {
                body["timeout_ms"] = json!(t);
            }
            let held = req(h, "POST", &format!("/v1/locks/{}", enc(&name)), Some(body)).await?;
            println!("{}", held);
            let lease = held["lease"].as_i64().unwrap_or(0);
            let mut tick = tokio::time::interval(Duration::from_secs((ttl as u64 / 3).max(1)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = req(h, "POST", &format!("/v1/leases/{lease}/keepalive"), None).await {
                            eprintln!("lost the lock's lease: {e:#}");
                            return Err(e);
                        }
                    }
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            req(h, "DELETE", &format!("/v1/leases/{lease}"), None).await?;
            eprintln!("released {name}");
        }
        LockCmd::List => {
            let v = req(h, "GET", "/v1/locks", None).await?;
            a.out.print(&v, |v, wide| {
                let mut cols = vec!["NAME", "HOLDER", "FENCING TOKEN", "WAITERS", "SINCE"];
                if wide {
                    cols.extend(["LEASE", "KEY"]);
                }
                let mut t = Table::new(&cols);
                for l in v["locks"].as_array().into_iter().flatten() {
                    let mut row = vec![
                        cell(&l["name"]),
                        cell(&l["holder"]),
                        cell(&l["held"]["fencing_token"]),
                        cell(&l["waiters"]),
                        time_ms(&l["requested_at_ms"]),
                    ];
                    if wide {
                        row.extend([lease_hex(&l["held"]["lease"]), cell(&l["held"]["key"])]);
                    }
                    t.row(row);
                }
                t
            });
        }
        LockCmd::Leader { name } => {
            let v = req(h, "GET", &format!("/v1/elections/{}", enc(&name)), None).await?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&["ELECTION", "LEADER", "FENCING TOKEN", "LEASE"]);
                t.row(vec![
                    name.clone(),
                    cell(&v["value"]),
                    cell(&v["held"]["fencing_token"]),
                    lease_hex(&v["held"]["lease"]),
                ]);
                t
            });
        }
    }
    Ok(())
}

/// `meshwork id`.
#[derive(Args)]
pub(crate) struct IdArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: IdCmd,
}

#[derive(Subcommand)]
enum IdCmd {
    /// New unique ids, one per line.
    Next {
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Decompose an id into time, worker and sequence.
    Explain {
        /// The id.
        id: String,
    },
}

pub(crate) async fn id(a: IdArgs) -> Result<()> {
    let h = &a.http;
    match a.cmd {
        IdCmd::Next { count } => {
            let v = req(h, "POST", &format!("/v1/ids?count={count}"), None).await?;
            for i in v["ids"].as_array().into_iter().flatten() {
                println!("{}", i.as_str().unwrap_or(""));
            }
        }
        IdCmd::Explain { id } => {
            let v = req(h, "GET", &format!("/v1/ids/{}", enc(&id)), None).await?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&["ID", "TIME", "WORKER", "SEQUENCE"]);
                t.row(vec![
                    cell(&v["id"]),
                    time_ms(&v["timestamp_ms"]),
                    cell(&v["worker"]),
                    cell(&v["sequence"]),
                ]);
                t
            });
        }
    }
    Ok(())
}

/// A lease id as etcd prints it (hex).
fn lease_hex(v: &Value) -> String {
    v.as_i64().map_or_else(|| cell(v), |l| format!("{l:x}"))
}

/// Instances as rows; `wide` adds protocol, tags, kind and the check's last word.
fn instances_table(instances: &[Value], wide: bool) -> Table {
    let mut cols = vec![
        "ID", "ADDRESS", "PORT", "HEALTH", "ENABLED", "WEIGHT", "ZONE", "VERSION",
    ];
    if wide {
        cols.extend(["PROTOCOL", "TAGS", "KIND", "CHECK"]);
    }
    let mut t = Table::new(&cols);
    for i in instances {
        let mut row = vec![
            cell(&i["id"]),
            cell(&i["address"]),
            cell(&i["port"]),
            cell(&i["health"]),
            cell(&i["enabled"]),
            cell(&i["weight"]),
            cell(&i["zone"]),
            cell(&i["version"]),
        ];
        if wide {
            let kind = if i["ephemeral"].as_bool() == Some(false) {
                "persistent"
            } else {
                "ephemeral"
            };
            row.extend([
                cell(&i["protocol"]),
                cell(&i["tags"]),
                kind.to_string(),
                cell(&i["health_detail"]["detail"]),
            ]);
        }
        t.row(row);
    }
    t
}
