//! The coordination suite on Meshwork's own store: an embedded store served as an
//! etcd v3 endpoint over a real socket, in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

mod common;

use common::embedded;

macro_rules! on_embedded {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let e = embedded().await;
                suite::$name(vec![e.endpoint.clone()]).await;
            }
        )*
    };
}

on_embedded!(
    registry_ephemeral_and_persistent,
    health_checks_follow_the_instance,
    discovery_filters_protection_blocking_watch,
    config_versions_history_rollback,
    config_listen_subscribe_gray,
    locks_exclusive_fenced_freed,
    election_campaign_observe_resign,
    ids_unique_across_nodes,
    checks_move_when_their_node_dies,
    client_typed_config_session_and_guards,
    backend_loads_large_prefixes_in_pages,
);
