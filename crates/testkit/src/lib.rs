//! Test support shared by Meshwork's crates; a dev-dependency only, never in
//! a shipped build. Today: [`schema`], the one OpenAPI schema checker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod schema;
