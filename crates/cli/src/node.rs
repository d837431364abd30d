//! Running a node: bind listeners, open the store (or connect to an external etcd
//! cluster), serve etcd gRPC, start coordination, serve HTTP, and shut down
//! gracefully on SIGTERM or Ctrl-C (leave the cluster, stop accepting, finish
//! in-flight requests, close the store cleanly, exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use meshwork_coord::{Coord, CoordOptions};
use meshwork_etcd::ServerInfo;
use meshwork_store::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http;

/// Everything a node needs to start.
pub(crate) struct NodeConfig {
    pub(crate) name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) etcd_addr: SocketAddr,
    pub(crate) http_addr: SocketAddr,
    pub(crate) store: StoreConfig,
    /// External etcd endpoints (`--store etcd://...`); empty = the embedded store.
    pub(crate) external: Vec<String>,
    pub(crate) coord: CoordOptions,
    pub(crate) roles: crate::config::Roles,
    pub(crate) gateway_addr: Option<SocketAddr>,
    pub(crate) gateway: meshwork_gateway::GatewayConfig,
    pub(crate) gateway_workers: Option<usize>,
    /// TLS on the etcd, HTTP and OTLP ports (None: plaintext).
    pub(crate) tls: Option<meshwork_tls::TlsConfig>,
    /// The authority's directory and the certificates' lifetime, when this
    /// node issues service certificates.
    pub(crate) identity: Option<(PathBuf, std::time::Duration)>,
    /// Reads of the HTTP API need a token or login too.
    pub(crate) protect_reads: bool,
    /// Calls per second each token or login may make (0: no limit).
    pub(crate) token_rate_per_sec: u32,
    /// Start with command listeners open to the network without authentication.
    pub(crate) insecure_allow_open: bool,
    /// The store's authentication settings (users and roles live in the data dir).
    pub(crate) store_auth: meshwork_etcd::auth::AuthConfig,
    /// The console login (None: writes are open).
    pub(crate) console_auth: Option<meshwork_console::Auth>,
    /// Limits of the HTTP and etcd ports.
    pub(crate) listen: crate::listen::ListenConfig,
    /// The transaction coordinator's options.
    pub(crate) txn: meshwork_txn::role::TxnOptions,
    /// The message broker's settings (its files live in `data_dir/mq`).
    pub(crate) mq: meshwork_mq::BrokerConfig,
    /// The cache's RESP address (the cache role).
    pub(crate) cache_addr: Option<SocketAddr>,
    /// The cache's settings.
    pub(crate) cache: meshwork_cache::CacheConfig,
    /// The trace store's OTLP/gRPC address (the traces role).
    pub(crate) otlp_grpc_addr: Option<SocketAddr>,
    /// The trace store's OTLP/HTTP address (the traces role).
    pub(crate) otlp_http_addr: Option<SocketAddr>,
    /// The trace store's settings (its files live in `data_dir/traces`).
    pub(crate) traces: meshwork_traces::TracesConfig,
    /// Where this node's spans go instead of its own trace store.
    pub(crate) otlp_endpoint: Option<meshwork_telemetry::export::Endpoint>,
}

/// A node that is up: its bound addresses, and how to stop it.
pub(crate) struct Running {
    /// The embedded store's etcd address (None when running on an external cluster).
    pub(crate) etcd_addr: Option<SocketAddr>,
    pub(crate) http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The gateway's address, when the gateway role runs.
    pub(crate) gateway_addr: Option<SocketAddr>,
    /// The cache's RESP address, when the cache role runs.
    pub(crate) cache_addr: Option<SocketAddr>,
    /// The trace store's OTLP/gRPC address, when the traces role runs.
    pub(crate) otlp_grpc_addr: Option<SocketAddr>,
    /// The trace store's OTLP/HTTP address, when the traces role runs.
    pub(crate) otlp_http_addr: Option<SocketAddr>,
    /// The HTTP API checks tokens (a console password is configured).
    pub(crate) http_auth: bool,
    /// The listeners speak TLS.
    pub(crate) tls: bool,
    /// The embedded store has auth on (at start).
    pub(crate) store_auth: bool,
    traces: Option<meshwork_traces::TraceStore>,
    store: Option<Store>,
    coord: Option<Coord>,
    gateway: Option<meshwork_gateway::GatewayRole>,
    txn: Option<meshwork_txn::role::TxnRole>,
    mq: Option<meshwork_mq::Broker>,
    cache: Option<meshwork_cache::Workers>,
}

