//! The primary's admin address: `/status` (JSON), `/metrics` (Prometheus:
//! corral's figures and the workers' own, merged by slot) and `/` (a live
//! dashboard), read from the snapshot the supervisor publishes after every
//! event. Off unless asked for; meant for loopback.

use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics::app_metrics::SharedAppMetrics;
use crate::metrics::status::ClusterStatus;
use crate::metrics::{exposition, prometheus};

/// The latest snapshot, shared by the supervisor (writer) and the admin routes.
pub(crate) type SharedStatus = Arc<Mutex<ClusterStatus>>;

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    status: SharedStatus,
    app_metrics: SharedAppMetrics,
) {
    let snapshot = move || {
        status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    };
    let for_metrics = snapshot.clone();
    // The problems the last scrape logged, so a lasting conflict is logged
    // once, not on every scrape.
    let logged = Arc::new(Mutex::new(Vec::<String>::new()));
    let metrics = move || {
        let own = prometheus::render(&for_metrics());
        let texts = app_metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .texts();
        let slots: Vec<(usize, &str)> = texts.iter().map(|(slot, text)| (*slot, &**text)).collect();
        let merged = exposition::merge(&own, &slots);
        let mut logged = logged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for problem in merged.skipped.iter().filter(|p| !logged.contains(p)) {
            tracing::warn!("/metrics: {problem}");
        }
        *logged = merged.skipped;
        merged.text
    };
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
                    metrics(),
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
td:first-child,th:first-child{text-align:left}.bad{color:#b00}.dim{color:#888}
.spark{font-family:monospace;letter-spacing:-1px;color:#36c}
</style>
<h1>corral <small id="head"></small></h1>
<p id="totals"></p>
<table><thead><tr><th>slot</th><th>pid</th><th>gen</th><th>state</th><th>uptime s</th>
<th>restarts</th><th>last exit</th><th>CPU %</th><th>RSS MiB</th><th>req/s</th><th>req/s, last minute</th>
<th>conns</th><th>loop p99 ms</th><th>pool queued</th><th>draining</th></tr></thead><tbody id="rows"></tbody></table>
<p id="reload" class="dim"></p>
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a></p>
<script>
const history = {};
const bars = '▁▂▃▄▅▆▇█';
function spark(values) {
  const max = Math.max(1, ...values);
  return values.map(v => bars[Math.min(7, Math.floor(v / max * 7.99))]).join('');
}
const fmt = (v, digits) => v === null || v === undefined ? '' : Number(v).toFixed(digits);
const esc = t => String(t ?? '').replace(/[&<>]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c]));
async function tick() {
  const s = await (await fetch('/status')).json();
  document.getElementById('head').textContent =
    `${s.name} · pid ${s.pid} · balance=${s.balance} · ${s.listen.join(', ')} · generation ${s.generation}` +
    `${s.reloading ? ' · reloading' : ''}${s.stopping ? ' · stopping' : ''}`;
  const byslot = {};
  for (const w of s.workers) byslot[w.slot] = w;
  let rps = 0, rss = 0, conns = 0, cpu = 0;
  document.getElementById('rows').innerHTML = s.slots.map(slot => {
    const w = byslot[slot.slot];
    const h = history[slot.slot] = (history[slot.slot] || []).concat([w && w.requests_per_s || 0]).slice(-60);
    if (w) { rps += w.requests_per_s || 0; rss += w.rss_bytes || 0; conns += w.connections || 0; cpu += w.cpu_percent || 0; }
    const state = slot.state === 'given_up'
      ? `<span class="bad">given up${slot.next_retry_s !== null ? ` (retry in ${fmt(slot.next_retry_s, 0)} s)` : ''}</span>`
      : slot.state === 'backing_off' ? `<span class="bad">backing off (${fmt(slot.next_retry_s, 1)} s)</span>`
      : esc(w ? w.state : slot.state);
    return `<tr><td>${slot.slot}</td><td>${w ? w.pid : ''}</td><td>${w ? w.generation : ''}</td><td>${state}</td>
      <td>${w ? fmt(w.uptime_s, 0) : ''}</td><td>${w ? w.restarts : ''}</td>
      <td class="${w && w.last_exit ? 'bad' : ''}">${esc(w ? w.last_exit : '')}</td>
      <td>${w ? fmt(w.cpu_percent, 1) : ''}</td><td>${w && w.rss_bytes ? fmt(w.rss_bytes / 1048576, 1) : ''}</td>
      <td>${w ? fmt(w.requests_per_s, 1) : ''}</td><td class="spark">${spark(h)}</td>
      <td>${w ? (w.connections ?? '') : ''}</td><td>${w ? fmt(w.loop_delay_p99_ms, 2) : ''}</td>
      <td>${w ? (w.pool_queued ?? '') : ''}</td><td>${slot.draining.join(' ')}</td></tr>`;
  }).join('');
  document.getElementById('totals').textContent =
    `${s.workers.length} workers · ${fmt(rps, 1)} req/s · ${conns} connections · CPU ${fmt(cpu, 1)} % · RSS ${fmt(rss / 1048576, 1)} MiB`;
  const r = s.last_reload;
  document.getElementById('reload').textContent = r
    ? `last reload: ${r.outcome} (generation ${r.generation})${r.reason ? ': ' + r.reason : ''}` : 'no reload yet';
}
tick(); setInterval(tick, 1000);
</script>
"#;
