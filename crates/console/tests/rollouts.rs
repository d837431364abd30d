//! The Rollouts pages over a real socket: the list with each rollout's phase,
//! weight and live figures, a rollout's page with its steps, thresholds,
//! decisions and the buttons its phase allows, and the abort button's call
//! (the node's own `/v1/rollouts` API), after which the page shows the
//! rollback and offers removal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshwork_console::ConsoleState;
use meshwork_coord::rollout::{Analysis, Spec, Strategy};
use meshwork_coord::{Coord, CoordOptions};
use meshwork_testkit::http::{body_of, raw, status_of};

async fn call(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let r = raw(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: console\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    (status_of(&r), body_of(&r).to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_pages_show_steps_figures_decisions_and_act() {
    let store = meshwork_testkit::store::embedded().await;
    let coord = Coord::start(
        std::slice::from_ref(&store.endpoint),
        CoordOptions::default(),
    )
    .await
    .unwrap();
    let app = meshwork_console::router(ConsoleState::for_coord(coord.clone()))
        .merge(meshwork_coord::api::router(coord.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let (code, page) = call(addr, "GET", "/ui/rollouts").await;
    assert_eq!(code, 200);
    assert!(page.contains("No rollout yet"), "{page}");

    coord
        .rollouts
        .start(Spec {
            service: "inventory".into(),
            to_version: "2<b>".into(),
            strategy: Strategy::Canary,
            steps: vec![10, 50, 100],
            interval_ms: 60_000,
            analysis: Analysis::default(),
            auto_rollback: true,
            min_healthy: 1,
            deadline_ms: 600_000,
            pin: None,
        })
        .await
        .unwrap();
    let (_, page) = call(addr, "GET", "/ui/rollouts").await;
    assert!(page.contains("href=\"/ui/rollouts/inventory\""), "{page}");
    assert!(page.contains("waiting") && page.contains("0%"), "{page}");
    assert!(
        page.contains("2&lt;b&gt;") && !page.contains("2<b>"),
        "escaped: {page}"
    );

    let (_, page) = call(addr, "GET", "/ui/rollouts/inventory").await;
    for want in [
        "<h1>Rollout of inventory</h1>",
        "<li class=\"next\">10%</li>",
        "Live comparison",
        "more than 2.00 points above",
        "data-api=\"/v1/rollouts/inventory/abort\"",
        "data-api=\"/v1/rollouts/inventory/pause\"",
    ] {
        assert!(page.contains(want), "{want}: {page}");
    }

    // The abort button's call, then the page after it.
    let (code, body) = call(addr, "POST", "/v1/rollouts/inventory/abort").await;
    assert_eq!(code, 200, "{body}");
    let (_, page) = call(addr, "GET", "/ui/rollouts/inventory").await;
    assert!(page.contains("rolled_back"), "{page}");
    assert!(page.contains("aborted by hand"), "{page}");
    assert!(page.contains("data-method=\"DELETE\""), "{page}");
    assert!(!page.contains("/abort\""), "no abort once finished: {page}");

    let (_, page) = call(addr, "GET", "/ui/rollouts/nothing").await;
    assert!(page.contains("has no rollout"), "{page}");
    coord.shutdown().await;
}
