//! The gRPC code checked in under `src/generated/` is exactly what protox and
//! tonic-prost-build make from `proto/` today. Checking it in keeps protox and
//! its build tree out of every build of the product and of every SDK user; this
//! test keeps the two from drifting. After changing a proto or the generator,
//! run `MESHWORK_REGENERATE=1 cargo test -p meshwork-etcd --test generated_code`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

const PROTOS: [&str; 4] = [
    "proto/mvccpb/kv.proto",
    "proto/etcdserverpb/rpc.proto",
    "proto/v3lockpb/lock.proto",
    "proto/v3electionpb/election.proto",
];

fn generate(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = PROTOS.map(|p| root.join(p));
    let fds = protox::compile(files, [root.join("proto")]).expect("protos compile");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        // Buffers sized for small unary calls (see src/codec.rs).
        .codec_path("crate::codec::EtcdCodec")
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generates");
}

fn rust_files(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .expect("directory readable")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p: PathBuf| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).expect("file readable"))
        })
        .collect()
}

#[test]
fn checked_in_grpc_code_matches_the_protos() {
    let fresh_dir = tempfile::tempdir().unwrap();
    generate(fresh_dir.path());
    let fresh = rust_files(fresh_dir.path());
    let checked_in_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/generated");
    if std::env::var_os("MESHWORK_REGENERATE").is_some() {
        for name in rust_files(&checked_in_dir).keys() {
            fs::remove_file(checked_in_dir.join(name)).unwrap();
        }
        for (name, code) in &fresh {
            fs::write(checked_in_dir.join(name), code).unwrap();
        }
        return;
    }
    let checked_in = rust_files(&checked_in_dir);
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&checked_in),
        names(&fresh),
        "src/generated/ holds other files than the generator makes; \
         run MESHWORK_REGENERATE=1 cargo test -p meshwork-etcd --test generated_code"
    );
    for (name, code) in &fresh {
        assert!(
            checked_in[name] == *code,
            "src/generated/{name} differs from what proto/ generates; \
             run MESHWORK_REGENERATE=1 cargo test -p meshwork-etcd --test generated_code"
        );
    }
}
