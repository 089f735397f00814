//! Why a pool task produced no value.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// Why a task submitted to a [`Pool`](super::Pool) produced no value.
///
/// It converts into an HTTP response, so an axum handler can use `?`:
/// [`QueueFull`](PoolError::QueueFull) and [`TimedOut`](PoolError::TimedOut)
/// become `503 Service Unavailable` with `Retry-After: 1`, a panic becomes
/// `500 Internal Server Error`.
///
/// ```
/// use axum::response::IntoResponse;
/// use corral::pool::PoolError;
///
/// let response = PoolError::QueueFull.into_response();
/// assert_eq!(response.status(), 503);
/// assert_eq!(response.headers()["retry-after"], "1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The queue was at its bound and the task was rejected without running
    /// (only [`Pool::try_run`](super::Pool::try_run) and
    /// [`Pool::try_run_with`](super::Pool::try_run_with) fail this way).
    #[error("the pool's queue is full")]
    QueueFull,
    /// The task panicked; the message is the panic's payload when it was a
    /// string. The pool keeps all its threads.
    #[error("the task panicked: {0}")]
    Panicked(String),
    /// The deadline set by [`Task::timeout`](super::Task::timeout) passed
    /// first. A task that had not started is removed; a running one sees
    /// [`TaskContext::is_cancelled`](super::TaskContext::is_cancelled).
    #[error("the task timed out")]
    TimedOut,
    /// The task saw its cancellation and stopped early
    /// (see [`TaskContext::map_chunks`](super::TaskContext::map_chunks)).
    #[error("the task was cancelled")]
    Cancelled,
}

impl IntoResponse for PoolError {
    fn into_response(self) -> Response {
        let status = match self {
            // Overload and slowness are temporary: tell the client to come back.
            PoolError::QueueFull | PoolError::TimedOut => StatusCode::SERVICE_UNAVAILABLE,
            PoolError::Panicked(_) | PoolError::Cancelled => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = (status, self.to_string()).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}
