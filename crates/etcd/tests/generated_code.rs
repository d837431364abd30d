//! The gRPC code checked in under `src/generated/` is exactly what protox and
//! tonic-prost-build make from `proto/` today (`meshwork_testkit::codegen`).
//! After changing a proto or the generator, run
//! `MESHWORK_REGENERATE=1 cargo test -p meshwork-etcd --test generated_code`.

#[test]
fn checked_in_grpc_code_matches_the_protos() {
    meshwork_testkit::codegen::check_generated(
        env!("CARGO_MANIFEST_DIR"),
        "meshwork-etcd",
        "proto",
        &[
            "mvccpb/kv.proto",
            "authpb/auth.proto",
            "etcdserverpb/rpc.proto",
            "v3lockpb/lock.proto",
            "v3electionpb/election.proto",
        ],
        |b| {
            b.build_server(true)
                .build_client(true)
                .bytes(".")
                // Buffers sized for small unary calls (see src/codec.rs).
                .codec_path("crate::codec::EtcdCodec")
        },
    );
}
