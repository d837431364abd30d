//! Routes: the user-facing model ([`model`]), compilation and validation,
//! matching and explanations.

pub(crate) mod compile;
pub mod model;

pub use compile::{Explanation, RouteCheck};
