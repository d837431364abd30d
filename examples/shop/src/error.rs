//! Errors the shop's services answer with: the platform's JSON error envelope
//! (`meshwork_sdk::ApiError`) and the matching HTTP status.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// An error answer (the platform's, so `From` conversions can live here).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ApiError(pub meshwork_sdk::ApiError);

impl ApiError {
    /// An error with `status` and `code`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError(meshwork_sdk::ApiError::new(status, code, message))
    }

    /// 400 `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError(meshwork_sdk::ApiError::invalid(message))
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError(meshwork_sdk::ApiError::not_found(message))
    }

    /// 500 `internal`.
    pub fn internal(message: &str) -> ApiError {
        ApiError(meshwork_sdk::ApiError::internal(message))
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> ApiError {
        tracing::error!(error = %e, "database error");
        ApiError::internal(&format!("database error: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

/// Parses a JSON request body, answering 400 with serde's message on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("request body: {e}")))
}
