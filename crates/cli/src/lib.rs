//! `meshwork`: the microservice platform in one binary.
//!
//! The binary is thin: it parses the command line and config, wires the crates
//! together and reports errors (`anyhow` lives only here). All of it is this
//! library, whose one public item is [`main`]: `src/main.rs` calls it, and so
//! does the system tests' copy of the binary (`meshwork-system` in the
//! `tests/` package), which Cargo builds for that package's tests.

/// Writes a progress line (rewritten in place with `\r`) to stderr, only when
/// stderr is a terminal: logs and CI output get no carriage returns.
macro_rules! progress {
    ($($arg:tt)*) => {
        if crate::progress_on() {
            eprint!($($arg)*);
        }
    };
}

/// Ends a progress line started by `progress!` (nothing when progress is off).
macro_rules! progress_end {
    () => {
        if crate::progress_on() {
            eprintln!();
        }
    };
}

mod apitrace;
mod bench;
mod bench_coord;
mod bench_mq;
mod bench_traces;
mod bench_txn;
mod certcli;
mod config;
mod coordcli;
#[cfg(feature = "demo")]
mod demo;
/// Stand-in for a build without the demo shop (`--no-default-features`):
/// `--demo` is refused with the reason, nothing links SQLite.
#[cfg(not(feature = "demo"))]
mod demo {
    /// Never built: starting it says why.
    pub(crate) struct Shop;

    impl Shop {
        pub(crate) async fn start(
            _http: &str,
            _endpoints: &[String],
            _data_dir: &std::path::Path,
            _otlp_env: &[(&str, String)],
        ) -> anyhow::Result<Shop> {
            anyhow::bail!(
                "this meshwork was built without the demo shop (cargo feature `demo`, on by default)"
            )
        }

        pub(crate) async fn shutdown(self) {}
    }

    pub(crate) fn banner(_http: &str, _gateway: &str) -> String {
        String::new()
    }
}
mod gatewaycli;
mod http;
mod httpc;
mod kv;
mod listen;
mod mq_meta;
mod mqcli;
mod node;
mod output;
mod rolloutcli;
mod snapshotcli;
mod tokencli;
mod txncli;
mod usercli;

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use meshwork_store::StoreConfig;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::FileConfig;

