//! Generates the gRPC health checking protocol (`grpc.health.v1`) client and
//! server from `proto/` with protox (pure Rust), so building needs cargo alone:
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/grpc/health/v1/health.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
