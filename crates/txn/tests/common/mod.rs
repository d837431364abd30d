//! What several of this crate's tests start.
#![allow(clippy::unwrap_used, dead_code)]

use meshwork_coord::{Coord, CoordOptions};
use meshwork_txn::role::{TXN_ROLE, TxnRole};

/// Node `n1` with the `txn` role on the store at `endpoint`: its
/// coordination, and the transaction API served on a loopback port (the
/// address it advertises in membership).
pub(crate) async fn txn_node(endpoint: &str) -> Coord {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let coord = Coord::start(
        &[endpoint.to_owned()],
        CoordOptions {
            node_name: "n1".into(),
            http_addr: http.to_string(),
            extra_roles: vec![TXN_ROLE.into()],
            ..CoordOptions::default()
        },
    )
    .await
    .unwrap();
    let app = meshwork_txn::api::router(TxnRole::start(&coord));
    tokio::spawn(async move { axum::serve(listener, app).await });
    coord
}

/// Registers `service` at 127.0.0.1:`port` (persistent) in `coord`'s registry.
pub(crate) async fn register(coord: &Coord, service: &str, port: u16) {
    let spec = serde_json::from_value(serde_json::json!({
        "address": "127.0.0.1", "port": port, "ephemeral": false
    }))
    .unwrap();
    coord
        .registry
        .register(service, spec, "test", None)
        .await
        .unwrap();
}