/// Meshwork, the microservice platform for Rust, in one binary: an etcd-compatible
/// store, service registry and health checks, configuration center, locks, leader
/// election and IDs, an API gateway and a web console.
#[derive(Parser)]
#[command(
    name = "meshwork",
    bin_name = "meshwork",
    version,
    propagate_version = true
)]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(
        long,
        global = true,
        env = "MESHWORK_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from a config file, flags and MESHWORK_* variables.
    Server(ServerArgs),
    /// Start the whole single-node platform for a newcomer and print its endpoints.
    Up(UpArgs),
    /// Read, write, delete and watch keys (a small etcdctl).
    Kv(kv::KvArgs),
    /// Show the status of a node.
    Status(kv::StatusArgs),
    /// Service registry: register, list, discover, watch.
    Svc(coordcli::SvcArgs),
    /// Configuration center: publish, get, history, diff, rollback, listen.
    Config(coordcli::ConfigArgs),
    /// Distributed locks and elections.
    Lock(coordcli::LockArgs),
    /// Unique IDs.
    Id(coordcli::IdArgs),
    /// API gateway routes: apply a routes file, list, explain a URL.
    Gateway(gatewaycli::GatewayArgs),
    /// Distributed transactions (saga, TCC, 2PC): start, list, show, abort, retry.
    Txn(txncli::TxnArgs),
    /// This binary's version, git revision and commit date.
    Version,
    /// The HTTP API's bearer tokens: create (with scopes and a lifetime), list, revoke.
    Token(tokencli::TokenArgs),
    /// The console's users kept in the store: add, list, passwd, scopes, rm.
    User(usercli::UserArgs),
    /// Progressive delivery: canary and blue-green rollouts through the gateway,
    /// analysed against the stable version; promote, abort, pause, resume.
    Rollout(rolloutcli::RolloutArgs),
    /// A local certificate authority and certificates it signs (for TLS and mTLS).
    Cert(certcli::CertArgs),
    /// The message broker: topics, publish, subscribe, dead letters.
    Mq(mqcli::MqArgs),
    /// The demo shop: run one of its services, or drive orders through the gateway.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Backups in etcd's snapshot format: save from a node, restore into a data directory.
    Snapshot(snapshotcli::SnapshotArgs),
    /// Load generators.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Print a shell completion script: `meshwork completions bash > /etc/bash_completion.d/meshwork`.
    Completions {
        /// Shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `meshwork man > meshwork.1 && man ./meshwork.1`.
    Man,
}

/// Flags shared by `server` and `up`.
#[derive(Args, Clone)]
struct NodeArgs {
    /// TOML config file: [server], [store], [coord], [gateway], [console] and [listen] tables (README, "Running a node").
    #[arg(long, env = "MESHWORK_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "MESHWORK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// etcd v3 gRPC listen address (port 0 picks a free port) [default: 127.0.0.1:2479].
    #[arg(long, env = "MESHWORK_ETCD_ADDR")]
    etcd_addr: Option<String>,
    /// HTTP listen address: the API (/v1/...), the console, /healthz, /readyz, /metrics [default: 127.0.0.1:7070].
    #[arg(long, env = "MESHWORK_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Member name.
    #[arg(long, env = "MESHWORK_NAME")]
    name: Option<String>,
    /// Database quota in bytes; writes fail with "database space exceeded" past it.
    #[arg(long, env = "MESHWORK_QUOTA_BACKEND_BYTES")]
    quota_backend_bytes: Option<u64>,
    /// Largest request in bytes.
    #[arg(long, env = "MESHWORK_MAX_REQUEST_BYTES")]
    max_request_bytes: Option<usize>,
    /// Automatic compaction: a number of revisions to keep, or a duration (30m, 1h).
    #[arg(long, env = "MESHWORK_AUTO_COMPACTION_RETENTION")]
    auto_compaction_retention: Option<String>,
    /// Acknowledge writes before they are fsynced (loses acknowledged writes on a crash).
    #[arg(long, env = "MESHWORK_UNSAFE_NO_FSYNC")]
    unsafe_no_fsync: bool,
    /// Roles to run, comma-separated: `store` (the embedded etcd-compatible store),
    /// `coord` (registry, config center, locks, election, ids), `gateway` (the API
    /// gateway), `txn` (the distributed-transaction coordinator), `mq` (the
    /// message broker), `cache` (the Redis-compatible cache) and `traces` (the
    /// trace store and its OTLP receivers) [default: store,coord,txn,mq, plus
    /// gateway, cache and traces when their addresses are given].
    #[arg(long, env = "MESHWORK_ROLES")]
    roles: Option<String>,
    /// Run coordination on an external etcd cluster instead of the embedded store:
    /// `etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`. With a user, the node
    /// logs in (etcd auth) and renews its token; prefer `--store-credentials-file`
    /// to a password on the command line.
    #[arg(long, env = "MESHWORK_STORE")]
    store: Option<String>,
    /// Log in to the external etcd as `USER:PASSWORD` (as etcdctl's `--user`).
    #[arg(long, env = "MESHWORK_STORE_USER", hide_env_values = true)]
    store_user: Option<String>,
    /// File whose first line is `USER:PASSWORD` for the external etcd.
    #[arg(long, env = "MESHWORK_STORE_CREDENTIALS_FILE")]
    store_credentials_file: Option<PathBuf>,
    /// CA certificates to trust: talk TLS to the external etcd.
    #[arg(long, env = "MESHWORK_STORE_CACERT")]
    store_cacert: Option<PathBuf>,
    /// This node's client certificate for the external etcd (mutual TLS).
    #[arg(long, env = "MESHWORK_STORE_CERT", requires = "store_key")]
    store_cert: Option<PathBuf>,
    /// The key of --store-cert.
    #[arg(long, env = "MESHWORK_STORE_KEY", requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// API gateway listen address (enables the gateway role; port 0 picks a free
    /// port) [up: 127.0.0.1:8080].
    #[arg(long, env = "MESHWORK_GATEWAY_ADDR")]
    gateway_addr: Option<String>,
    /// Redis-compatible cache listen address (enables the cache role; port 0 picks a
    /// free port) [up: 127.0.0.1:6479].
    #[arg(long, env = "MESHWORK_CACHE_ADDR")]
    cache_addr: Option<String>,
    /// OTLP/gRPC listen address of the built-in trace store (enables the traces
    /// role; port 0 picks a free port) [up: 127.0.0.1:4317].
    #[arg(long, env = "MESHWORK_OTLP_GRPC_ADDR")]
    otlp_grpc_addr: Option<String>,
    /// OTLP/HTTP listen address (`POST /v1/traces`, protobuf or JSON) of the
    /// built-in trace store (enables the traces role; port 0 picks a free port)
    /// [up: 127.0.0.1:4318].
    #[arg(long, env = "MESHWORK_OTLP_HTTP_ADDR")]
    otlp_http_addr: Option<String>,
    /// Send this node's spans (the gateway's and the transaction
    /// coordinator's; with `--demo`, the shop's too) to this OTLP collector,
    /// `http://HOST:PORT` or `https://HOST:PORT` (the collector verified against
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE` or the system's roots), instead of the
    /// built-in trace store; the protocol is `OTEL_EXPORTER_OTLP_PROTOCOL`
    /// (`http/protobuf`, the default, or `grpc`); gzip with
    /// `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`.
    /// Without it, `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is used when set.
    #[arg(long, env = "MESHWORK_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Tokens the store's `Authenticate` issues once auth is on (`etcdctl auth
    /// enable`): `simple` (random, held in memory, lost on restart) or `jwt`
    /// (HS256, signed with a key generated on first start and kept in the data
    /// directory, or read from `--auth-jwt-key-file`) [default: simple].
    #[arg(long, env = "MESHWORK_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// Seconds a store auth token stays valid (a simple token: since its last use)
    /// [default: 300].
    #[arg(long, env = "MESHWORK_AUTH_TOKEN_TTL")]
    auth_token_ttl: Option<u64>,
    /// File holding the HS256 key (at least 32 bytes) for `--auth-token jwt`.
    #[arg(long, env = "MESHWORK_AUTH_JWT_KEY_FILE")]
    auth_jwt_key_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the etcd, HTTP and OTLP ports (with
    /// --tls-key); reloaded when the file changes.
    #[arg(long, env = "MESHWORK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MESHWORK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: every client must present a certificate signed by
    /// one (mutual TLS); on the etcd port a client without a token is the
    /// user its certificate's common name names, as etcd's --client-cert-auth.
    #[arg(long, env = "MESHWORK_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Directory of a certificate authority (ca.pem, ca-key.pem: `meshwork
    /// cert init`) this node issues service certificates from: services
    /// connecting with MESHWORK_IDENTITY=1 get one naming them and talk
    /// mutual TLS [up --tls: the authority it makes].
    #[arg(long, env = "MESHWORK_IDENTITY_CA")]
    identity_ca: Option<PathBuf>,
    /// Seconds a service certificate is valid (renewed at half its life),
    /// 60 to 2592000 [default: 86400].
    #[arg(long, env = "MESHWORK_IDENTITY_TTL")]
    identity_ttl: Option<u64>,
    /// Master key that encrypts secret config entries at rest: a file of 32
    /// bytes, raw, as 64 hex digits or in base64 (`MESHWORK_SECRETS_KEY` gives
    /// it inline). Without one, secret entries can be neither published nor
    /// read [up: generated once as secrets.key in the data directory].
    #[arg(long, env = "MESHWORK_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// The master key being replaced, while rotating to a new one (start with
    /// the new key and this, run `meshwork config rotate-keys`, then drop it).
    #[arg(long, env = "MESHWORK_SECRETS_PREVIOUS_KEY_FILE")]
    secrets_previous_key_file: Option<PathBuf>,
    /// Start even though a listener that takes commands is bound to a
    /// non-loopback address without authentication (the HTTP API without a
    /// console password, the etcd port without store auth, the cache without
    /// a password). Without it such a node refuses to start.
    #[arg(long, env = "MESHWORK_INSECURE_ALLOW_OPEN")]
    insecure_allow_open: bool,
    /// Gateway worker threads (one accept loop and runtime each) [default: cores].
    #[arg(long, env = "MESHWORK_GATEWAY_WORKERS")]
    gateway_workers: Option<usize>,
    /// Membership session TTL in seconds: a dead node's health checks move to the
    /// others within this plus one check interval [default: 10].
    #[arg(long, env = "MESHWORK_NODE_TTL")]
    node_ttl: Option<i64>,
    /// Also start the demo shop (order, inventory and payment services as child
    /// processes, their gateway routes and the payments flag); needs the gateway.
    #[arg(long)]
    demo: bool,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Use a throw-away temporary data directory, removed on exit.
    #[arg(long)]
    ephemeral: bool,
    /// TLS on every listener with a certificate from a local authority made
    /// in DATA_DIR/tls on first use (unless --tls-cert is given).
    #[arg(long)]
    tls: bool,
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder's handle (installed once).
pub(crate) fn metrics_handle() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let handle = meshwork_telemetry::metrics::builder()
                .install_recorder()
                .ok();
            // Help texts go to the recorder just installed.
            meshwork_telemetry::metrics::describe_all();
            handle
        })
        .clone()
}

