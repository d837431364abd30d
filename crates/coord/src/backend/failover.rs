//! Running a call on the current endpoint, and failing over: a call that meets
//! `Unavailable`, a transport error or no answer within the request timeout moves the
//! backend to the next reachable endpoint and retries, for at most
//! [`BackendOptions::retry_for`]. A call that still fails says why in an operator's
//! words (no quorum, unreachable, overloaded), asking the member itself when it
//! timed out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use meshwork_etcd::Client;
use meshwork_etcd::proto::etcdserverpb as pb;
use tonic::Code;

use super::{Backend, BackendOptions, Current};
use crate::error::{CoordError, Result};

/// Whether a failed call may succeed on another endpoint.
fn retryable(s: &tonic::Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        // Transport failures surface as Unknown with an h2/hyper message.
        Code::Unknown => {
            let m = s.message();
            m.contains("transport") || m.contains("connection") || m.contains("h2")
        }
        _ => false,
    }
}

/// Whether the store refused a call for its token: expired, revoked, or
/// issued before a change to users and roles (etcd's two answers).
fn token_refused(s: &tonic::Status) -> bool {
    (s.code() == Code::Unauthenticated && s.message().contains("invalid auth token"))
        || (s.code() == Code::InvalidArgument
            && s.message().contains("revision of auth store is old"))
}

/// Time kept at the end of a call's deadline to find out why it failed.
const DIAGNOSIS_TIME: Duration = Duration::from_millis(500);

/// What a retryable failure means, in the words an operator acts on: the
/// cluster has no leader (no quorum), the endpoint cannot be reached, or it
/// sheds load; etcd's own message follows.
fn describe_failure(s: &tonic::Status) -> String {
    let m = s.message();
    let what = if m.contains("no leader")
        || m.contains("leader changed")
        || m.contains("request timed out")
        || m.contains("not capable")
    {
        "no quorum: the etcd cluster has no leader"
    } else if s.code() == Code::ResourceExhausted || m.contains("too many requests") {
        "overloaded: the etcd member sheds load"
    } else if s.code() == Code::Unavailable
        || s.code() == Code::Unknown
        || s.code() == Code::Cancelled
    {
        "unreachable: the etcd endpoint did not take the request"
    } else {
        "failed"
    };
    format!("{what} ({:?}: {m})", s.code())
}

/// A failed login, in terms an operator acts on.
fn login_error(creds: &meshwork_etcd::client::Credentials, s: tonic::Status) -> CoordError {
    CoordError::Invalid(format!(
        "logging in to etcd as user {:?} failed: {} (check --store's user and password or the credentials file)",
        creds.user,
        s.message()
    ))
}

/// A failure no other endpoint would change, in the caller's terms.
fn backend_error(s: tonic::Status) -> CoordError {
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            CoordError::Invalid(s.message().to_string())
        }
        Code::NotFound => CoordError::NotFound(s.message().to_string()),
        _ => CoordError::Backend(format!("{:?}: {}", s.code(), s.message())),
    }
}

impl Backend {
    /// Moves to the next reachable endpoint unless someone already moved past `seen`.
    pub(super) async fn failover(&self, seen: u64) {
        let _g = self.inner.reconnect.lock().await;
        let cur = self.current();
        if cur.generation != seen {
            return;
        }
        let n = self.inner.endpoints.len();
        match connect_from(&self.inner.endpoints, (cur.index + 1) % n, &self.inner.opts).await {
            Ok((index, client)) => {
                if index != cur.index {
                    tracing::warn!(from = %self.inner.endpoints[cur.index], to = %self.inner.endpoints[index], "etcd endpoint failover");
                }
                *self.inner.current.write() = Arc::new(Current::new(index, seen + 1, client));
            }
            Err(e) => tracing::warn!(error = %e, "no etcd endpoint reachable; retrying"),
        }
    }

