//! `/v1/events` over a real WebSocket handshake (a minimal client, enough to
//! read server text frames).

mod common;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn read_frame(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("frame head");
    assert_eq!(head[0], 0x81, "final text frame");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await.expect("len");
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await.expect("len");
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.expect("payload");
    String::from_utf8(payload).expect("utf-8")
}

#[tokio::test]
async fn payment_captured_reaches_websocket_subscribers() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut ws = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let handshake = format!(
        "GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    ws.write_all(handshake.as_bytes()).await.expect("write");
    // Read the 101 answer up to the blank line.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        ws.read_exact(&mut b).await.expect("read");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // The subscription exists once the upgrade is answered; publish now.
    let resp = s
        .client
        .post(s.url("/v1/payments"))
        .header("Idempotency-Key", "ws-1")
        .body(r#"{"merchant_id":"acme","amount":5,"currency":"EUR","reference":"ws"}"#)
        .send()
        .await
        .expect("send");
    let payment: Value = resp.json().await.expect("json");
    let event: Value = serde_json::from_str(&read_frame(&mut ws).await).expect("event json");
    assert_eq!(event["type"], "payment.captured");
    let mut expected = payment.clone();
    expected["type"] = serde_json::json!("payment.captured");
    assert_eq!(event, expected);
}