/// The log filter's source: `RUST_LOG`, as every Rust program reads it, with
/// `MESHWORK_LOG` as an alias that wins when both are set; `info` otherwise.
fn log_filter() -> tracing_subscriber::EnvFilter {
    ["MESHWORK_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        })
        .unwrap_or_else(|| "info".into())
}

/// Whether progress lines are drawn: only when stderr is a terminal.
pub(crate) fn progress_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal()
    })
}

/// Colour on a terminal only, and never when `NO_COLOR` is set (no-color.org).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Logs to stderr (text or JSON; a line inside a request's span carries the
/// span's `trace_id` and `span_id`), and keeps the lines written inside
/// traced spans for the trace view (`meshwork_telemetry::logs`).
fn init_tracing(format: &str) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    // The ring sees INFO and above inside traced spans whatever the printed
    // level is (the request spans are INFO: a `warn` filter must not hide them).
    let registry = tracing_subscriber::registry().with(
        meshwork_telemetry::logs::TraceLogLayer::global(meshwork_telemetry::logs::DEFAULT_LINES)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
    );
    if format == "json" {
        registry.with(fmt.json().with_filter(log_filter())).init()
    } else {
        registry.with(fmt.with_filter(log_filter())).init()
    }
}

fn resolve(args: &NodeArgs, default_dir: PathBuf) -> Result<node::NodeConfig> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut store = StoreConfig::default();
    file.store.apply(&mut store)?;
    if let Some(q) = args.quota_backend_bytes {
        store.quota_bytes = q;
    }
    if let Some(m) = args.max_request_bytes {
        store.max_request_bytes = m;
        store.max_value_bytes = store.max_value_bytes.min(m);
    }
    if let Some(r) = &args.auto_compaction_retention {
        config::apply_retention(&mut store, config::parse_retention(r)?);
    }
    if args.unsafe_no_fsync {
        store.fsync = false;
    }
    store.validate()?;
    let (external, mut store_credentials) = match args.store.as_ref().or(file.server.store.as_ref())
    {
        Some(s) => config::parse_store_url(s)?,
        None => (Vec::new(), None),
    };
    if let Some(u) = &args.store_user {
        store_credentials = Some(
            meshwork_etcd::client::Credentials::parse(u)
                .context("--store-user: expected USER:PASSWORD")?,
        );
    }
    if let Some(p) = &args.store_credentials_file {
        store_credentials =
            Some(meshwork_etcd::client::Credentials::from_file(p).map_err(anyhow::Error::msg)?);
    }
    if store_credentials.is_some() && external.is_empty() {
        anyhow::bail!(
            "--store-user and --store-credentials-file log in to an external etcd: give --store etcd://... too"
        );
    }
    let gateway_addr = args
        .gateway_addr
        .clone()
        .or(file.server.gateway_addr.clone())
        .map(|a| config::parse_addr("gateway address", &a))
        .transpose()?;
    let cache_addr = args
        .cache_addr
        .clone()
        .or(file.server.cache_addr.clone())
        .map(|a| config::parse_addr("cache address", &a))
        .transpose()?;
    let otlp_grpc_addr = args
        .otlp_grpc_addr
        .clone()
        .or(file.server.otlp_grpc_addr.clone())
        .map(|a| config::parse_addr("OTLP/gRPC address", &a))
        .transpose()?;
    let otlp_http_addr = args
        .otlp_http_addr
        .clone()
        .or(file.server.otlp_http_addr.clone())
        .map(|a| config::parse_addr("OTLP/HTTP address", &a))
        .transpose()?;
    let roles = config::parse_roles(
        args.roles.as_deref().or(file.server.roles.as_deref()),
        !external.is_empty(),
        gateway_addr.is_some(),
        cache_addr.is_some(),
        otlp_grpc_addr.is_some() || otlp_http_addr.is_some(),
    )?;
    let gateway = file.gateway.clone().unwrap_or_default();
    gateway
        .validate()
        .map_err(|e| anyhow::anyhow!("[gateway] table: {e}"))?;
    let mut coord = meshwork_coord::CoordOptions::default();
    file.coord.apply(&mut coord)?;
    if let Some(t) = args.node_ttl {
        coord.node_ttl = t;
    }
    config::validate_coord(&coord)?;
    coord.config.secret_keys = secret_keys(args)?;
    coord.backend.credentials = store_credentials;
    coord.backend.tls = args
        .store_cacert
        .clone()
        .map(|ca_file| meshwork_etcd::client::ClientTls {
            ca_file,
            cert_file: args.store_cert.clone(),
            key_file: args.store_key.clone(),
        });
    let etcd = args
        .etcd_addr
        .clone()
        .or(file.server.etcd_addr.clone())
        .unwrap_or_else(|| "127.0.0.1:2479".into());
    let http = args
        .http_addr
        .clone()
        .or(file.server.http_addr.clone())
        .unwrap_or_else(|| "127.0.0.1:7070".into());
    let mq = file.mq.config(store.fsync)?;
    let mut cache = file.cache.config()?;
    let traces = file.traces.config(store.fsync)?;
    Ok(node::NodeConfig {
        name: args
            .name
            .clone()
            .or(file.server.name.clone())
            .unwrap_or_else(|| "meshwork".into()),
        data_dir: args
            .data_dir
            .clone()
            .or(file.server.data_dir.clone())
            .unwrap_or(default_dir),
        etcd_addr: config::parse_addr("etcd address", &etcd)?,
        http_addr: config::parse_addr("HTTP address", &http)?,
        store,
        external,
        coord,
        roles,
        gateway_addr,
        gateway,
        gateway_workers: args.gateway_workers,
        cache_addr,
        otlp_grpc_addr,
        otlp_http_addr,
        otlp_endpoint: meshwork_telemetry::export::Endpoint::from_env(
            args.otlp_endpoint.as_deref(),
        )?,
        traces,
        console_auth: console_auth(&file.console)?,
        protect_reads: file.console.protect_reads.unwrap_or(false),
        token_rate_per_sec: file.console.token_rate_per_sec.unwrap_or(200),
        tls: args
            .tls_cert
            .clone()
            .zip(args.tls_key.clone())
            .map(|(cert, key)| meshwork_tls::TlsConfig {
                cert_file: cert,
                key_file: key,
                client_ca_file: args.tls_client_ca.clone(),
            }),
        insecure_allow_open: args.insecure_allow_open,
        identity: match &args.identity_ca {
            Some(dir) => {
                let ttl = args.identity_ttl.unwrap_or(86_400);
                if !(60..=2_592_000).contains(&ttl) {
                    anyhow::bail!(
                        "--identity-ttl {ttl}: give 60 to 2592000 seconds (a minute to 30 days)"
                    );
                }
                Some((dir.clone(), std::time::Duration::from_secs(ttl)))
            }
            None => None,
        },
        store_auth: store_auth(args)?,
        txn: file.txn.options()?,
        mq,
        listen: {
            let mut l = file.listen.clone();
            l.validate()?;
            if let Some(nofile) = listen::raise_nofile_limit() {
                l.fit_to(nofile, roles.cache.then_some(&mut cache.max_clients));
            }
            l
        },
        cache,
    })
}

