//! The coordination suite on Meshwork's own store: an embedded store served as an
//! etcd v3 endpoint over a real socket, in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use meshwork_testkit::store::embedded;

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

suite::for_each_suite_test!(on_embedded);
