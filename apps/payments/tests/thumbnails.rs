//! `POST /v1/documents/thumbnail` over real TCP.

mod common;

use std::io::Cursor;

use common::*;
use image::{GenericImageView, ImageFormat, RgbImage, RgbaImage};
use serde_json::Value;

fn encode(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    match format {
        // JPEG cannot carry alpha.
        ImageFormat::Jpeg => RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .write_to(&mut out, format)
            .expect("encode"),
        _ => RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 7, 200]))
            .write_to(&mut out, format)
            .expect("encode"),
    }
    out.into_inner()
}

async fn thumb(s: &Server, body: Vec<u8>) -> reqwest::Response {
    s.client
        .post(s.url("/v1/documents/thumbnail"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("request")
}

async fn code_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("json");
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn thumbnails_fit_256_keeping_aspect() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let cases = [
        (ImageFormat::Png, 1024, 512, (256, 128)),
        (ImageFormat::Jpeg, 300, 1200, (64, 256)),
        (ImageFormat::WebP, 640, 480, (256, 192)),
        (ImageFormat::Png, 100, 50, (100, 50)),
    ];
    for (format, w, h, want) in cases {
        let resp = thumb(&s, encode(w, h, format)).await;
        assert_eq!(resp.status(), 200, "{format:?}");
        assert_eq!(resp.headers()["content-type"], "image/jpeg");
        let bytes = resp.bytes().await.expect("bytes");
        let img = image::load_from_memory_with_format(&bytes, ImageFormat::Jpeg).expect("jpeg");
        assert_eq!(img.dimensions(), want, "{format:?} {w}x{h}");
    }
}

#[tokio::test]
async fn unsupported_and_corrupt_images() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    assert_eq!(
        code_of(thumb(&s, b"GIF89a\x01\x00\x01\x00".to_vec()).await).await,
        (415, "unsupported_media_type".into())
    );
    assert_eq!(
        code_of(thumb(&s, b"hello world".to_vec()).await).await.0,
        415
    );
    assert_eq!(code_of(thumb(&s, Vec::new()).await).await.0, 415);
    // PNG signature then garbage.
    let mut bogus = b"\x89PNG\r\n\x1a\n".to_vec();
    bogus.extend_from_slice(&[0xAB; 64]);
    assert_eq!(
        code_of(thumb(&s, bogus).await).await,
        (422, "corrupt_image".into())
    );
    // A real PNG cut in the middle of its pixels.
    let mut cut = encode(200, 200, ImageFormat::Png);
    cut.truncate(cut.len() / 2);
    assert_eq!(code_of(thumb(&s, cut).await).await.0, 422);
    // A JPEG cut short.
    let mut cut = encode(200, 200, ImageFormat::Jpeg);
    cut.truncate(40);
    assert_eq!(code_of(thumb(&s, cut).await).await.0, 422);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG whose header claims `w`×`h` pixels, with almost no pixel data: only
/// a service that reads the header first can answer it quickly and cheaply.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[tokio::test]
async fn more_than_50_megapixels_is_413_before_decoding() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    assert_eq!(
        code_of(thumb(&s, png_header_only(10_000, 5_001)).await).await,
        (413, "image_too_large".into())
    );
    assert_eq!(
        code_of(thumb(&s, png_header_only(60_000, 60_000)).await)
            .await
            .0,
        413
    );
    // Exactly 50 MP passes the size check (and then fails to decode its
    // missing pixels: 422, not 413).
    assert_eq!(
        code_of(thumb(&s, png_header_only(10_000, 5_000)).await)
            .await
            .0,
        422
    );
}

#[tokio::test]
async fn document_body_limit_is_413() {
    let dir = data_dir();
    let mut cfg = config(dir.path());
    cfg.max_document_bytes = 1000;
    let s = serve(cfg, 0).await;
    let mut png = encode(64, 64, ImageFormat::Png);
    png.resize(1001, 0);
    assert_eq!(
        code_of(thumb(&s, png).await).await,
        (413, "payload_too_large".into())
    );
}