/// The master keys of secret config entries: `MESHWORK_SECRETS_KEY` or
/// `--secrets-key-file`, then `--secrets-previous-key-file`.
fn secret_keys(args: &NodeArgs) -> Result<meshwork_coord::config::secret::MasterKeys> {
    meshwork_coord::config::secret::MasterKeys::load(
        args.secrets_key_file.as_deref(),
        args.secrets_previous_key_file.as_deref(),
    )
    .context("--secrets-key-file / --secrets-previous-key-file")
}

/// `<data>/secrets.key`, made (mode 0600) on first use: `meshwork up`'s master
/// key when none is given. Kept beside the data, it guards against a leaked
/// store snapshot or backup, not a leaked data directory.
fn local_secrets_key(data_dir: &std::path::Path) -> Result<PathBuf> {
    let path = data_dir.join("secrets.key");
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let key = meshwork_coord::config::secret::MasterKey::generate_text()?;
        let mut f = std::fs::OpenOptions::new();
        f.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
        let mut file = f
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut file, format!("{key}\n").as_bytes())?;
        file.sync_all()?;
    }
    Ok(path)
}

/// The store's auth settings from `--auth-token`, `--auth-token-ttl` and
/// `--auth-jwt-key-file`.
fn store_auth(args: &NodeArgs) -> Result<meshwork_etcd::auth::AuthConfig> {
    use meshwork_etcd::auth::{AuthConfig, TokenKind};
    let mut cfg = AuthConfig::default();
    match args.auth_token.as_deref() {
        None | Some("simple") => {}
        Some("jwt") => cfg.token = TokenKind::Jwt,
        Some(other) => anyhow::bail!("--auth-token {other:?}: expected `simple` or `jwt`"),
    }
    if let Some(ttl) = args.auth_token_ttl {
        anyhow::ensure!(
            (1..=31_536_000).contains(&ttl),
            "--auth-token-ttl {ttl}: expected 1 to 31536000 seconds"
        );
        cfg.token_ttl = std::time::Duration::from_secs(ttl);
    }
    if let Some(path) = &args.auth_jwt_key_file {
        let key = std::fs::read(path)
            .with_context(|| format!("reading the JWT key file {}", path.display()))?;
        anyhow::ensure!(
            key.len() >= 32,
            "{}: a JWT key needs at least 32 bytes, found {}",
            path.display(),
            key.len()
        );
        cfg.jwt_key = Some(key);
    }
    Ok(cfg)
}

