//! The in-process transport: a client in the process that hosts an etcd
//! server reaches it at `inproc://NAME` through in-memory pipes instead of
//! loopback TCP — the same gRPC protocol and code on both sides, without the
//! kernel's TCP stack, and outside the TCP listener's connection limit (so a
//! flood of outside connections cannot lock the node's own coordination out
//! of its store). The named-server idea is gRPC's own in-process transport.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Uri};

/// The scheme of an in-process endpoint.
pub const SCHEME: &str = "inproc://";

/// Bytes buffered in each direction of one pipe (an HTTP/2 frame's worth
/// several times over; a writer waits when it is full, as on a socket).
pub const PIPE_BYTES: usize = 256 * 1024;

/// Each name's listener: its bind number and where its connections go.
type Servers = HashMap<String, (u64, mpsc::UnboundedSender<DuplexStream>)>;

static SERVERS: LazyLock<Mutex<Servers>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static BINDS: AtomicU64 = AtomicU64::new(0);

/// The name in an `inproc://NAME` endpoint, if it is one.
pub fn name_of(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix(SCHEME)
}

/// A server's end: the connections clients open to its name. Dropping it
/// frees the name; clients then fail to connect.
pub struct Listener {
    name: String,
    id: u64,
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    rx: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Listener {
    /// Claims `name`; an error if another listener in this process holds it.
    pub fn bind(name: &str) -> io::Result<Listener> {
        let mut servers = SERVERS.lock();
        if servers.get(name).is_some_and(|(_, tx)| !tx.is_closed()) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("in-process endpoint {SCHEME}{name} is taken"),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = BINDS.fetch_add(1, Ordering::Relaxed);
        servers.insert(name.to_owned(), (id, tx));
        Ok(Listener {
            name: name.to_owned(),
            id,
            rx,
        })
    }

    /// The endpoint clients connect to.
    pub fn endpoint(&self) -> String {
        format!("{SCHEME}{}", self.name)
    }

    /// The accepted connections, for `tonic`'s `serve_with_incoming`.
    #[cfg(feature = "server")]
    pub fn incoming(self) -> impl futures_util::Stream<Item = io::Result<DuplexStream>> + Send {
        Incoming(self)
    }
}

#[cfg(feature = "server")]
struct Incoming(Listener);

#[cfg(feature = "server")]
impl futures_util::Stream for Incoming {
    type Item = io::Result<DuplexStream>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut servers = SERVERS.lock();
        if servers
            .get(&self.name)
            .is_some_and(|(id, _)| *id == self.id)
        {
            servers.remove(&self.name);
        }
    }
}

/// Opens a pipe to the server listening on `name`.
pub fn dial(name: &str) -> io::Result<DuplexStream> {
    let tx = SERVERS.lock().get(name).map(|(_, tx)| tx.clone());
    let (client, server) = tokio::io::duplex(PIPE_BYTES);
    match tx {
        Some(tx) if tx.send(server).is_ok() => Ok(client),
        _ => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("no in-process etcd server at {SCHEME}{name}"),
        )),
    }
}

/// A tonic connector that dials `name` (for every reconnect too).
#[derive(Clone)]
struct Connector(String);

impl Service<Uri> for Connector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let pipe = dial(&self.0).map(TokioIo::new);
        Box::pin(async move { pipe })
    }
}

/// A channel to the in-process server `name`, connected now (an error if
/// nothing listens there).
pub async fn channel(name: &str, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(Connector(name.to_owned()))
        .await
}

/// An endpoint for [`channel`] (its URI is only a label: nothing resolves it).
pub fn endpoint() -> Endpoint {
    Endpoint::from_static("http://inproc.invalid")
}
