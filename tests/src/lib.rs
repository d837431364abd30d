//! The harness of Meshwork's system tests: runs the real binary (this
//! package's `meshwork-system`, the `meshwork` command line under another
//! file name) as child processes. The tests in `tests/` use it together with
//! `meshwork-testkit` (raw HTTP, peers, polling with a deadline).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use meshwork_testkit::http::blocking as http;

/// Serves `app` on a free loopback port from a thread with its own runtime
/// (an upstream for the gateway's tests); its port.
pub fn serve_app(app: axum::Router) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    port
}

/// The binary under test. Cargo builds it for this package's tests and
/// names it in `CARGO_BIN_EXE_meshwork-system` when it builds and when it
/// runs them (this library is not a test target, so it reads the variable at
/// run time); a test executable started by hand finds it next to its own
/// directory (`target/<profile>/deps/..`).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = std::env::var_os("CARGO_BIN_EXE_meshwork-system")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().unwrap();
                let mut dir = exe.parent().unwrap().to_path_buf();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir.join(format!("meshwork-system{}", std::env::consts::EXE_SUFFIX))
            });
        assert!(
            path.is_file(),
            "{} is missing: run the tests with `cargo test -p meshwork-tests`",
            path.display()
        );
        path
    })
}

/// A free TCP port on 127.0.0.1 (free when asked; a parallel test may take
/// it before it is used).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `meshwork server` child, killed on drop.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// The etcd v3 gRPC address it printed (`HOST:PORT`).
    pub etcd: String,
    /// The HTTP address it printed (`HOST:PORT`).
    pub http: String,
    /// The gateway's address, when started with `--gateway-addr`.
    pub gateway: Option<String>,
    /// The cache's RESP address, when started with `--cache-addr`.
    pub cache: Option<String>,
    /// The trace store's OTLP/gRPC address, when started with `--otlp-grpc-addr`.
    pub otlp_grpc: Option<String>,
    /// The trace store's OTLP/HTTP address, when started with `--otlp-http-addr`.
    pub otlp_http: Option<String>,
}

/// Starts `meshwork server` on free ports (`--roles store` unless `extra`
/// names roles); returns once `/readyz` answers 200.
pub fn start(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    start_cmd(Command::new(bin()), data_dir, extra, envs)
}

/// A node with every role and the demo shop (`--demo`), its gateway and
/// cache on free ports (the demo needs feature `demo`).
pub fn start_demo(data_dir: &Path, envs: &[(&str, &str)]) -> Server {
    start(
        data_dir,
        &[
            "--roles",
            "store,coord,gateway,txn,mq,cache",
            "--gateway-addr",
            "127.0.0.1:0",
            "--cache-addr",
            "127.0.0.1:0",
            "--demo",
        ],
        envs,
    )
}

/// As [`start`], with the child's open-files limit set to `soft`/`hard`
/// (what `ulimit -Sn`/`-Hn` would set in a shell).
pub fn start_with_nofile(
    data_dir: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
    soft: u64,
    hard: u64,
) -> Server {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    #[allow(unsafe_code)]
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    start_cmd(cmd, data_dir, extra, envs)
}

fn start_cmd(mut cmd: Command, data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    cmd.arg("server").arg("--data-dir").arg(data_dir);
    if !extra.contains(&"--etcd-addr") {
        cmd.args(["--etcd-addr", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--http-addr") {
        cmd.args(["--http-addr", "127.0.0.1:0"]);
    }
    // Store tests count revisions exactly: run the store alone unless asked.
    if !extra.contains(&"--roles") {
        cmd.args(["--roles", "store"]);
    }
    cmd.args(extra)
        .envs(envs.iter().copied())
        .env("MESHWORK_LOG", "warn");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn meshwork");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let etcd = lines
        .next()
        .expect("first line")
        .unwrap()
        .trim_start_matches("etcd gRPC: ")
        .to_string();
    let http = lines.next().expect("second line").unwrap().to_string();
    // With --tls-cert the HTTP port speaks https.
    let tls = http.starts_with("HTTP: https://");
    let http = http
        .trim_start_matches("HTTP: http://")
        .trim_start_matches("HTTP: https://")
        .to_string();
    let gateway = extra.contains(&"--gateway-addr").then(|| {
        lines
            .next()
            .expect("third line")
            .unwrap()
            .trim_start_matches("Gateway: http://")
            .to_string()
    });
    let cache = extra.contains(&"--cache-addr").then(|| {
        lines
            .next()
            .expect("the cache's line")
            .unwrap()
            .trim_start_matches("Cache: redis://")
            .trim_start_matches("Cache: rediss://")
            .to_string()
    });
    let otlp_grpc = extra.contains(&"--otlp-grpc-addr").then(|| {
        lines
            .next()
            .expect("the OTLP/gRPC line")
            .unwrap()
            .trim_start_matches("OTLP gRPC: ")
            .to_string()
    });
    let otlp_http = extra.contains(&"--otlp-http-addr").then(|| {
        lines
            .next()
            .expect("the OTLP/HTTP line")
            .unwrap()
            .trim_start_matches("OTLP HTTP: http://")
            .trim_start_matches("OTLP HTTP: https://")
            .to_string()
    });
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    // Built first, so that a node that never gets ready is killed, not leaked.
    let server = Server {
        child,
        etcd,
        http,
        gateway,
        cache,
        otlp_grpc,
        otlp_http,
    };
    meshwork_testkit::blocking::until(
        "the server to become ready",
        Duration::from_secs(60),
        || {
            if tls {
                // No TLS client here: a TLS node printed its addresses once bound.
                std::net::TcpStream::connect(&server.http).is_ok()
            } else {
                matches!(http::get(&server.http, "/readyz"), Ok((200, _)))
            }
        },
    );
    server
}

impl Server {
    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id() as i32;
        #[allow(unsafe_code)]
        // SAFETY: kill(2) has no memory effects; the pid is our own child's.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a `meshwork` command against a node's HTTP API (`--http` added):
/// (success, stdout, stderr).
pub fn meshwork_http(http: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .args(["--http", http])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
