//! A real NATS server with JetStream (Debian's `nats-server`) as a child process,
//! for the peer tests of the SDK's NATS backend.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd_cluster::free_port;

/// Where Debian installs it.
const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// How long the server gets to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running `nats-server -js` on 127.0.0.1 with its store in a temporary
/// directory; SIGKILLed when dropped.
pub struct NatsServer {
    /// Its client port.
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one: `None` (skip) when nats-server is not installed; a test failure
    /// instead under `MESHWORK_REQUIRE_PEERS=1`. `MESHWORK_NATS_SERVER` overrides
    /// the binary's path.
    pub fn start() -> Option<NatsServer> {
        let bin: PathBuf = crate::peer::at("nats-server", "MESHWORK_NATS_SERVER", NATS_SERVER)?;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let mut server = NatsServer {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_WITHIN;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                matches!(server.child.try_wait(), Ok(None)),
                "nats-server on port {port} exited at start"
            );
            assert!(
                Instant::now() < deadline,
                "nats-server on port {port} not ready within {READY_WITHIN:?}"
            );
            std::thread::sleep(crate::POLL_EVERY);
        }
        Some(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
