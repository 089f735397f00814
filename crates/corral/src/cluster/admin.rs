//! The primary's admin address: `/status` (JSON), `/metrics` (Prometheus) and
//! `/` (a live dashboard), read from the snapshot the supervisor publishes
//! after every event. Off unless asked for; meant for loopback.

use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics::prometheus;
use crate::metrics::status::ClusterStatus;

/// The latest snapshot, shared by the supervisor (writer) and the admin routes.
pub(crate) type SharedStatus = Arc<Mutex<ClusterStatus>>;

pub(crate) async fn serve(listener: tokio::net::TcpListener, status: SharedStatus) {
    let snapshot = move || {
        status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    };
    let for_metrics = snapshot.clone();
    let app = Router::new()
        .route("/status", get(move || async move { Json(snapshot()) }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    prometheus::render(&for_metrics()),
                )
                    .into_response()
            }),
        )
        .route("/", get(|| async { Html(DASHBOARD) }));
    if let Err(err) = axum::serve(listener, app).await {
        tracing::error!("the admin server stopped: {err}");
    }
}

const DASHBOARD: &str = r#"<!doctype html>
<meta charset="utf-8"><title>corral</title>
<style>
body{font:14px system-ui;margin:2em}table{border-collapse:collapse}
td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.bad{color:#b00}
</style>
<h1>corral <small id="head"></small></h1>
<table><thead><tr><th>slot</th><th>pid</th><th>state</th><th>uptime s</th><th>starts</th>
<th>requests</th><th>open conns</th><th>RSS MiB</th><th>loop delay p99 ms</th>
<th>pool queued</th><th>pool util %</th></tr></thead><tbody id="rows"></tbody></table>
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a></p>
<script>
async function tick() {
  const s = await (await fetch('/status')).json();
  document.getElementById('head').textContent =
    `pid ${s.pid} · balance=${s.balance} · ${s.listen.join(', ')}${s.reloading ? ' · reloading' : ''}${s.stopping ? ' · stopping' : ''}`;
  document.getElementById('rows').innerHTML = s.slots.map(slot => {
    const w = slot.worker, st = w ? w.stats : null;
    const state = slot.gave_up ? '<span class="bad">given up</span>' : (w ? w.state : 'restarting');
    return `<tr><td>${slot.slot}</td><td>${w ? w.pid : ''}</td><td>${state}</td>
      <td>${w ? w.uptime_seconds.toFixed(0) : ''}</td><td>${slot.starts}</td>
      <td>${st ? st.requests_total : ''}</td><td>${st ? st.connections_open : ''}</td>
      <td>${st ? (st.rss_bytes / 1048576).toFixed(1) : ''}</td>
      <td>${st ? st.event_loop_delay.p99_ms.toFixed(2) : ''}</td>
      <td>${st ? st.pool.queued : ''}</td><td>${st ? (st.pool.utilisation * 100).toFixed(0) : ''}</td></tr>`;
  }).join('');
}
tick(); setInterval(tick, 1000);
</script>
"#;
