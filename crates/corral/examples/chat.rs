//! A WebSocket chat spread over every core: each WebSocket goes to the
//! worker with the fewest open connections (`--balance least-conn`, the
//! default here), and every client sees every message whichever worker it
//! is on, through corral's cluster-wide broadcast — no Redis adapter needed.
//!
//! ```text
//! cargo run --release -p corral --example chat -- --listen 127.0.0.1:8080 --workers 2
//! open http://127.0.0.1:8080/
//! ```
//!
//! The page opens several sockets from the one browser (`/?sockets=N`,
//! default 4) and shows, per socket, the worker (slot and pid) holding it
//! and the messages it receives: a message sent on a socket held by worker 0
//! shows up on the sockets held by worker 1, so it crossed processes.
//!
//! WebSocket needs no stickiness: its connection stays on the worker that
//! accepted it. (Sticky balancing matters for long-polling fallbacks, whose
//! requests must all reach one worker: `--balance sticky` steers by client
//! address, so from one machine every tab lands on one worker.)
//!
//! Each socket first receives `{"welcome": true, "slot": S, "pid": P}` (the
//! worker holding it), then every message as `{"slot": S, "pid": P, "text":
//! "..."}`, where `S` and `P` are the worker that received it from its sender.

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
#[command(
    about = "corral's WebSocket chat: sockets spread over the workers, messages broadcast cluster-wide"
)]
struct Cli {
    #[command(flatten)]
    cluster: corral::ClusterArgs,
}

/// One chat line as it travels between workers and to clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChatLine {
    /// The slot of the worker that received the line from its sender.
    slot: usize,
    /// That worker's process id.
    pid: u32,
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
        // Long-lived sockets: the next one goes where the fewest are open,
        // so one browser's sockets land on different workers.
        cluster = cluster.balance(corral::Balance::LeastConnections);
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
    let pid = std::process::id();
    let welcome = serde_json::json!({"welcome": true, "slot": chat.worker.slot(), "pid": pid});
    if socket
        .send(Message::Text(welcome.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let line = ChatLine { slot: chat.worker.slot(), pid, text: text.to_string() };
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

/// Several sockets from one browser, each with the worker that holds it.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>corral chat</title>
<style>
body{font:15px system-ui;margin:1.5em}
#sockets{display:grid;grid-template-columns:repeat(auto-fill,minmax(18em,1fr));gap:1em}
.socket{border:1px solid #ccc;border-radius:6px;padding:.6em}
.socket h2{font-size:1em;margin:0 0 .4em}
.log{height:14em;overflow:auto;background:#fafafa;padding:.3em;font-size:.9em}
.log p{margin:.15em 0}.other{color:#06c;font-weight:600}
</style>
<h1>corral chat</h1>
<p>Each box is one WebSocket of this page, held by the worker named in its title.
A message sent on one socket reaches every socket; <span class="other">blue</span>
lines came from a different worker process than the one holding the socket.</p>
<div id="sockets"></div>
<script>
const count = Math.max(1, Math.min(16, Number(new URLSearchParams(location.search).get('sockets')) || 4));
const box = document.getElementById('sockets');
for (let i = 0; i < count; i++) {
  const div = document.createElement('div');
  div.className = 'socket';
  div.innerHTML = `<h2>socket ${i}: connecting…</h2><div class="log"></div>
    <form><input size="22" placeholder="send from socket ${i}"> <button>send</button></form>`;
  box.append(div);
  const title = div.querySelector('h2'), log = div.querySelector('.log');
  const ws = new WebSocket(`ws://${location.host}/ws`);
  let mine = null;
  ws.onmessage = e => {
    const m = JSON.parse(e.data);
    if (m.welcome) { mine = m.pid; title.textContent = `socket ${i}: worker ${m.slot} (pid ${m.pid})`; return; }
    const p = document.createElement('p');
    p.textContent = `[from worker ${m.slot}, pid ${m.pid}] ${m.text}`;
    if (m.pid !== mine) p.className = 'other';
    log.append(p); log.scrollTop = log.scrollHeight;
  };
  ws.onclose = () => { title.textContent += ' (closed)'; };
  div.querySelector('form').onsubmit = e => {
    e.preventDefault();
    const input = div.querySelector('input');
    if (input.value) ws.send(input.value);
    input.value = '';
  };
}
</script>
"#;
