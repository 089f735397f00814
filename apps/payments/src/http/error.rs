//! The one error type every handler returns, and the one place where the
//! layers' typed errors (domain, store, compute, jobs) become HTTP statuses.
//!
//! Every error body has the same shape so clients can branch on `code`:
//! `{"error": {"code": "...", "message": "...", "field": "amount" | null}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::compute::thumbnail::ThumbnailError;
use crate::compute::{HeavyError, Overloaded};
use crate::domain::payment::PaymentError;
use crate::domain::settlement::SettlementError;
use crate::jobs::JobError;
use crate::store::StoreError;

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

    /// 415 for a body of a type the route does not take.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 400 for a bad query string.
    pub fn invalid_query(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
    }

    /// 400 when the body could not be read off the connection.
    pub fn body_read_failed(e: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "body_read_failed",
            format!("could not read the request body: {e}"),
        )
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<Overloaded> for ApiError {
    fn from(o: Overloaded) -> Self {
        ApiError::overloaded(o.retry_after_secs)
    }
}

impl From<HeavyError> for ApiError {
    fn from(e: HeavyError) -> Self {
        match e {
            HeavyError::Overloaded(o) => o.into(),
            HeavyError::Failed(msg) => ApiError::internal(msg),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Overloaded(o) => o.into(),
            JobError::Store(e) => e.into(),
            JobError::Heavy(e) => e.into(),
        }
    }
}

impl From<PaymentError> for ApiError {
    fn from(e: PaymentError) -> Self {
        let message = e.to_string();
        match e {
            PaymentError::MissingKey => {
                ApiError::new(StatusCode::BAD_REQUEST, "missing_idempotency_key", message)
            }
            PaymentError::InvalidKey => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", message)
            }
            PaymentError::MalformedJson(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message)
            }
            PaymentError::NotAnObject => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
            }
            PaymentError::InvalidField { field, .. } => ApiError::invalid_field(field, message),
            PaymentError::UnknownMerchant(_) => ApiError {
                code: "unknown_merchant",
                ..ApiError::invalid_field("merchant_id", message)
            },
            PaymentError::KeyReused => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_key_reused", message)
            }
        }
    }
}

impl From<SettlementError> for ApiError {
    fn from(e: SettlementError) -> Self {
        match e {
            SettlementError::BadHeader => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_csv_header", e.to_string())
            }
        }
    }
}

impl From<ThumbnailError> for ApiError {
    fn from(e: ThumbnailError) -> Self {
        let message = e.to_string();
        match e {
            ThumbnailError::Unsupported => ApiError::unsupported_media_type(message),
            ThumbnailError::Corrupt(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image", message)
            }
            ThumbnailError::TooLarge { .. } | ThumbnailError::NeedsTooMuchMemory { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", message)
            }
            ThumbnailError::Busy => ApiError::overloaded(1),
            ThumbnailError::Encode(_) => ApiError::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_their_statuses() {
        let status = |e: ApiError| (e.status.as_u16(), e.code, e.field);
        assert_eq!(
            status(PaymentError::MissingKey.into()),
            (400, "missing_idempotency_key", None)
        );
        assert_eq!(
            status(PaymentError::UnknownMerchant("x".into()).into()),
            (422, "unknown_merchant", Some("merchant_id"))
        );
        assert_eq!(
            status(PaymentError::KeyReused.into()),
            (409, "idempotency_key_reused", None)
        );
        assert_eq!(
            status(SettlementError::BadHeader.into()),
            (400, "bad_csv_header", None)
        );
        assert_eq!(
            status(ThumbnailError::Unsupported.into()),
            (415, "unsupported_media_type", None)
        );
        let overloaded: ApiError = Overloaded {
            retry_after_secs: 3,
        }
        .into();
        assert_eq!(
            (overloaded.status.as_u16(), overloaded.retry_after),
            (503, Some(3))
        );
    }
}
