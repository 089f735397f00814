//! Document thumbnails: PNG, JPEG or WebP in, JPEG of at most 256×256 out.
//!
//! The cheap checks (format sniffing, dimensions from the header) run before
//! any decoding so a huge or bogus image is refused without allocating for
//! its pixels; decoding and resizing are CPU work for the pool.

use std::io::Cursor;

use axum::http::StatusCode;
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{ImageFormat, ImageReader};

use crate::error::ApiError;

/// Largest image accepted, in pixels.
pub const MAX_PIXELS: u64 = 50_000_000;

/// Thumbnails fit in a square of this side.
pub const MAX_SIDE: u32 = 256;

/// JPEG quality of thumbnails.
const QUALITY: u8 = 85;

/// The image format from the body's magic bytes; anything other than PNG,
/// JPEG or WebP is 415.
pub fn sniff(body: &[u8]) -> Result<ImageFormat, ApiError> {
    match image::guess_format(body) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => Ok(f),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the document must be a PNG, JPEG or WebP image",
        )),
    }
}

fn corrupt(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "corrupt_image",
        format!("the image could not be decoded: {e}"),
    )
}

/// Width and height read from the header only; 422 if unreadable, 413 if
/// over [`MAX_PIXELS`].
pub fn check_dimensions(body: &[u8], format: ImageFormat) -> Result<(u32, u32), ApiError> {
    let (w, h) = ImageReader::with_format(Cursor::new(body), format)
        .into_dimensions()
        .map_err(corrupt)?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
            format!("the image has {w}×{h} pixels; at most {MAX_PIXELS} are accepted"),
        ));
    }
    if w == 0 || h == 0 {
        return Err(corrupt("empty image"));
    }
    Ok((w, h))
}

/// Size that fits `w`×`h` in [`MAX_SIDE`]² keeping the aspect ratio; images
/// already small enough keep their size (never upscaled).
pub fn fit(w: u32, h: u32) -> (u32, u32) {
    if w <= MAX_SIDE && h <= MAX_SIDE {
        return (w, h);
    }
    let scale = f64::from(MAX_SIDE) / f64::from(w.max(h));
    let nw = ((f64::from(w) * scale).round() as u32).clamp(1, MAX_SIDE);
    let nh = ((f64::from(h) * scale).round() as u32).clamp(1, MAX_SIDE);
    (nw, nh)
}

/// Decode, shrink and encode as JPEG. CPU-heavy: run on the pool.
pub fn make_thumbnail(body: &[u8], format: ImageFormat) -> Result<Vec<u8>, ApiError> {
    let (w, h) = check_dimensions(body, format)?;
    let img = ImageReader::with_format(Cursor::new(body), format)
        .decode()
        .map_err(corrupt)?;
    let (nw, nh) = fit(w, h);
    let small = if (nw, nh) == (w, h) {
        img
    } else {
        img.resize_exact(nw, nh, FilterType::Triangle)
    };
    // JPEG has no alpha channel.
    let rgb = small.to_rgb8();
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(&rgb)
        .map_err(ApiError::internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect() {
        assert_eq!(fit(100, 50), (100, 50));
        assert_eq!(fit(1024, 512), (256, 128));
        assert_eq!(fit(300, 1200), (64, 256));
        assert_eq!(fit(10_000, 1), (256, 1));
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff(b"GIF89a....").map_err(|e| e.status.as_u16()),
            Err(415)
        );
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n").ok(), Some(ImageFormat::Png));
    }
}