    /// Why a request to `cur` got no answer: the member's own `Status` tells
    /// a member without a leader (no quorum) from a slow one; no status at
    /// all means it is unreachable.
    async fn diagnose(&self, cur: &Current, timed_out: String) -> String {
        let ep = &self.inner.endpoints[cur.index];
        let mut m = cur.client.maintenance.clone();
        match tokio::time::timeout(DIAGNOSIS_TIME, m.status(pb::StatusRequest {})).await {
            Ok(Ok(s)) if s.get_ref().leader == 0 => {
                format!("no quorum: etcd member {ep} answers but has no leader ({timed_out})")
            }
            Ok(Ok(s)) => format!(
                "{timed_out}; etcd member {ep} is up with leader {:x}: the cluster is slow to commit",
                s.get_ref().leader
            ),
            Ok(Err(e)) => format!("{timed_out}; etcd member {ep}: {}", describe_failure(&e)),
            Err(_) => format!("unreachable: etcd member {ep} does not answer ({timed_out})"),
        }
    }

    /// Runs `f` on the current endpoint, failing over and retrying on availability errors.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.opts.retry_for;
        let mut backoff = Duration::from_millis(20);
        let mut relogged = false;
        loop {
            let cur = self.current();
            // No attempt outlives the call's deadline (less a moment to say why).
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = self
                .inner
                .opts
                .request_timeout
                .min(left - (left / 4).min(DIAGNOSIS_TIME))
                .max(Duration::from_millis(1));
            let (err, timed_out) = match tokio::time::timeout(limit, f(cur.client.clone())).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                // An expired token: log in again once and retry at once.
                Ok(Err(s)) if token_refused(&s) && !relogged => {
                    if let Some(creds) = &self.inner.opts.credentials {
                        relogged = true;
                        tracing::debug!(error = %s, "etcd token refused; logging in again");
                        if let Err(e) = cur.client.authenticate(creds).await {
                            return Err(login_error(creds, e));
                        }
                        continue;
                    }
                    return Err(backend_error(s));
                }
                Ok(Err(s)) if !retryable(&s) => return Err(backend_error(s)),
                Ok(Err(s)) => (describe_failure(&s), false),
                Err(_) => (
                    format!("timed out: no answer within {} ms", limit.as_millis()),
                    true,
                ),
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                let err = if timed_out {
                    self.diagnose(&cur, err).await
                } else {
                    err
                };
                return Err(CoordError::Unavailable(format!(
                    "{} (endpoints {:?})",
                    err, self.inner.endpoints
                )));
            }
            tracing::debug!(error = %err, "etcd call failed; failing over");
            self.failover(cur.generation).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

pub(super) async fn connect_from(
    endpoints: &[String],
    start: usize,
    opts: &BackendOptions,
) -> Result<(usize, Client)> {
    let n = endpoints.len();
    let mut last = String::new();
    for i in 0..n {
        let index = (start + i) % n;
        if let Some(name) = meshwork_etcd::inproc::name_of(&endpoints[index]) {
            let ep = meshwork_etcd::inproc::endpoint()
                .connect_timeout(opts.connect_timeout)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            match meshwork_etcd::inproc::channel(name, ep).await {
                Ok(ch) => return Ok((index, Client::from_channel(ch))),
                Err(e) => {
                    last = format!("{}: {e}", endpoints[index]);
                    continue;
                }
            }
        }
        let url = meshwork_etcd::client::endpoint_url_tls(&endpoints[index], opts.tls.is_some());
        let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CoordError::invalid(format!("invalid etcd endpoint {url:?}: {e}")))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(t) = &opts.tls {
            let cfg = t.tonic().map_err(CoordError::invalid)?;
            ep = ep
                .tls_config(cfg)
                .map_err(|e| CoordError::invalid(format!("TLS for {url:?}: {e}")))?;
        }
        match ep.connect().await {
            Ok(ch) => {
                let client = Client::from_channel(ch);
                let Some(creds) = &opts.credentials else {
                    return Ok((index, client));
                };
                match client.authenticate(creds).await {
                    Ok(()) => return Ok((index, client)),
                    // This member cannot answer now; another may.
                    Err(s) if retryable(&s) => last = format!("{url}: {}", describe_failure(&s)),
                    // Wrong credentials are wrong on every member.
                    Err(s) => return Err(login_error(creds, s)),
                }
            }
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(CoordError::Unavailable(format!(
        "cannot reach any etcd endpoint of {endpoints:?}: {last}"
    )))
}