/// The console login from `[console]` and `MESHWORK_CONSOLE_USER`/`_PASSWORD`.
fn console_auth(file: &config::ConsoleFile) -> Result<Option<meshwork_console::Auth>> {
    let password = std::env::var("MESHWORK_CONSOLE_PASSWORD")
        .ok()
        .or(file.password.clone());
    let Some(password) = password else {
        return Ok(None);
    };
    let user = std::env::var("MESHWORK_CONSOLE_USER")
        .ok()
        .or(file.user.clone())
        .unwrap_or_else(|| "admin".into());
    meshwork_console::Auth::new(&user, &password)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("[console] table: {e}"))
}

async fn run_server(args: ServerArgs) -> Result<()> {
    let cfg = resolve(&args.node, PathBuf::from("meshwork-data"))?;
    let external = cfg.external.clone();
    let data_dir = cfg.data_dir.clone();
    let running = node::start(cfg).await?;
    match running.etcd_addr {
        Some(a) => println!("etcd gRPC: {a}"),
        None => println!(
            "etcd gRPC: none (coordination on etcd://{})",
            external.join(",")
        ),
    }
    println!(
        "HTTP: {}://{}",
        if running.tls { "https" } else { "http" },
        running.http_addr
    );
    if let Some(g) = running.gateway_addr {
        println!("Gateway: http://{g}");
    }
    if let Some(c) = running.cache_addr {
        println!(
            "Cache: {}://{c}",
            if running.tls { "rediss" } else { "redis" }
        );
    }
    if let Some(a) = running.otlp_grpc_addr {
        println!("OTLP gRPC: {a}");
    }
    if let Some(a) = running.otlp_http_addr {
        println!(
            "OTLP HTTP: {}://{a}",
            if running.tls { "https" } else { "http" }
        );
    }
    let shop = start_demo(&args.node, &running, &external, &data_dir).await?;
    if shop.is_some() {
        println!("Demo: up");
    }
    node::shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(s) = shop {
        s.shutdown().await;
    }
    running.shutdown().await;
    Ok(())
}

