//! The real peers that peer tests run against (Debian's etcd, etcdctl,
//! chromium, ...). A missing peer skips the test, except under
//! `MESHWORK_REQUIRE_PEERS=1` (what CI sets), where it fails it.

use std::path::PathBuf;

/// Whether peer tests must fail rather than skip when a peer is missing.
pub fn required() -> bool {
    std::env::var("MESHWORK_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Finds `name` on `PATH`; `None` (skip) when missing, and a test failure
/// instead under `MESHWORK_REQUIRE_PEERS=1`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        missing(name, &format!("{name} is not on PATH"));
    }
    found
}

/// The peer binary at the path in environment variable `var`, or at
/// `default` when it is unset; `None` (skip) when that file does not exist,
/// and a test failure instead under `MESHWORK_REQUIRE_PEERS=1`.
pub fn at(name: &str, var: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if path.is_file() {
        return Some(path);
    }
    missing(
        name,
        &format!("{} not found; {var} overrides", path.display()),
    );
    None
}

fn missing(name: &str, why: &str) {
    assert!(
        !required(),
        "peer {name} is missing ({why}) and MESHWORK_REQUIRE_PEERS=1 \
         (install Debian's package, see .ci/run)"
    );
    eprintln!("skipping: peer {name} is missing ({why})");
}

/// Runs `cmd` with `input` on its standard input (then closed) and collects
/// its output.
///
/// # Panics
/// When the command cannot be started (tests only).
pub fn run_with_input(cmd: &mut std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the peer starts");
    if let Some(mut stdin) = child.stdin.take() {
        // A peer may exit without reading: its answer still counts.
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("the peer's output")
}
