//! `POST /v1/payments` and `GET /v1/payments/{id}`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::body::read_limited;
use super::error::ApiError;
use super::json_bytes;
use crate::domain::payment::{
    check_idempotency_key, parse_new_payment, PaymentError, MAX_PAYMENT_BODY,
};
use crate::events::Event;
use crate::state::AppState;
use crate::store::CreateOutcome;

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Order of checks: 413 → 400 key → 400 JSON → 422 → 409.
    let body = read_limited(&headers, body, MAX_PAYMENT_BODY).await?;
    let key = check_idempotency_key(headers.get("idempotency-key").map(|v| v.as_bytes()))?;
    let req = parse_new_payment(&body, state.merchants())?;
    let outcome = state
        .store()
        .blocking(move |s| s.create_payment(&key, &req))
        .await?;
    match outcome {
        CreateOutcome::Created(payment, body) => {
            let data = serde_json::to_value(&payment).unwrap_or(Value::Null);
            state.events().publish(Event::payment_captured(data));
            state.metrics().payment_created();
            Ok(json_bytes(StatusCode::CREATED, body))
        }
        CreateOutcome::Replayed(body) => {
            // Only creations are kept with a key, so the first answer was
            // this 201.
            let mut response = json_bytes(StatusCode::CREATED, body);
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        CreateOutcome::Conflict => Err(PaymentError::KeyReused.into()),
    }
}

pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let found = state.store().blocking(move |s| s.payment_json(&id)).await?;
    match found {
        Some(body) => Ok(json_bytes(StatusCode::OK, body)),
        None => Err(ApiError::not_found("payment")),
    }
}
