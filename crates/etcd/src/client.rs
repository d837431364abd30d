//! A small etcd v3 client over the generated stubs, used by the CLI, the benchmarks
//! and the tests; it talks to Meshwork or to a real etcd alike.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::RwLock;
use tonic::codegen::{Service, http};
use tonic::transport::{Channel, Endpoint};

use crate::proto::etcdserverpb::{
    auth_client::AuthClient, cluster_client::ClusterClient, kv_client::KvClient,
    lease_client::LeaseClient, maintenance_client::MaintenanceClient, watch_client::WatchClient,
};
use crate::proto::v3electionpb::election_client::ElectionClient;
use crate::proto::v3lockpb::lock_client::LockClient;

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No endpoint was given.
    #[error("no endpoints given (expected HOST:PORT[,HOST:PORT...])")]
    NoEndpoints,
    /// An endpoint is not a valid address.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Invalid {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No endpoint could be reached.
    #[error("cannot reach any of {endpoints:?}: {reason}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The last error.
        reason: String,
    },
}

/// A user name and password for a store with auth on.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The credentials in `MESHWORK_STORE_USER` (`USER:PASSWORD`, as
    /// etcdctl's `--user`) or else in the file `MESHWORK_STORE_CREDENTIALS_FILE`
    /// names (the safer way: no password in the process's environment).
    pub fn from_env() -> Result<Option<Credentials>, String> {
        if let Ok(v) = std::env::var("MESHWORK_STORE_USER") {
            return Credentials::parse(&v)
                .map(Some)
                .ok_or_else(|| "MESHWORK_STORE_USER: expected USER:PASSWORD".to_string());
        }
        match std::env::var_os("MESHWORK_STORE_CREDENTIALS_FILE") {
            Some(path) => Credentials::from_file(std::path::Path::new(&path)).map(Some),
            None => Ok(None),
        }
    }

    /// Reads `USER:PASSWORD` from the first line of `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the credentials file {}: {e}", path.display()))?;
        Credentials::parse(text.lines().next().unwrap_or_default()).ok_or_else(|| {
            format!(
                "{}: expected USER:PASSWORD on the first line",
                path.display()
            )
        })
    }

    /// Reads `USER:PASSWORD` (surrounding whitespace ignored), as etcdctl's
    /// `--user` takes it.
    pub fn parse(s: &str) -> Option<Credentials> {
        let (user, password) = s.trim().split_once(':')?;
        (!user.is_empty()).then(|| Credentials {
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

/// TLS for a client: the authority to trust and, for mutual TLS, its own
/// certificate and key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates the server's certificate must chain to.
    pub ca_file: std::path::PathBuf,
    /// This client's certificate (mutual TLS).
    pub cert_file: Option<std::path::PathBuf>,
    /// This client's key (mutual TLS).
    pub key_file: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// From `MESHWORK_CACERT` (and `MESHWORK_CERT` / `MESHWORK_KEY` for
    /// mutual TLS); `None` when `MESHWORK_CACERT` is unset.
    pub fn from_env() -> Option<ClientTls> {
        let path = |v: &str| std::env::var_os(v).map(std::path::PathBuf::from);
        Some(ClientTls {
            ca_file: path("MESHWORK_CACERT")?,
            cert_file: path("MESHWORK_CERT"),
            key_file: path("MESHWORK_KEY"),
        })
    }

    /// The tonic configuration (files read now; errors name the file).
    pub fn tonic(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
        };
        let mut c = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read(&self.ca_file)?),
        );
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                c = c.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("a client certificate needs both its certificate and its key".into()),
        }
        Ok(c)
    }
}

/// The channel every service client of a [`Client`] sends on: a tonic
/// channel that adds the client's current auth token, if any, to each call.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    token: Arc<RwLock<Option<http::HeaderValue>>>,
}

impl Service<http::Request<tonic::body::Body>> for Conn {
    type Response = <Channel as Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Channel as Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // Never on a login: etcd checks a token sent with `Authenticate`
        // and refuses the login when that (old) token is no longer valid.
        if req.uri().path() != "/etcdserverpb.Auth/Authenticate"
            && let Some(t) = self.token.read().clone()
        {
            req.headers_mut().insert("token", t);
        }
        Service::call(&mut self.channel, req)
    }
}