impl Running {
    /// Whether the broker (role `mq`) runs.
    pub(crate) fn has_mq(&self) -> bool {
        self.mq.is_some()
    }

    /// Stops accepting, waits for in-flight requests, closes the store.
    pub(crate) async fn shutdown(self) {
        if let Some(g) = self.gateway {
            g.shutdown().await;
        }
        // Transactions stay in the store; another txn node, or this one
        // restarted, resumes them.
        if let Some(t) = self.txn {
            t.shutdown();
        }
        if let Some(c) = self.coord {
            c.shutdown().await;
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(c) = self.cache {
            let _ = tokio::task::spawn_blocking(move || c.stop()).await;
        }
        if let Some(t) = self.traces {
            let _ = tokio::task::spawn_blocking(move || t.close()).await;
        }
        if let Some(b) = self.mq {
            // Waits for the committer to finish what is queued.
            let _ = tokio::task::spawn_blocking(move || b.close()).await;
        }
        if let Some(store) = self.store {
            store.close().await;
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds, opens the store (unless external), starts coordination and serves.
/// The cache's settings, its snapshot file (if any) inside the data directory.
fn cache_config(cfg: &NodeConfig) -> meshwork_cache::CacheConfig {
    let mut c = cfg.cache.clone();
    if let Some(p) = &mut c.snapshot
        && p.is_relative()
    {
        *p = cfg.data_dir.join(&*p);
    }
    c
}

/// Refuses listeners that take commands bound beyond loopback without
/// authentication (Redis' protected mode, for every port), unless the node
/// was started with `--insecure-allow-open`.
fn check_exposure(cfg: &NodeConfig, store_auth_on: bool) -> Result<()> {
    if cfg.insecure_allow_open {
        return Ok(());
    }
    let exposed = |a: &SocketAddr| !a.ip().is_loopback();
    let mut open = Vec::new();
    if exposed(&cfg.http_addr) && cfg.console_auth.is_none() {
        open.push(format!(
            "the HTTP API on {} has no console password (set MESHWORK_CONSOLE_PASSWORD or [console] password; then API tokens work)",
            cfg.http_addr
        ));
    }
    if cfg.roles.store && exposed(&cfg.etcd_addr) && !store_auth_on {
        open.push(format!(
            "the etcd port on {} has store auth off (start it on loopback once, `etcdctl user add root` and `etcdctl auth enable`)",
            cfg.etcd_addr
        ));
    }
    if let Some(c) = cfg.cache_addr
        && exposed(&c)
        && cfg.cache.password.is_none()
    {
        open.push(format!(
            "the cache on {c} has no password ([cache] password)"
        ));
    }
    if open.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to start with listeners open to the network without authentication:\n  - {}\n(bind them to 127.0.0.1, turn authentication on, or pass --insecure-allow-open)",
        open.join("\n  - ")
    )
}

pub(crate) async fn start(cfg: NodeConfig) -> Result<Running> {
    // Which new traces this node records (OTEL_TRACES_SAMPLER[_ARG]).
    let sampler = meshwork_telemetry::sampler_from_env();
    if sampler != meshwork_telemetry::Sampler::default() {
        tracing::info!(?sampler, "trace head sampling");
    }
    // One certificate for every listener, reloaded when its files change.
    let tls = match &cfg.tls {
        Some(t) => {
            let r = meshwork_tls::TlsReloader::load(t.clone())
                .context("loading the TLS certificate")?;
            r.spawn_watch(std::time::Duration::from_secs(2));
            Some(r)
        }
        None => None,
    };
    if !cfg.roles.store {
        check_exposure(&cfg, false)?;
    }
    // The authority service certificates come from; https health checks
    // trust it (services serving with their identity are checked over TLS).
    let authority = match &cfg.identity {
        Some((dir, _)) => {
            let a = meshwork_tls::identity::Authority::load(dir)
                .context("loading the identity authority (--identity-ca)")?;
            meshwork_coord::registry::prober::trust_for_https(a.ca_pem())
                .map_err(|e| anyhow::anyhow!("trusting the identity authority: {e}"))?;
            Some(Arc::new(a))
        }
        None => None,
    };
    let http_listener = TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding the HTTP address {}", cfg.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let serving = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    // The gateway's own certificate, for routes calling services over
    // mutual TLS (`forward.tls.identity`), renewed at half its life.
    if let (Some(a), Some((_, ttl)), true) = (&authority, &cfg.identity, cfg.roles.gateway) {
        use meshwork_gateway::identity::SERVICE;
        let (chain, key) = a
            .issue(SERVICE, *ttl)
            .context("issuing the gateway's certificate")?;
        let id = meshwork_tls::identity::Identity::new(SERVICE, &chain, &key, a.ca_pem())
            .context("the gateway's certificate")?;
        meshwork_gateway::identity::set(id.clone());
        let (a, ttl, rx) = (a.clone(), *ttl, stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let renew = async {
                let mut wait = ttl / 2;
                loop {
                    tokio::time::sleep(wait).await;
                    let renewed = a
                        .issue(SERVICE, ttl)
                        .and_then(|(chain, key)| id.renew(&chain, &key));
                    wait = match renewed {
                        Ok(()) => ttl / 2,
                        Err(e) => {
                            // Well before the one in use runs out.
                            tracing::warn!(error = %e, "renewing the gateway's certificate; retrying");
                            (ttl / 20).max(std::time::Duration::from_secs(1))
                        }
                    };
                }
            };
            tokio::select! {
                () = renew => {}
                () = stopped(rx) => {}
            }
        }));
    }
    // The trace store listens before the store, so that the node's own APIs
    // (the etcd gRPC port among them) can record spans into it.
    let traces = if cfg.roles.traces {
        Some(start_traces(&cfg, tls.clone(), &stop_rx, &mut tasks).await?)
    } else {
        None
    };
    // Spans of the node's own APIs: the HTTP API's and the etcd port's.
    let node_tracer = tracer(&cfg, traces.as_ref().map(|t| &t.store), "meshwork-node");
    let mut store_auth_on = false;
    let (store, etcd_addr, endpoints) = if cfg.roles.store {
        let etcd_listener = TcpListener::bind(cfg.etcd_addr)
            .await
            .with_context(|| format!("binding the etcd address {}", cfg.etcd_addr))?;
        let etcd_addr = etcd_listener.local_addr()?;
        let store = Store::open(&cfg.data_dir, cfg.store.clone())
            .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
        // Leases that ran out while the node was down go, with their keys,
        // before any client can read them.
        store.settled().await;
        let auth = meshwork_etcd::auth::Auth::open(&cfg.data_dir, cfg.store_auth.clone())
            .with_context(|| {
                format!(
                    "opening the store's auth state in {}",
                    cfg.data_dir.display()
                )
            })?;
        store_auth_on = auth.enabled();
        check_exposure(&cfg, store_auth_on)?;
        let info = ServerInfo::single(&cfg.name, format!("http://{etcd_addr}"));
        let store2 = store.clone();
        let auth2 = auth.clone();
        let tls2 = tls.clone();
        let rx = stop_rx.clone();
        let serving2 = serving.clone();
        let limits = cfg.listen.etcd();
        let tracer2 = node_tracer.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = meshwork_etcd::serve_limited(
                etcd_listener,
                store2,
                auth2,
                info,
                limits,
                tls2,
                Some(tracer2),
                stopped(rx),
            )
            .await
            {
                tracing::error!(error = %e, "etcd gRPC server failed");
            }
            serving2.store(false, Ordering::Release);
        }));
        // Coordination reaches the embedded store through the etcd API like any
        // client — the same code path as on an external cluster — over in-memory
        // pipes instead of loopback TCP (no kernel round trip, and outside the
        // etcd port's connection limit, so a flood there cannot cut the node off).
        let inproc = meshwork_etcd::inproc::Listener::bind(&format!("{}@{etcd_addr}", cfg.name))
            .context("binding the in-process etcd endpoint")?;
        let local = inproc.endpoint();
        let (store3, info3, rx3) = (
            store.clone(),
            ServerInfo::single(&cfg.name, format!("http://{etcd_addr}")),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) =
                meshwork_etcd::serve_in_process(inproc, store3, auth, info3, stopped(rx3)).await
            {
                tracing::error!(error = %e, "in-process etcd server failed");
            }
        }));
        (Some(store), Some(etcd_addr), vec![local])
    } else {
        (None, None, cfg.external.clone())
    };
    let mut coord_opts = cfg.coord.clone();
    coord_opts.node_name = cfg.name.clone();
    coord_opts.http_addr = http_addr.to_string();
    if cfg.roles.gateway {
        coord_opts
            .extra_roles
            .push(meshwork_gateway::GATEWAY_ROLE.to_string());
    }
    if cfg.roles.mq {
        coord_opts.extra_roles.push("mq".to_string());
    }
    // The cache listens before the node joins, so that its record names the
    // address actually bound (port 0 allowed).
    let cache_addr = match (cfg.roles.cache, cfg.cache_addr) {
        (true, Some(addr)) => Some(
            meshwork_cache::spawn_workers_tls(
                addr,
                cache_config(&cfg),
                None,
                tls.as_ref().map(|t| t.acceptor()),
            )
            .with_context(|| format!("binding the cache address {addr}"))?,
        ),
        _ => None,
    };
    if let Some(c) = &cache_addr {
        coord_opts.extra_roles.push("cache".to_string());
        coord_opts
            .endpoints
            .insert("cache".to_string(), c.addr.to_string());
    }
    if cfg.roles.txn {
        coord_opts
            .extra_roles
            .push(meshwork_txn::role::TXN_ROLE.to_string());
    }
    if let Some(t) = &traces {
        coord_opts.extra_roles.push("traces".to_string());
        if let Some(a) = t.grpc {
            coord_opts
                .endpoints
                .insert("otlp-grpc".to_string(), a.to_string());
        }
        if let Some(a) = t.http {
            coord_opts
                .endpoints
                .insert("otlp-http".to_string(), a.to_string());
        }
    }
    if std::fs::create_dir_all(&cfg.data_dir).is_ok() {
        coord_opts.session_file = Some(cfg.data_dir.join("coord-session"));
    }
    let started = if cfg.roles.coord {
        Coord::start(&endpoints, coord_opts).await.map(Some)
    } else {
        Ok(None)
    };
    let coord = match started {
        Ok(c) => c,
        Err(e) => {
            let _ = stop.send(true);
            for t in tasks {
                let _ = t.await;
            }
            if let Some(s) = store {
                s.close().await;
            }
            return Err(anyhow::anyhow!(e))
                .with_context(|| format!("starting coordination on etcd endpoints {endpoints:?}"));
        }
    };
    if let (Some(c), Some(a), Some((_, ttl))) = (&coord, &authority, &cfg.identity) {
        let issuer = meshwork_coord::identity::Issuer::new(c.backend.clone(), a.clone(), *ttl);
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = issuer.run() => {}
                () = stopped(rx) => {}
            }
        }));
        tracing::info!(ttl_s = ttl.as_secs(), "issuing service certificates");
    } else if let (Some(c), None) = (&coord, &authority) {
        // Another node issues: trust its published authority for https
        // health checks of services serving with their identity.
        let (backend, rx) = (c.backend.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let learn = async {
                loop {
                    if let Ok(Some(pem)) = meshwork_coord::identity::published_ca(&backend).await {
                        match meshwork_coord::registry::prober::trust_for_https(&pem) {
                            Ok(()) => return,
                            Err(e) => tracing::warn!(error = %e, "the published identity authority is unusable"),
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            };
            tokio::select! {
                () = learn => {}
                () = stopped(rx) => {}
            }
        }));
    }
    let state = http::AppState {
        store: store.clone(),
        serving: serving.clone(),
        coord: coord.clone(),
        prometheus: crate::metrics_handle(),
    };
    let gateway = match (&coord, cfg.roles.gateway, cfg.gateway_addr) {
        (Some(c), true, Some(addr)) => Some(meshwork_gateway::role::start(
            c,
            cfg.gateway.clone(),
            addr,
            cfg.gateway_workers,
            &cfg.name,
        )?),
        _ => None,
    };
    if let Some(g) = &gateway {
        g.gateway
            .set_tracer(tracer(&cfg, traces.as_ref().map(|t| &t.store), "gateway"));
    }
    let txn = match (&coord, cfg.roles.txn) {
        (Some(c), true) => Some(meshwork_txn::role::TxnRole::start_with(c, {
            let mut o = cfg.txn.clone();
            o.tracer = tracer(&cfg, traces.as_ref().map(|t| &t.store), "txn-coordinator");
            o
        })),
        _ => None,
    };
    let mq = if cfg.roles.mq {
        let dir = cfg.data_dir.join("mq");
        let config = cfg.mq.clone();
        let opened = tokio::task::spawn_blocking(move || meshwork_mq::Broker::open(&dir, config))
            .await
            .context("opening the message broker")?;
        Some(opened.with_context(|| {
            format!(
                "opening the message broker in {}",
                cfg.data_dir.join("mq").display()
            )
        })?)
    } else {
        None
    };
    let mut app = http::router(state);
    if let Some(t) = &traces {
        app = app.merge(meshwork_traces::api::router(t.store.clone()));
    }
    if let Some(t) = &txn {
        app = app.merge(meshwork_txn::api::router(t.clone()));
    }
    if let Some(b) = &mq {
        // The HTTP API, and the gRPC service on the same port (h2c).
        app = app.merge(meshwork_mq::api::router(b.clone()));
        let (gauges, mut rx) = (b.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                gauges.export_gauges();
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    _ = rx.changed() => return,
                }
            }
        }));
        // Half messages left unresolved are checked back with their producer service,
        // found in the registry.
        if let Some(c) = &coord {
            let registry = c.registry.clone();
            let resolve: meshwork_mq::check::Resolver = std::sync::Arc::new(move |service| {
                meshwork_txn::runner::Endpoints::endpoints(&registry, service)
            });
            tasks.push(tokio::spawn(meshwork_mq::check::run_checker(
                b.clone(),
                resolve,
                stop_rx.clone(),
            )));
            // Topics and groups kept in the store too (see `mq_meta`).
            tasks.push(tokio::spawn(crate::mq_meta::run(
                b.clone(),
                c.backend.clone(),
                stop_rx.clone(),
            )));
        }
    }
    // Console sessions signed with the key kept in the store: they survive
    // a restart and hold on every node.
    let console_auth = match (&cfg.console_auth, &coord) {
        // The users kept in the store sign in too.
        (Some(a), Some(c)) => match meshwork_coord::tokens::session_key(&c.backend).await {
            Ok(key) => Some(a.clone().with_session_key(key).with_users(c.users.clone())),
            Err(e) => {
                tracing::warn!(error = %e, "no session key from the store; console sessions end with this process");
                Some(a.clone().with_users(c.users.clone()))
            }
        },
        (a, _) => a.clone(),
    };
    if let Some(c) = &coord {
        // One document for everything this node serves.
        let openapi = meshwork_api::openapi::merge(&[
            meshwork_coord::api::OPENAPI,
            meshwork_gateway::OPENAPI,
            meshwork_console::OPENAPI,
            meshwork_txn::OPENAPI,
            meshwork_mq::OPENAPI,
            meshwork_traces::OPENAPI,
        ])?;
        app = app
            .merge(meshwork_gateway::role::routes_router(
                c.clone(),
                gateway.as_ref().map(|g| g.gateway.clone()),
            ))
            .merge(meshwork_coord::api::router_documented(c.clone(), &openapi))
            .merge(meshwork_console::router(meshwork_console::ConsoleState {
                coord: c.clone(),
                gateway: gateway.as_ref().map(|g| g.gateway.clone()),
                mq: mq.clone(),
                cache: cache_addr.as_ref().map(|w| w.cache().clone()),
                traces: traces.as_ref().map(|t| t.store.clone()),
                history: Default::default(),
                auth: console_auth.clone(),
            }));
    }
    if let Some(g) = &gateway {
        app = app.nest("/gateway", g.gateway.admin_router());
    }
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            meshwork_console::auth::HttpAuth {
                console: console_auth.clone(),
                tokens: coord.as_ref().map(|c| c.tokens.clone()),
                protect_reads: cfg.protect_reads,
                audit: coord.as_ref().map(|c| c.audit.clone()),
                rate: meshwork_console::auth::HttpAuth::rate_limit(cfg.token_rate_per_sec),
            },
            meshwork_console::auth::guard,
        ))
        // Outside the guard: refused calls are traced too.
        .layer(axum::middleware::from_fn_with_state(
            node_tracer.clone(),
            crate::apitrace::server_span,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            cfg.listen.max_body_bytes,
        ));
    let rx = stop_rx.clone();
    let listen = cfg.listen.clone();
    let http_tls = tls.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) =
            crate::listen::serve(http_listener, app, listen, http_tls, stopped(rx)).await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    match etcd_addr {
        Some(etcd_addr) => {
            tracing::info!(%etcd_addr, %http_addr, store = %"embedded", "meshwork node started")
        }
        None => tracing::info!(%http_addr, store = %"external", "meshwork node started"),
    }
    Ok(Running {
        etcd_addr,
        http_addr,
        http_auth: cfg.console_auth.is_some(),
        tls: tls.is_some(),
        store_auth: store_auth_on,
        gateway_addr: gateway.as_ref().map(|g| g.addr),
        cache_addr: cache_addr.as_ref().map(|c| c.addr),
        cache: cache_addr,
        otlp_grpc_addr: traces.as_ref().and_then(|t| t.grpc),
        otlp_http_addr: traces.as_ref().and_then(|t| t.http),
        traces: traces.map(|t| t.store),
        stop,
        tasks,
        store,
        coord,
        gateway,
        txn,
        mq,
    })
}

