//! The floor under an HTTP/1.1 proxy engine of our own (issue 20), for the
//! gateway benchmark only: what a proxy on tokio costs per request when it
//! does the least any real engine must do. Not a product and not a gateway.
//!
//! `meshwork-bench-h1-floor ADDR ROUTES.toml [WORKER_THREADS]` takes the
//! same arguments as `meshwork-bench-gateway` and forwards every request to
//! the first `upstreams` address found in ROUTES. Per request it parses the
//! head with the engine's strict parser (`meshwork_gateway::h1`, no header
//! map), writes the upstream head by copying the client's lines with the
//! hop-by-hop ones dropped and `X-Forwarded-For` added, takes an upstream
//! connection from its worker's pool, parses the response head, and copies
//! bodies through verbatim (Content-Length, chunked via the h1 follower, or
//! until the upstream closes). One current-thread runtime and one
//! `SO_REUSEPORT` listener per worker, nothing shared between workers; no
//! routing, no logs, no metrics. The connection loop is the engine's
//! (`h1::server`: refusals, head, idle and body timeouts, lingering close).
//! `bench/gateway/compare.sh` runs it next to the gateway and nginx, so the
//! distance between the gateway and this floor is what hyper and our request
//! path cost, and the distance between this floor and nginx is what an own
//! engine on tokio could not win back.

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;

use meshwork_gateway::h1::body::{self, BodyEnd, BodyFraming, Buffer, CopyLimits};
use meshwork_gateway::h1::head::{self, Edits, Limits};
use meshwork_gateway::h1::server::{self, Flow, Handler, Request, ServerLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Header lines a head may have.
const MAX_HEADERS: usize = 64;
/// The client-side read buffer, and the largest head.
const BUF: usize = 16 * 1024;
/// The upstream-side read buffer: large responses move in reads this big
/// (with 16 KiB, a 64 KiB response took four reads and four writes, and the
/// kernel CPU per request rose 70 % above nginx's).
const UP_BUF: usize = 128 * 1024;

/// One worker's idle upstream connections.
type Pool = Rc<RefCell<Vec<TcpStream>>>;

fn fail(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, routes, rest @ ..] = args.as_slice() else {
        return Err(fail(
            "usage: meshwork-bench-h1-floor ADDR ROUTES.toml [THREADS]".into(),
        ));
    };
    let threads: usize = match rest.first() {
        Some(t) => t
            .parse()
            .map_err(|e| fail(format!("bad thread count: {e}")))?,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| fail(format!("bad address: {e}")))?;
    let text = std::fs::read_to_string(routes)?;
    let upstream: SocketAddr = text
        .split_once("upstreams = [\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .ok_or_else(|| fail(format!("no upstreams = [\"...\"] line in {routes}")))?
        .0
        .parse()
        .map_err(|e| fail(format!("bad upstream address: {e}")))?;
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_port(true)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let std_listener: std::net::TcpListener = socket.into();
        handles.push(std::thread::spawn(move || worker(std_listener, upstream)));
    }
    let mut out = io::stdout();
    writeln!(out, "listening {addr}")?;
    out.flush()?;
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("a worker panicked"))??;
    }
    Ok(())
}

fn worker(listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        let pool: Pool = Rc::default();
        loop {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let pool = pool.clone();
            tokio::task::spawn_local(serve(stream, peer, upstream, pool));
        }
    })
}

/// Limits for both heads.
const LIMITS: Limits = Limits {
    max_head_bytes: BUF,
    max_headers: MAX_HEADERS,
};

/// Forwards each request to the upstream (see the module docs).
struct Proxy {
    upstream: SocketAddr,
    pool: Pool,
    /// The client's address, as `X-Forwarded-For` sends it.
    ip: String,
    /// The upstream head being written.
    out: Vec<u8>,
    /// Lines of the client's head left out upstream.
    drop: Vec<usize>,
    /// The upstream-side read buffer.
    ubuf: Vec<u8>,
}

impl Handler<TcpStream> for Proxy {
    async fn handle(&mut self, req: &mut Request<'_, TcpStream>) -> Flow {
        match self.forward(req).await {
            Ok(flow) => flow,
            Err(_) => Flow::Close,
        }
    }
}

impl Proxy {
    async fn forward(&mut self, req: &mut Request<'_, TcpStream>) -> io::Result<Flow> {
        // The upstream head: the client's lines copied, hop-by-hop ones
        // left out, `X-Forwarded-For` added.
        let Some(h) = req.head_bytes() else {
            return Ok(Flow::Close);
        };
        let head = req.head();
        self.drop.clear();
        self.drop
            .extend(head.fields.iter().enumerate().filter_map(|(i, f)| {
                let name = &h[f.name.clone()];
                (name.eq_ignore_ascii_case(b"connection")
                    || name.eq_ignore_ascii_case(b"keep-alive"))
                .then_some(i)
            }));
        self.out.clear();
        let edits = Edits {
            target: None,
            drop: &self.drop,
            add: &[(b"x-forwarded-for", self.ip.as_bytes())],
        };
        head::write_request(h, head, &edits, &mut self.out).map_err(io::Error::other)?;
        let head_request = &h[head.method.clone()] == b"HEAD";
        let pooled = self.pool.borrow_mut().pop();
        let mut up = match pooled {
            Some(c) => c,
            None => {
                let c = TcpStream::connect(self.upstream).await?;
                c.set_nodelay(true)?;
                c
            }
        };
        // The head and the body bytes read with it in one write, then the rest.
        req.send_with_body(&mut up, &mut self.out)
            .await
            .map_err(io::Error::other)?;
        // The response head, then its body as it arrives.
        let mut got = 0usize;
        let resp = loop {
            let n = up.read(&mut self.ubuf[got..]).await?;
            if n == 0 {
                return Err(io::Error::other("the upstream closed mid-response"));
            }
            got += n;
            if let Some(r) = head::parse_response(&self.ubuf[..got], LIMITS, head_request)
                .map_err(io::Error::other)?
            {
                break r;
            }
        };
        let down = req.client();
        let rest = match BodyFraming::of_response(resp.framing) {
            None => {
                down.write_all(&self.ubuf[..resp.len]).await?;
                BodyEnd::At {
                    at: resp.len,
                    end: got,
                }
            }
            Some(f) => {
                let b = Buffer {
                    buf: &mut self.ubuf,
                    at: resp.len,
                    end: got,
                    lead: resp.len,
                };
                body::copy(&mut up, down, f, CopyLimits::default(), b)
                    .await
                    .map_err(io::Error::other)?
            }
        };
        // Reused only when it ended cleanly with nothing after it.
        let clean = matches!(rest, BodyEnd::At { at, end } if at == end);
        if !resp.close && clean {
            self.pool.borrow_mut().push(up);
        }
        Ok(if rest == BodyEnd::Closed {
            Flow::Close
        } else {
            Flow::KeepAlive
        })
    }
}

async fn serve(mut down: TcpStream, peer: SocketAddr, upstream: SocketAddr, pool: Pool) {
    let limits = ServerLimits {
        head: LIMITS,
        ..ServerLimits::default()
    };
    let mut proxy = Proxy {
        upstream,
        pool,
        ip: peer.ip().to_string(),
        out: Vec::with_capacity(BUF),
        drop: Vec::new(),
        ubuf: vec![0u8; UP_BUF],
    };
    let mut buf = vec![0u8; BUF];
    let _ = server::serve(&mut down, &limits, &mut proxy, &mut buf).await;
}
