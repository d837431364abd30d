//! The broker's gRPC client checked in under `src/generated/` is exactly what
//! protox and tonic-prost-build make from `crates/mq/proto/mq.proto` today
//! (`meshwork_testkit::codegen`; the SDK builds no protos). After changing the
//! proto or the generator, run
//! `MESHWORK_REGENERATE=1 cargo test -p meshwork-sdk --test generated_code`.

#[test]
fn checked_in_grpc_client_matches_the_broker_proto() {
    meshwork_testkit::codegen::check_generated(
        env!("CARGO_MANIFEST_DIR"),
        "meshwork-sdk",
        "../mq/proto",
        &["mq.proto"],
        |b| b.build_server(false).build_client(true).bytes("."),
    );
}
