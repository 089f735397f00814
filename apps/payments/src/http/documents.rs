//! `POST /v1/documents/thumbnail`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body::read_limited;
use super::error::ApiError;
use crate::compute::thumbnail;
use crate::state::AppState;

pub(super) async fn thumbnail(
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
