//! The one error type every handler returns, and how it becomes an HTTP answer.
//!
//! Every error body has the same shape so clients can branch on `code`:
//! `{"error": {"code": "...", "message": "...", "field": "amount" | null}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_field`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request field the error is about, if any.
    pub field: Option<&'static str>,
    /// Seconds for a `Retry-After` header (overload answers).
    pub retry_after: Option<u64>,
    /// Ask the client to close the connection (used when the request body was
    /// not read to its end, so the connection cannot be reused).
    pub close: bool,
}

impl ApiError {
    /// An error that is not about one field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            close: false,
        }
    }

    /// A 422 about one request field.
    pub fn invalid_field(field: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }

    /// 404 for an unknown resource.
    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// 413 for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            close: true,
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {limit} bytes"),
            )
        }
    }

    /// 503 when the CPU pool cannot take more work right now.
    pub fn overloaded(retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is busy with other heavy work; retry later",
            )
        }
    }

    /// 500; the detail goes to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error",
        )
    }

    /// Attach the field the error is about.
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {"code": self.code, "message": self.message, "field": self.field}
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<crate::heavy::Overloaded> for ApiError {
    fn from(o: crate::heavy::Overloaded) -> Self {
        ApiError::overloaded(o.retry_after_secs)
    }
}

impl From<crate::thumbnail::ThumbnailError> for ApiError {
    fn from(e: crate::thumbnail::ThumbnailError) -> Self {
        use crate::thumbnail::ThumbnailError as T;
        let message = e.to_string();
        match e {
            T::Unsupported => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                message,
            ),
            T::Corrupt(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image", message)
            }
            T::TooLarge { .. } | T::NeedsTooMuchMemory { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", message)
            }
            T::Busy => ApiError::overloaded(1),
            T::Encode(_) => ApiError::internal(message),
        }
    }
}
