//! The gRPC code checked in under `src/generated/` is exactly what protox and
//! tonic-prost-build make from `proto/mq.proto` today (`meshwork_testkit::codegen`).
//! After changing the proto or the generator, run
//! `MESHWORK_REGENERATE=1 cargo test -p meshwork-mq --test generated_code`.

#[test]
fn checked_in_grpc_code_matches_the_protos() {
    meshwork_testkit::codegen::check_generated(
        env!("CARGO_MANIFEST_DIR"),
        "meshwork-mq",
        "proto",
        &["mq.proto"],
        |b| b.build_server(true).build_client(true).bytes("."),
    );
}
