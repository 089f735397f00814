//! `POST /v1/settlements` (synchronous or `?async=true`) and
//! `GET /v1/settlements/{batch_id}`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::body::read_limited;
use super::error::ApiError;
use crate::domain::ids::new_batch_id;
use crate::domain::settlement::{check_all, count_lines, split_header};
use crate::events::Event;
use crate::jobs;
use crate::state::AppState;

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
        Err(ApiError::unsupported_media_type(
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
                _ => return Err(ApiError::invalid_query("async must be true or false")),
            };
        }
    }
    Ok(wants)
}

pub(super) async fn create(
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
            let total = count_lines(data) as u64;
            let started = std::time::Instant::now();
            let lines = check_all(data, st.merchants(), |done| {
                st.events()
                    .publish(Event::settlement_progress(&batch_id, done as u64, total));
            });
            st.metrics().settlement_checked(&lines, started.elapsed());
            st.store().settle(&batch_id, &lines, None)
        })
        .await??;
    let Some(result) = result else {
        return Err(ApiError::internal("synchronous batch was not settled"));
    };
    jobs::publish_completed(&state, &result);
    Ok((StatusCode::OK, Json(result)).into_response())
}

pub(super) async fn get(
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
