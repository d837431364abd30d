//! Errors the gateway answers with: JSON bodies with a stable `code`.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

/// A stable error code, one per kind of refusal or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No route matches the request (404).
    NoRoute,
    /// The request is malformed (400).
    BadRequest,
    /// Credentials are missing or invalid (401).
    Unauthorized,
    /// The caller is not allowed (403).
    Forbidden,
    /// The client was too slow sending its request (408).
    RequestTimeout,
    /// The body exceeds the configured limit (413).
    PayloadTooLarge,
    /// The headers exceed the configured limit (431).
    HeadersTooLarge,
    /// A rate limit rejected the request (429).
    RateLimited,
    /// No upstream could be reached or it failed (502).
    UpstreamUnavailable,
    /// The route's circuit breaker is open (503).
    BreakerOpen,
    /// The route's bulkhead is full (503).
    Overloaded,
    /// No healthy endpoint is known for the upstream (503).
    NoHealthyUpstream,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
}

impl ErrorCode {
    /// The HTTP status answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::NoRoute => StatusCode::NOT_FOUND,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::BreakerOpen | ErrorCode::Overloaded | ErrorCode::NoHealthyUpstream => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable machine-readable code in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoRoute => "no_route",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::BreakerOpen => "breaker_open",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NoHealthyUpstream => "no_healthy_upstream",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// A refusal or failure to answer with, as JSON.
#[derive(Debug, Clone)]
pub struct GatewayError {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// `Retry-After` hint (429 and 503).
    pub retry_after: Option<Duration>,
}

impl GatewayError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` hint.
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// The JSON response; `request_id` is echoed in the body when known.
    pub fn into_response(self, request_id: Option<&str>) -> Response<Body> {
        let mut err =
            meshwork_api::ApiError::new(self.code.status(), self.code.as_str(), self.message);
        if let Some(id) = request_id {
            err = err.with_request_id(id);
        }
        let bytes = err.to_json();
        let mut resp = Response::new(full(bytes));
        *resp.status_mut() = self.code.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(d) = self.retry_after {
            // Whole seconds, rounded up, at least 1.
            let secs = d.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for GatewayError {}
