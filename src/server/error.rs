//! One error type at the HTTP edge. Clients get a clean JSON body in the
//! OpenAI shape (`{"error": {"message", "type", "code"}}`) so stock OpenAI
//! clients show the message; internals are logged, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code (`unauthorized`, `rate_limited`, …).
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown bearer token; send `Authorization: Bearer <token>` with a token from the server's config",
        )
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the request is larger than the limit of {limit} bytes"))
    }
    pub fn rate_limited(wait_s: u64) -> Self {
        Self {
            retry_after: Some(wait_s.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many requests; try again in {} s", wait_s.max(1)))
        }
    }
    pub fn busy(message: impl Into<String>) -> Self {
        Self { retry_after: Some(2), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message) }
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        eprintln!("errand serve: internal error: {message}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the server log has details")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.code, "code": self.code}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