async fn run_up(args: UpArgs) -> Result<()> {
    let temp = if args.ephemeral {
        Some(
            tempfile::Builder::new()
                .prefix("meshwork-")
                .tempdir()
                .context("creating a temporary data directory")?,
        )
    } else {
        None
    };
    let default_dir = temp
        .as_ref()
        .map(|t| t.path().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("meshwork-data"));
    let mut node_args = args.node.clone();
    if node_args.gateway_addr.is_none() {
        node_args.gateway_addr = Some("127.0.0.1:8080".into());
    }
    if node_args.cache_addr.is_none() {
        node_args.cache_addr = Some("127.0.0.1:6479".into());
    }
    if node_args.otlp_grpc_addr.is_none() && node_args.otlp_http_addr.is_none() {
        node_args.otlp_grpc_addr = Some("127.0.0.1:4317".into());
        node_args.otlp_http_addr = Some("127.0.0.1:4318".into());
    }
    if temp.is_some() {
        node_args.data_dir = Some(default_dir.clone());
    }
    if args.tls && node_args.tls_cert.is_none() {
        // A local authority and a node certificate, made once per data dir.
        let dir = node_args
            .data_dir
            .clone()
            .unwrap_or_else(|| default_dir.clone())
            .join("tls");
        if !dir.join("ca.pem").exists() {
            certcli::init(&dir, 10)?;
        }
        if !dir.join("node.pem").exists() {
            certcli::issue(&dir, "node", &[], false, 365)?;
        }
        node_args.tls_cert = Some(dir.join("node.pem"));
        node_args.tls_key = Some(dir.join("node-key.pem"));
        // The same authority issues the services' certificates.
        if node_args.identity_ca.is_none() {
            node_args.identity_ca = Some(dir.clone());
        }
    }

    let mut cfg = resolve(&node_args, default_dir)?;
    if cfg.coord.config.secret_keys.0.is_empty() {
        let path = local_secrets_key(&cfg.data_dir)?;
        cfg.coord.config.secret_keys = meshwork_coord::config::secret::MasterKeys(vec![
            meshwork_coord::config::secret::MasterKey::from_file(&path)?,
        ]);
    }
    let data_dir = cfg.data_dir.clone();
    if !cfg.external.is_empty() {
        anyhow::bail!(
            "`meshwork up` runs the embedded store; use `meshwork server --store etcd://...` for an external cluster"
        );
    }
    let running = node::start(cfg).await?;
    let etcd = running
        .etcd_addr
        .context("the embedded store has no etcd address")?;
    let http = running.http_addr;
    println!("etcd gRPC: {etcd}");
    println!(
        "HTTP: {}://{http}",
        if running.tls { "https" } else { "http" }
    );
    if let Some(g) = running.gateway_addr {
        println!("Gateway: http://{g}");
    }
    if let Some(c) = running.cache_addr {
        println!(
            "Cache: {}://{c}",
            if running.tls { "rediss" } else { "redis" }
        );
    }
    if let Some(a) = running.otlp_grpc_addr {
        println!("OTLP gRPC: {a}");
    }
    if let Some(a) = running.otlp_http_addr {
        println!(
            "OTLP HTTP: {}://{a}",
            if running.tls { "https" } else { "http" }
        );
    }
    println!();
    println!("Meshwork is up (single node).");
    println!(
        "  data dir   {}{}",
        data_dir.display(),
        if temp.is_some() {
            " (ephemeral: removed on exit)"
        } else {
            ""
        }
    );
    println!(
        "  security   HTTP API {}; store auth {}; listeners on loopback only",
        if running.http_auth {
            "needs a token or the console login (meshwork token create)"
        } else {
            "open (set MESHWORK_CONSOLE_PASSWORD to require tokens)"
        },
        if running.store_auth {
            "on"
        } else {
            "off (etcdctl user add root; etcdctl auth enable)"
        }
    );
    if running.tls
        && let Some(cert) = &node_args.tls_cert
    {
        let ca = cert.with_file_name("ca.pem");
        println!(
            "  tls        every listener speaks TLS; trust {}:",
            ca.display()
        );
        println!(
            "               export MESHWORK_CACERT={} MESHWORK_HTTP=https://{http}   (meshwork and the SDK)",
            ca.display()
        );
        println!(
            "               etcdctl --endpoints https://{etcd} --cacert {} get greeting;  curl --cacert {} https://{http}/readyz",
            ca.display(),
            ca.display()
        );
    }
    println!("  store      etcd v3 API on {etcd}");
    println!("               meshwork kv --endpoints {etcd} put greeting hello");
    println!("               meshwork kv --endpoints {etcd} get greeting");
    println!("               ETCDCTL_API=3 etcdctl --endpoints {etcd} get greeting");
    println!(
        "  registry   meshwork svc --http {http} register orders --address 127.0.0.1 --port 9000 --persistent"
    );
    println!("               curl 'http://{http}/v1/services/orders/instances?healthy=true'");
    println!(
        "  config     meshwork config --http {http} publish public/DEFAULT_GROUP/app.toml --format toml --file app.toml"
    );
    println!(
        "  locks/ids  meshwork lock --http {http} acquire jobs;  meshwork id --http {http} next --count 5"
    );
    if running.has_mq() {
        println!("  messaging  meshwork mq --http {http} topic create orders --partitions 3");
        println!(
            "               meshwork mq --http {http} pub orders hello;  meshwork mq --http {http} sub orders --group g --from earliest"
        );
    }
    if let Some(c) = running.cache_addr {
        println!(
            "  cache      redis-cli -p {} set greeting hello;  redis-cli -p {} get greeting",
            c.port(),
            c.port()
        );
    }
    if let Some(a) = running.otlp_http_addr.or(running.otlp_grpc_addr) {
        let how = match running.otlp_http_addr {
            Some(h) => format!("OTEL_EXPORTER_OTLP_ENDPOINT=http://{h}"),
            None => {
                format!("OTEL_EXPORTER_OTLP_ENDPOINT=http://{a} OTEL_EXPORTER_OTLP_PROTOCOL=grpc")
            }
        };
        println!("  traces     {how}   (any OpenTelemetry SDK)");
        println!(
            "               curl 'http://{http}/v1/traces?limit=5';  console http://{http}/ui/traces"
        );
    }
    println!("  API        curl http://{http}/openapi.json");
    if let Some(g) = running.gateway_addr {
        println!(
            "  gateway    meshwork gateway --http {http} apply -f routes.toml   (then curl http://{g}/...)"
        );
        println!(
            "               meshwork gateway --http {http} routes;  meshwork gateway --http {http} explain http://{g}/api/x"
        );
    }
    println!("  console    http://{http}/");
    println!("  health     curl http://{http}/readyz");
    println!("  metrics    curl http://{http}/metrics");
    let shop = start_demo(&args.node, &running, &[], &data_dir).await?;
    if let (Some(_), Some(g)) = (&shop, running.gateway_addr) {
        println!("{}", demo::banner(&http.to_string(), &g.to_string()));
    }
    println!();
    println!("Press Ctrl-C to stop.");
    node::shutdown_signal().await;
    if let Some(s) = shop {
        s.shutdown().await;
    }
    running.shutdown().await;
    drop(temp);
    Ok(())
}