/// The span exporter of this node's component `service`: to the configured
/// OTLP endpoint, else into this node's trace store, else none.
fn tracer(
    cfg: &NodeConfig,
    store: Option<&meshwork_traces::TraceStore>,
    service: &str,
) -> meshwork_telemetry::export::Tracer {
    use meshwork_telemetry::export::{ExportConfig, Sink, Tracer};
    let mut ec = ExportConfig::from_env(service);
    ec.resource
        .push(("meshwork.node".to_string(), cfg.name.clone()));
    if let Some(ep) = &cfg.otlp_endpoint {
        tracing::info!(endpoint = %ep.url, protocol = ?ep.protocol, service, "exporting spans over OTLP");
        return Tracer::start(ec, ep.sink());
    }
    let Some(store) = store.cloned() else {
        return Tracer::disabled();
    };
    let sink: Sink = Arc::new(move |req| {
        let store = store.clone();
        Box::pin(async move {
            store
                .ingest(req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    Tracer::start(ec, sink)
}

/// The trace store and the addresses its receivers bound.
struct Traces {
    store: meshwork_traces::TraceStore,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

/// Opens the trace store in `data_dir/traces` and serves OTLP/gRPC and
/// OTLP/HTTP on the configured addresses.
async fn start_traces(
    cfg: &NodeConfig,
    tls: Option<std::sync::Arc<meshwork_tls::TlsReloader>>,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Traces> {
    let grpc_listener = match cfg.otlp_grpc_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the OTLP/gRPC address {a}"))?,
        ),
        None => None,
    };
    let http_listener = match cfg.otlp_http_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the OTLP/HTTP address {a}"))?,
        ),
        None => None,
    };
    let mut tc = cfg.traces.clone();
    tc.dir = cfg.data_dir.join("traces");
    let dir = tc.dir.clone();
    let store = tokio::task::spawn_blocking(move || meshwork_traces::TraceStore::open(tc))
        .await
        .context("opening the trace store")?
        .with_context(|| format!("opening the trace store in {}", dir.display()))?;
    let mut out = Traces {
        store: store.clone(),
        grpc: None,
        http: None,
    };
    if let Some(l) = grpc_listener {
        out.grpc = Some(l.local_addr()?);
        let (s, rx) = (store.clone(), stop_rx.clone());
        // The [listen] limits of the HTTP port: connection slots, first bytes
        // within the header deadline, silent clients closed past the idle one.
        let limits = meshwork_etcd::ListenLimits {
            max_connections: cfg.listen.http_max_connections,
            max_concurrent_streams: cfg.listen.etcd_max_concurrent_streams,
            handshake_timeout: std::time::Duration::from_millis(cfg.listen.header_read_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(cfg.listen.idle_timeout_ms),
        };
        let grpc = meshwork_traces::GrpcLimits {
            max_concurrent_streams: limits.max_concurrent_streams,
            keepalive: (limits.idle_timeout / 3).max(std::time::Duration::from_millis(100)),
        };
        let served = match tls.clone() {
            Some(t) => {
                let incoming =
                    meshwork_etcd::server::limited_incoming_tls(l, limits, "otlp-grpc", t);
                tokio::spawn(meshwork_traces::serve_grpc_incoming(
                    incoming,
                    s,
                    grpc,
                    stopped(rx),
                ))
            }
            None => {
                let incoming = meshwork_etcd::server::limited_incoming(l, limits, "otlp-grpc");
                tokio::spawn(meshwork_traces::serve_grpc_incoming(
                    incoming,
                    s,
                    grpc,
                    stopped(rx),
                ))
            }
        };
        tasks.push(tokio::spawn(async move {
            if let Ok(Err(e)) = served.await {
                tracing::error!(error = %e, "OTLP/gRPC server failed");
            }
        }));
    }
    if let Some(l) = http_listener {
        out.http = Some(l.local_addr()?);
        let app = meshwork_traces::otlp::http_router(store.clone());
        let mut listen = cfg.listen.clone();
        listen.ingest = true;
        listen.max_body_bytes = cfg.traces.max_request_bytes;
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::listen::serve(l, app, listen, tls, stopped(rx)).await {
                tracing::error!(error = %e, "OTLP/HTTP server failed");
            }
        }));
    }
    Ok(out)
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
