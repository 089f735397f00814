//! A WebSocket chat spread over every core: clients stick to a worker
//! (`--balance sticky`, the default here) and see each other's messages
//! whichever worker they are on, through corral's cluster-wide broadcast —
//! no Redis adapter needed.
//!
//! ```text
//! cargo run --release -p corral --example chat -- --listen 127.0.0.1:8080
//! open http://127.0.0.1:8080/ in two browsers
//! ```
//!
//! Every message reaches clients as `{"slot": S, "text": "..."}`, where `S` is
//! the slot of the worker that received it from its sender.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Parser)]
#[command(about = "corral's WebSocket chat: sticky sessions plus cluster-wide broadcast")]
struct Cli {
    #[command(flatten)]
    cluster: corral::ClusterArgs,
}

/// One chat line as it travels between workers and to clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChatLine {
    /// The slot of the worker that received the line from its sender.
    slot: usize,
    text: String,
}

#[derive(Clone)]
struct Chat {
    worker: corral::Worker,
    /// This worker's fan-out to its own WebSocket clients.
    local: broadcast::Sender<Arc<str>>,
}

fn main() -> corral::Result<()> {
    let cli = Cli::parse();
    let mut cluster = cli.cluster.builder();
    if cli.cluster.balance.is_none() {
        cluster = cluster.balance(corral::Balance::Sticky);
    }
    cluster.run(|worker| async move {
        let (local, _) = broadcast::channel(1024);
        let mut lines = worker.subscribe::<ChatLine>().into_stream();
        let fan_out = local.clone();
        tokio::spawn(async move {
            while let Some(published) = lines.next().await {
                if let Ok(json) = serde_json::to_string(&published.message) {
                    // No client connected here yet is fine.
                    let _ = fan_out.send(json.into());
                }
            }
        });
        let slot = worker.slot();
        let app = Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route(
                "/whoami",
                get(move || async move {
                    format!("hello from worker {slot} (pid {})", std::process::id())
                }),
            )
            .route("/ws", get(upgrade))
            .with_state(Chat {
                worker: worker.clone(),
                local,
            });
        worker.serve(app).await
    })
}

async fn upgrade(upgrade: WebSocketUpgrade, State(chat): State<Chat>) -> impl IntoResponse {
    // Subscribed before the handshake completes, so the client hears every
    // line sent after it sees the connection open.
    let lines = chat.local.subscribe();
    upgrade.on_upgrade(move |socket| converse(socket, chat, lines))
}

/// Relays one client's lines to the whole cluster and the cluster's lines to it.
async fn converse(mut socket: WebSocket, chat: Chat, mut lines: broadcast::Receiver<Arc<str>>) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let line = ChatLine { slot: chat.worker.slot(), text: text.to_string() };
                    if let Err(err) = chat.worker.broadcast(&line) {
                        let _ = socket.send(Message::Text(format!("{{\"error\": \"{err}\"}}").into())).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            line = lines.recv() => match line {
                Ok(json) => {
                    if socket.send(Message::Text(json.as_ref().into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = chat.worker.shutdown() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>corral chat</title>
<style>body{font:16px system-ui;max-width:40em;margin:2em auto}#log{height:20em;overflow:auto;border:1px solid #ccc;padding:.5em}</style>
<h1>corral chat</h1>
<div id="log"></div>
<form id="f"><input id="t" autofocus size="50"> <button>send</button></form>
<script>
const ws = new WebSocket(`ws://${location.host}/ws`);
const log = document.getElementById('log');
ws.onmessage = e => { const m = JSON.parse(e.data); const p = document.createElement('p');
  p.textContent = `[worker ${m.slot}] ${m.text}`; log.append(p); log.scrollTop = log.scrollHeight; };
document.getElementById('f').onsubmit = e => { e.preventDefault(); const t = document.getElementById('t');
  if (t.value) ws.send(t.value); t.value = ''; };
</script>
"#;