/// Starts the demo shop when `--demo` was given.
async fn start_demo(
    args: &NodeArgs,
    running: &node::Running,
    external: &[String],
    data_dir: &std::path::Path,
) -> Result<Option<demo::Shop>> {
    if !args.demo {
        return Ok(None);
    }
    if running.gateway_addr.is_none() {
        anyhow::bail!("--demo needs the gateway: add --gateway-addr HOST:PORT");
    }
    let endpoints = match running.etcd_addr {
        Some(a) => vec![a.to_string()],
        None => external.to_vec(),
    };
    // The services send their spans where the node sends its own.
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let otlp_env: Vec<(&str, String)> = match (&args.otlp_endpoint, configured) {
        (Some(url), _) => vec![("OTEL_EXPORTER_OTLP_ENDPOINT", url.clone())],
        (None, true) => Vec::new(),
        (None, false) => match (running.otlp_http_addr, running.otlp_grpc_addr) {
            (Some(h), _) => vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{h}")),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
            ],
            (None, Some(g)) => vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{g}")),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
            ],
            (None, None) => Vec::new(),
        },
    };
    let shop = demo::Shop::start(
        &running.http_addr.to_string(),
        &endpoints,
        data_dir,
        &otlp_env,
    )
    .await
    .context("starting the demo shop")?;
    Ok(Some(shop))
}

