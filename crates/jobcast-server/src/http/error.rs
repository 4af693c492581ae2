//! The API's errors: `{"error":{"code","message"}}` with a fitting status.
//! Client errors are not logged; store errors are logged once where they
//! happen and never leak details to the client.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use crate::store::StoreError;

/// An error answer: a status, a stable snake_case code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// For humans.
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `stream_not_found`.
    pub fn stream_not_found(stream: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "stream_not_found",
            format!("stream {stream:?} does not exist"),
        )
    }

    /// 409 `stream_ended`.
    pub fn stream_ended(stream: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "stream_ended",
            format!("stream {stream:?} has ended; it accepts no more events"),
        )
    }

    /// 503 `store_unavailable`, with `Retry-After`.
    pub fn store_unavailable() -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store is unavailable; nothing was changed, retry later",
            )
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Logged once here, with its source chain; the client gets no details.
        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "store error");
        match e {
            StoreError::Closed => ApiError {
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the server is shutting down; retry on another node or later",
                )
            },
            _ => ApiError::store_unavailable(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        })
        .to_string();
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
