//! Generates the etcd v3 gRPC server and client from `proto/` with protox
//! (pure Rust), so building needs cargo alone: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mvccpb/kv.proto",
        "proto/etcdserverpb/rpc.proto",
        "proto/v3lockpb/lock.proto",
        "proto/v3electionpb/election.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        // Buffers sized for small unary calls (see src/codec.rs).
        .codec_path("crate::codec::EtcdCodec")
        .compile_fds(fds)?;
    Ok(())
}
