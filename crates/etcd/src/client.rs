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
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

impl Client {
    /// Connects to the first reachable endpoint.
    pub async fn connect(endpoints: &[String]) -> Result<Client, ConnectError> {
        if endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let mut last = String::new();
        for ep in endpoints {
            let url = endpoint_url(ep.trim());
            let e = Endpoint::from_shared(url.clone())
                .map_err(|e| ConnectError::Invalid {
                    endpoint: ep.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true);
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