/// Clients of every etcd v3 service on one channel.
#[derive(Clone)]
pub struct Client {
    /// KV service.
    pub kv: KvClient<Conn>,
    /// Watch service.
    pub watch: WatchClient<Conn>,
    /// Lease service.
    pub lease: LeaseClient<Conn>,
    /// Maintenance service.
    pub maintenance: MaintenanceClient<Conn>,
    /// Cluster service.
    pub cluster: ClusterClient<Conn>,
    /// Lock service.
    pub lock: LockClient<Conn>,
    /// Election service.
    pub election: ElectionClient<Conn>,
    /// Auth service.
    pub auth: AuthClient<Conn>,
    /// The token every call carries (shared by clones).
    token: Arc<RwLock<Option<http::HeaderValue>>>,
}

/// Turns `HOST:PORT` (or a URL) into an endpoint URL.
pub fn endpoint_url(ep: &str) -> String {
    endpoint_url_tls(ep, false)
}

/// [`endpoint_url`] with `https://` for a bare `HOST:PORT` when `tls`.
pub fn endpoint_url_tls(ep: &str, tls: bool) -> String {
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else if tls {
        format!("https://{ep}")
    } else {
        format!("http://{ep}")
    }
}

impl Client {
    /// Connects to the first reachable endpoint.
    pub async fn connect(endpoints: &[String]) -> Result<Client, ConnectError> {
        Client::connect_with(endpoints, None).await
    }

    /// [`connect`](Self::connect), over TLS when `tls` is given.
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<&ClientTls>,
    ) -> Result<Client, ConnectError> {
        if endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let mut last = String::new();
        for ep in endpoints {
            let url = endpoint_url_tls(ep.trim(), tls.is_some());
            let invalid = |reason: String| ConnectError::Invalid {
                endpoint: ep.clone(),
                reason,
            };
            let mut e = Endpoint::from_shared(url.clone())
                .map_err(|e| invalid(e.to_string()))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true);
            if let Some(t) = tls {
                e = e
                    .tls_config(t.tonic().map_err(invalid)?)
                    .map_err(|e| invalid(e.to_string()))?;
            }
            match e.connect().await {
                Ok(ch) => return Ok(Client::from_channel(ch)),
                Err(err) => last = format!("{url}: {err}"),
            }
        }
        Err(ConnectError::Unreachable {
            endpoints: endpoints.to_vec(),
            reason: last,
        })
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        let max = 64 * 1024 * 1024;
        let token = Arc::new(RwLock::new(None));
        let ch = Conn {
            channel,
            token: token.clone(),
        };
        Client {
            token,
            kv: KvClient::new(ch.clone()).max_decoding_message_size(max),
            watch: WatchClient::new(ch.clone()).max_decoding_message_size(max),
            lease: LeaseClient::new(ch.clone()),
            maintenance: MaintenanceClient::new(ch.clone()).max_decoding_message_size(max),
            cluster: ClusterClient::new(ch.clone()),
            lock: LockClient::new(ch.clone()),
            election: ElectionClient::new(ch.clone()),
            auth: AuthClient::new(ch),
        }
    }

    /// Logs in as `creds` and makes every later call (of this client and its
    /// clones) carry the token. On an error the old token, if any, stays.
    pub async fn authenticate(&self, creds: &Credentials) -> Result<(), tonic::Status> {
        let mut auth = self.auth.clone();
        let r = auth
            .authenticate(crate::proto::etcdserverpb::AuthenticateRequest {
                name: creds.user.clone(),
                password: creds.password.clone(),
            })
            .await?
            .into_inner();
        let mut value = http::HeaderValue::from_str(&r.token)
            .map_err(|_| tonic::Status::internal("the server sent a token that is not text"))?;
        // Never indexed by HPACK nor printed by http's Debug.
        value.set_sensitive(true);
        *self.token.write() = Some(value);
        Ok(())
    }

    /// Whether calls carry a token.
    pub fn has_token(&self) -> bool {
        self.token.read().is_some()
    }
}