/// `meshwork 0.1.0 (git 0123456789ab, 2026-12-07)`: the version, the git
/// revision and its commit date the binary was built from.
pub(crate) fn version_line() -> String {
    format!(
        "meshwork {} (git {}, {})",
        env!("CARGO_PKG_VERSION"),
        env!("MESHWORK_GIT_REV"),
        env!("MESHWORK_GIT_DATE")
    )
}

/// The `meshwork` command line: parses the arguments and runs the command.
///
/// An error is the user's to act on (a bad flag value, an unreachable node,
/// an invalid config), so it is printed as one line with its causes and no
/// backtrace, whatever `RUST_BACKTRACE` says, and the exit code is 1. Panics
/// (our bugs) keep Rust's report and its backtrace. Usage and help say
/// `meshwork` whatever the executable file is called.
pub fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not
/// an error, as for any Unix filter.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "meshwork", &mut out);
            return write_stdout(&out);
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("rendering the man page")?;
            return write_stdout(&out);
        }
        _ => {}
    }
    init_tracing(&cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Server(a) => {
                metrics_handle();
                run_server(a).await
            }
            Command::Up(a) => {
                metrics_handle();
                run_up(a).await
            }
            Command::Kv(a) => kv::run(a).await,
            Command::Status(a) => kv::status(a).await,
            Command::Svc(a) => coordcli::svc(a).await,
            Command::Config(a) => coordcli::config(a).await,
            Command::Lock(a) => coordcli::lock(a).await,
            Command::Id(a) => coordcli::id(a).await,
            Command::Gateway(a) => gatewaycli::run(a).await,
            Command::Txn(a) => txncli::run(a).await,
            Command::Token(a) => tokencli::run(a).await,
            Command::User(a) => usercli::run(a).await,
            Command::Rollout(a) => rolloutcli::run(a).await,
            Command::Version => {
                println!("{}", version_line());
                Ok(())
            }
            Command::Cert(a) => certcli::run(a),
            Command::Mq(a) => mqcli::run(a).await,
            #[cfg(feature = "demo")]
            Command::Demo(a) => demo::run(a).await,
            Command::Snapshot(a) => snapshotcli::run(a).await,
            Command::Bench { what } => bench::run(what).await,
            Command::Completions { .. } | Command::Man => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
