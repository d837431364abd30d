//! Meshwork's distributed transactions from a service: [`TxnClient`] starts
//! and follows them; the rest is a participant's side.
//!
//! The coordinator calls each branch with the transaction id, the branch name
//! and the phase in headers (plus an idempotency key). [`BranchCall`] reads
//! them — as an axum extractor, or from a header map — and, with the
//! `sqlite` feature, [`sqlite::Barrier`] runs the branch's work in the
//! participant's own database behind a barrier that makes every phase
//! idempotent, turns a compensation whose action never arrived into a
//! recorded no-op, and refuses an action that arrives after its
//! compensation (the sub-transaction barrier of DTM, Seata's TCC fence).

pub mod client;
#[cfg(feature = "sqlite")]
pub mod outbox;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use client::{TxnClient, TxnError, Verdict};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::request::Parts;
pub use meshwork_txn::Phase;
/// A transaction's definition, to build in Rust and validate before sending
/// ([`Spec::validate`]); [`TxnClient::start`] takes its JSON.
pub use meshwork_txn::spec::{BranchSpec, Call, Mode, Recovery, RetryPolicy, Spec, SpecError};
use meshwork_txn::{HEADER_BRANCH, HEADER_PHASE, HEADER_TXN};

/// Longest transaction id or branch name accepted from a header.
pub const MAX_NAME_BYTES: usize = 256;

/// Which call of which transaction a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchCall {
    /// The global transaction id.
    pub txn: String,
    /// The branch's name in the transaction's definition.
    pub branch: String,
    /// Action (try, prepare), confirm (commit) or undo (cancel, rollback).
    pub phase: Phase,
}

/// Why a request's transaction headers are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A header is missing.
    #[error("missing header {0}: this endpoint is a transaction branch, called by the coordinator")]
    Missing(&'static str),
    /// A header's value is not acceptable.
    #[error("header {name}: {reason}")]
    Invalid {
        /// The header.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl IntoResponse for HeaderError {
    fn into_response(self) -> Response {
        meshwork_api::ApiError::bad_request("bad_txn_headers", self.to_string()).into_response()
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, HeaderError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| HeaderError::Invalid {
        name,
        reason: "not visible ASCII".into(),
    })?;
    if v.is_empty() || v.len() > MAX_NAME_BYTES {
        return Err(HeaderError::Invalid {
            name,
            reason: format!("1 to {MAX_NAME_BYTES} bytes, got {}", v.len()),
        });
    }
    Ok(Some(v))
}

impl BranchCall {
    /// The call described by `headers`; `Ok(None)` when none of the three
    /// headers is present (a request outside any transaction).
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<BranchCall>, HeaderError> {
        let txn = text(headers, HEADER_TXN)?;
        let branch = text(headers, HEADER_BRANCH)?;
        let phase = text(headers, HEADER_PHASE)?;
        let (txn, branch, phase) = match (txn, branch, phase) {
            (None, None, None) => return Ok(None),
            (Some(t), Some(b), Some(p)) => (t, b, p),
            (None, ..) => return Err(HeaderError::Missing(HEADER_TXN)),
            (_, None, _) => return Err(HeaderError::Missing(HEADER_BRANCH)),
            (.., None) => return Err(HeaderError::Missing(HEADER_PHASE)),
        };
        let phase = match phase {
            "action" => Phase::Action,
            "confirm" => Phase::Confirm,
            "undo" => Phase::Undo,
            other => {
                return Err(HeaderError::Invalid {
                    name: HEADER_PHASE,
                    reason: format!("{other:?} is not action, confirm or undo"),
                });
            }
        };
        Ok(Some(BranchCall {
            txn: txn.to_owned(),
            branch: branch.to_owned(),
            phase,
        }))
    }
}

/// As an extractor, the headers must be there: 400 with the reason otherwise.
impl<S: Send + Sync> FromRequestParts<S> for BranchCall {
    type Rejection = HeaderError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        BranchCall::from_headers(&parts.headers)?.ok_or(HeaderError::Missing(HEADER_TXN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let Ok(v) = v.parse() {
                h.insert(*k, v);
            }
        }
        h
    }

    #[test]
    fn the_three_headers_make_a_call_and_none_make_no_call() {
        let h = headers(&[
            (HEADER_TXN, "t1"),
            (HEADER_BRANCH, "pay"),
            (HEADER_PHASE, "undo"),
        ]);
        assert_eq!(
            BranchCall::from_headers(&h),
            Ok(Some(BranchCall {
                txn: "t1".into(),
                branch: "pay".into(),
                phase: Phase::Undo
            }))
        );
        assert_eq!(BranchCall::from_headers(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn partial_or_bad_headers_are_refused_naming_the_header() {
        let h = headers(&[(HEADER_TXN, "t1"), (HEADER_PHASE, "undo")]);
        assert_eq!(
            BranchCall::from_headers(&h),
            Err(HeaderError::Missing(HEADER_BRANCH))
        );
        let h = headers(&[
            (HEADER_TXN, "t1"),
            (HEADER_BRANCH, "pay"),
            (HEADER_PHASE, "cancel"),
        ]);
        let err = BranchCall::from_headers(&h).err();
        assert!(err.is_some_and(|e| {
            e.to_string()
                .contains("\"cancel\" is not action, confirm or undo")
        }));
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let h = headers(&[
            (HEADER_TXN, &long),
            (HEADER_BRANCH, "pay"),
            (HEADER_PHASE, "action"),
        ]);
        assert!(matches!(
            BranchCall::from_headers(&h),
            Err(HeaderError::Invalid {
                name: HEADER_TXN,
                ..
            })
        ));
    }
}
