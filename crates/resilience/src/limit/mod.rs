//! Limits on how much work gets in: request rates ([`rate`]) and work in
//! flight ([`concurrency`]).

pub mod concurrency;
pub mod rate;
