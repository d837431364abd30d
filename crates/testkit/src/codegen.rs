//! Checked-in gRPC code kept equal to what protox and tonic-prost-build make
//! from a crate's protos: the one check behind each crate's `generated_code`
//! test. Checking the code in keeps protox out of every product and SDK build.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Generates the code of `protos` (paths under `manifest_dir/proto_dir`, which is
/// also the include path) with `configure` and compares it with
/// `manifest_dir/src/generated/`; with `MESHWORK_REGENERATE` set, rewrites that
/// directory instead. `package` names the crate in the failure's hint.
pub fn check_generated(
    manifest_dir: &str,
    package: &str,
    proto_dir: &str,
    protos: &[&str],
    configure: impl FnOnce(tonic_prost_build::Builder) -> tonic_prost_build::Builder,
) {
    let root = Path::new(manifest_dir);
    let includes = root.join(proto_dir);
    let fresh_dir = tempfile::tempdir().expect("a temporary directory");
    let files: Vec<PathBuf> = protos.iter().map(|p| includes.join(p)).collect();
    let fds = protox::compile(files, [includes]).expect("protos compile");
    configure(tonic_prost_build::configure())
        .out_dir(fresh_dir.path())
        .compile_fds(fds)
        .expect("code generates");
    let fresh = rust_files(fresh_dir.path());
    let checked_in_dir = root.join("src/generated");
    let hint = format!("run MESHWORK_REGENERATE=1 cargo test -p {package} --test generated_code");
    if std::env::var_os("MESHWORK_REGENERATE").is_some() {
        fs::create_dir_all(&checked_in_dir).expect("src/generated can be made");
        for name in rust_files(&checked_in_dir).keys() {
            fs::remove_file(checked_in_dir.join(name)).expect("old file removed");
        }
        for (name, code) in &fresh {
            fs::write(checked_in_dir.join(name), code).expect("file written");
        }
        return;
    }
    let checked_in = rust_files(&checked_in_dir);
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&checked_in),
        names(&fresh),
        "src/generated/ holds other files than the generator makes; {hint}"
    );
    for (name, code) in &fresh {
        assert!(
            checked_in[name] == *code,
            "src/generated/{name} differs from what proto/ generates; {hint}"
        );
    }
}

fn rust_files(dir: &Path) -> BTreeMap<String, String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).expect("file readable"))
        })
        .collect()
}
