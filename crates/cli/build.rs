//! The git revision and commit date `meshwork version` reports, read from the
//! checkout at build time (`unknown` outside one, as in a packaged crate;
//! `MESHWORK_GIT_REV` / `MESHWORK_GIT_DATE` in the environment take
//! precedence, for builds from a source tarball).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    for var in ["MESHWORK_GIT_REV", "MESHWORK_GIT_DATE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // A new commit or checkout changes these; nothing else reruns this.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        println!("cargo:rerun-if-changed={common}/refs/heads");
        println!("cargo:rerun-if-changed={common}/packed-refs");
    }
    let rev = std::env::var("MESHWORK_GIT_REV")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = std::env::var("MESHWORK_GIT_DATE")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%cs"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHWORK_GIT_REV={rev}");
    println!("cargo:rustc-env=MESHWORK_GIT_DATE={date}");
}
