//! The HTTP API: routes, request bodies, the WebSocket, and (in [`error`])
//! the one place where errors become status codes. Handlers stay thin:
//! they read and check the request, hand CPU work to
//! [`crate::compute::Heavy`], blocking storage work to the store's
//! `blocking`, and shape the answer.

pub mod body;
mod documents;
pub mod error;
mod payments;
mod settlements;
mod ws;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{extract::State, Json, Router};
use serde_json::json;

use crate::state::AppState;
use error::ApiError;

/// The whole API as an axum router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/payments", post(payments::create))
        .route("/v1/payments/{id}", get(payments::get))
        .route("/v1/settlements", post(settlements::create))
        .route("/v1/settlements/{batch_id}", get(settlements::get))
        .route("/v1/documents/thumbnail", post(documents::thumbnail))
        .route("/v1/events", get(ws::events))
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state)
}

/// A JSON answer from bytes already serialized (stored answers are
/// replayed byte for byte).
fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Readiness and liveness: 200 while serving; 503 as soon as the node
/// drains, while the workers still serve, so a readiness probe or a load
/// balancer's health check moves traffic away before they stop accepting.
/// (A liveness probe on it must tolerate failures for longer than
/// `--drain-delay` plus `--shutdown-timeout`.)
async fn health(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        let body = Json(json!({"status": "draining", "worker": state.slot()}));
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    Json(json!({"status": "ok", "worker": state.slot()})).into_response()
}
