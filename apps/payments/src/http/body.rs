//! Reading request bodies with a size limit.
//!
//! Handlers take the raw body and read it here so every endpoint answers an
//! oversized body with our JSON 413 (axum's extractors would answer in plain
//! text) and so the 413 comes before any other check.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::error::ApiError;

/// After a body without a `Content-Length` grows past its limit, read and
/// discard at most this much more of it, so the client (still sending) gets
/// to read the answer instead of a reset connection. Larger bodies are cut
/// off.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// The declared `Content-Length`, if any and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Read the whole body, or fail with 413 once it exceeds `limit` bytes.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = content_length(headers);
    if let Some(len) = declared {
        if len > limit as u64 {
            // Answered before a byte of the body is read (and without
            // `100 Continue`); the 413 closes the connection, so the unread
            // body is never waited for.
            return Err(ApiError::too_large(limit));
        }
    }
    let mut body = body;
    let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ApiError::body_read_failed)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body, DRAIN_LIMIT).await;
                return Err(ApiError::too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Read and drop up to `max` bytes of what is left of a body.
async fn drain(mut body: Body, max: usize) {
    let mut seen = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > max {
                break;
            }
        }
    }
}
