//! Test support: Meshwork's embedded store served as an etcd v3 endpoint on
//! 127.0.0.1, in this process (shared with the other crates' tests).
#![allow(dead_code, unreachable_pub, unused_imports)]

pub use meshwork_etcd::testing::{Embedded, embedded};
