//! A small etcd v3 client over the generated stubs, used by the CLI, the benchmarks
//! and the tests; it talks to Meshwork or to a real etcd alike.

use std::time::Duration;

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

/// Clients of every etcd v3 service on one channel.
#[derive(Clone)]
pub struct Client {
    /// KV service.
    pub kv: KvClient<Channel>,
    /// Watch service.
    pub watch: WatchClient<Channel>,
    /// Lease service.
    pub lease: LeaseClient<Channel>,
    /// Maintenance service.
    pub maintenance: MaintenanceClient<Channel>,
    /// Cluster service.
    pub cluster: ClusterClient<Channel>,
    /// Lock service.
    pub lock: LockClient<Channel>,
    /// Election service.
    pub election: ElectionClient<Channel>,
    /// Auth service.
    pub auth: AuthClient<Channel>,
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
    pub fn from_channel(ch: Channel) -> Client {
        let max = 64 * 1024 * 1024;
        Client {
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
}
