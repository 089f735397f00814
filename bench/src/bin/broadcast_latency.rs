//! Cross-node event latency through Redis: two broadcast nodes (as two
//! primaries run them) on one Redis server; node A publishes events at a fixed
//! rate, node B times each from `publish` to its delivery. The two nodes share
//! this process so one clock times both ends; the Redis round trip, the
//! encoding and both nodes' queues are all in the path. Worker↔primary IPC
//! (one hop on each node) is not.
//!
//! Usage: broadcast_latency redis://HOST:PORT [EVENTS_PER_S] [SECONDS] [PAYLOAD_BYTES]

use std::time::{Duration, Instant};

use corral::broadcast::{self, BroadcastConfig};
use hdrhistogram::Histogram;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect(
        "usage: broadcast_latency redis://HOST:PORT [EVENTS_PER_S] [SECONDS] [PAYLOAD_BYTES]",
    );
    let rate: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(2_000);
    let seconds: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(5);
    let size: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(200);

    let channel = format!("corral-bench:{}", std::process::id());
    let config = BroadcastConfig::redis(&url)
        .expect("a redis:// URL")
        .channel(channel);
    let (a, _a_local) = broadcast::start(&config).expect("node A");
    let (b, mut b_deliveries) = broadcast::start(&config).expect("node B");
    while !(a.stats().connected && b.stats().connected) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let epoch = Instant::now();
    let total = rate * seconds;
    let padding = "x".repeat(size.saturating_sub(40));
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
        for _ in 0..total {
            tick.tick().await;
            let sent = epoch.elapsed().as_nanos() as u64;
            let payload = format!(r#"{{"sent_ns":{sent},"pad":"{padding}"}}"#);
            a.publish(0, payload.into_bytes());
        }
        a
    });

    let mut latency = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(10), b_deliveries.recv())
            .await
            .expect("an event within 10 s")
            .expect("node B runs");
        let now = epoch.elapsed().as_nanos() as u64;
        let value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let sent = value["sent_ns"].as_u64().unwrap();
        latency.record((now - sent).max(1)).unwrap();
    }
    let a = publisher.await.unwrap();
    let (a_stats, b_stats) = (a.stats(), b.stats());
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e6;
    println!(
        "{{\"events\": {total}, \"events_per_s\": {rate}, \"payload_bytes\": {size}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"max_ms\": {:.3}, \"missed\": {}, \"dropped\": {}}}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1e6,
        b_stats.missed_total,
        a_stats.dropped_outgoing_total + b_stats.dropped_incoming_total
    );
}
