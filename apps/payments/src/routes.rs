//! The HTTP API: routes and handlers. Handlers stay thin: they read and
//! check the request, hand CPU work to [`crate::heavy::Heavy`] and blocking
//! storage work to [`crate::store::Store::blocking`], and shape the answer.

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::body::read_limited;
use crate::error::ApiError;
use crate::events::Event;
use crate::jobs;
use crate::payment::{check_idempotency_key, key_conflict, parse_new_payment, MAX_PAYMENT_BODY};
use crate::settlement::{check_all, new_batch_id, split_header};
use crate::state::AppState;
use crate::store::CreateOutcome;
use crate::thumbnail;

/// The whole API as an axum router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/payments", post(create_payment))
        .route("/v1/payments/{id}", get(get_payment))
        .route("/v1/settlements", post(create_settlement))
        .route("/v1/settlements/{batch_id}", get(get_settlement))
        .route("/v1/documents/thumbnail", post(create_thumbnail))
        .route("/v1/events", get(events))
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state)
}

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

async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "worker": state.slot()}))
}

async fn create_payment(
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
            Ok(json_bytes(StatusCode::CREATED, body))
        }
        CreateOutcome::Replayed { status, body } => {
            let status = StatusCode::from_u16(status).map_err(ApiError::internal)?;
            let mut response = json_bytes(status, body);
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        CreateOutcome::Conflict => Err(key_conflict()),
    }
}

async fn get_payment(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let found = state.store().blocking(move |s| s.payment_json(&id)).await?;
    match found {
        Some(body) => Ok(json_bytes(StatusCode::OK, body)),
        None => Err(ApiError::not_found("payment")),
    }
}

/// `text/csv`, `application/csv` (with any parameters) or no content type.
fn check_csv_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let mime = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "text/csv" || mime == "application/csv" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "settlements must be sent as text/csv",
        ))
    }
}

/// Whether `?async=true` was asked for.
fn wants_async(query: Option<&str>) -> Result<bool, ApiError> {
    let mut wants = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "async" {
            wants = match v {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        "async must be true or false",
                    ))
                }
            };
        }
    }
    Ok(wants)
}

async fn create_settlement(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let is_async = wants_async(query.as_deref())?;
    check_csv_content_type(&headers)?;
    let body = read_limited(&headers, body, state.config().max_settlement_bytes).await?;
    split_header(&body)?;

    if is_async {
        let batch_id = jobs::submit(&state, body).await?;
        let location = format!("/v1/settlements/{batch_id}");
        let mut response =
            (StatusCode::ACCEPTED, Json(json!({"batch_id": batch_id}))).into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(response);
    }

    let st = state.clone();
    let result = state
        .heavy()
        .try_run(move || {
            let batch_id = new_batch_id();
            let data = split_header(&body).unwrap_or(&[]);
            let total = crate::settlement::count_lines(data) as u64;
            let lines = check_all(data, st.merchants(), |done| {
                st.events()
                    .publish(Event::settlement_progress(&batch_id, done as u64, total));
            });
            st.store().settle(&batch_id, &lines, None)
        })
        .await??;
    let Some(result) = result else {
        return Err(ApiError::internal("synchronous batch was not settled"));
    };
    jobs::publish_completed(&state, &result);
    Ok((StatusCode::OK, Json(result)).into_response())
}

async fn get_settlement(
    State(state): State<AppState>,
    Path(batch_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = batch_id.clone();
    let Some(row) = state.store().blocking(move |s| s.batch(&id)).await? else {
        return Err(ApiError::not_found("settlement batch"));
    };
    let mut out = Map::new();
    out.insert("batch_id".into(), json!(batch_id));
    if let Some(result) = row.result.as_deref() {
        if let Value::Object(fields) =
            serde_json::from_str::<Value>(result).map_err(ApiError::internal)?
        {
            out.extend(fields);
        }
    }
    out.insert("status".into(), json!(row.status));
    out.insert("processed".into(), json!(row.processed));
    out.insert("total".into(), json!(row.total));
    Ok(Json(Value::Object(out)).into_response())
}

async fn create_thumbnail(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_limited(&headers, body, state.config().max_document_bytes).await?;
    // Header-only: refuses huge images before any pixel is decoded.
    let plan = thumbnail::plan(&body)?;
    let reservation = state
        .decode_budget()
        .try_reserve(&plan)
        .map_err(|_| ApiError::overloaded(state.config().retry_after_secs))?;
    let jpeg = state
        .heavy()
        .try_run(move || {
            let _reserved = reservation;
            thumbnail::make_thumbnail(&body, &plan)
        })
        .await??;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))],
        jpeg,
    )
        .into_response())
}

async fn events(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let rx = state.events().subscribe();
    ws.on_upgrade(move |socket| stream_events(socket, rx))
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<std::sync::Arc<Event>>,
) {
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Ok(event) => {
                    if socket.send(Message::Text(event.to_json().into())).await.is_err() {
                        return;
                    }
                }
                // A slow subscriber misses some events rather than slowing
                // everyone down.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
