//! `GET /metrics`: the cluster's figures in the Prometheus text format,
//! encoded by `prometheus-client` from a [`ClusterStatus`] snapshot.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::status::ClusterStatus;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Renders the snapshot; each scrape builds a fresh registry, so the figures
/// are exactly the last heartbeat of each worker.
pub(crate) fn render(status: &ClusterStatus) -> String {
    let mut registry = Registry::with_prefix("corral");
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<Labels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    let gauge = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<Labels, FloatGauge>::default();
        registry.register(name, help, family.clone());
        family
    };
    let starts = counter(
        &mut registry,
        "slot_starts",
        "Workers started in the slot (first start, restarts, reloads)",
    );
    let serving = gauge(
        &mut registry,
        "slot_serving",
        "1 when the slot has a ready worker",
    );
    let requests = counter(
        &mut registry,
        "worker_requests",
        "Requests seen by the worker",
    );
    let in_flight = gauge(
        &mut registry,
        "worker_requests_in_flight",
        "Requests being answered",
    );
    let connections = counter(
        &mut registry,
        "worker_connections",
        "Connections accepted by the worker",
    );
    let open = gauge(
        &mut registry,
        "worker_connections_open",
        "Connections open now",
    );
    let rss = gauge(
        &mut registry,
        "worker_resident_memory_bytes",
        "Resident set size of the worker",
    );
    let delay = gauge(
        &mut registry,
        "worker_event_loop_delay_seconds",
        "How late the event loop's timers fire",
    );
    let pool_queued = gauge(
        &mut registry,
        "worker_pool_queued_tasks",
        "Tasks waiting for a pool thread",
    );
    let pool_running = gauge(
        &mut registry,
        "worker_pool_running_tasks",
        "Tasks running on the pool",
    );
    let pool_utilisation = gauge(
        &mut registry,
        "worker_pool_utilisation_ratio",
        "Share of pool thread time spent running tasks",
    );
    let pool_tasks = counter(&mut registry, "worker_pool_tasks", "Pool tasks by outcome");

    for slot in &status.slots {
        let slot_label: Labels = vec![("slot", slot.slot.to_string())];
        starts.get_or_create(&slot_label).inc_by(slot.starts);
        let Some(worker) = &slot.worker else {
            serving.get_or_create(&slot_label).set(0.0);
            continue;
        };
        serving
            .get_or_create(&slot_label)
            .set(if worker.state == "ready" { 1.0 } else { 0.0 });
        let labels: Labels = vec![
            ("slot", slot.slot.to_string()),
            ("pid", worker.pid.to_string()),
        ];
        let stats = &worker.stats;
        requests.get_or_create(&labels).inc_by(stats.requests_total);
        in_flight
            .get_or_create(&labels)
            .set(stats.requests_in_flight as f64);
        connections
            .get_or_create(&labels)
            .inc_by(stats.connections_total);
        open.get_or_create(&labels)
            .set(stats.connections_open as f64);
        rss.get_or_create(&labels).set(stats.rss_bytes as f64);
        let loop_delay = &stats.event_loop_delay;
        for (quantile, ms) in [
            ("0.5", loop_delay.p50_ms),
            ("0.99", loop_delay.p99_ms),
            ("1", loop_delay.max_ms),
        ] {
            let mut with_quantile = labels.clone();
            with_quantile.push(("quantile", quantile.to_owned()));
            delay.get_or_create(&with_quantile).set(ms / 1000.0);
        }
        let pool = &stats.pool;
        pool_queued.get_or_create(&labels).set(pool.queued as f64);
        pool_running.get_or_create(&labels).set(pool.running as f64);
        pool_utilisation
            .get_or_create(&labels)
            .set(pool.utilisation);
        for (outcome, count) in [
            ("completed", pool.completed),
            ("failed", pool.failed),
            ("rejected", pool.rejected),
            ("cancelled", pool.cancelled),
            ("timed_out", pool.timed_out),
        ] {
            let mut with_outcome = labels.clone();
            with_outcome.push(("outcome", outcome.to_owned()));
            pool_tasks.get_or_create(&with_outcome).inc_by(count);
        }
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::status::{SlotStatus, WorkerStatus};

    #[test]
    fn every_serving_worker_is_labelled_by_slot_and_pid() {
        let mut status = ClusterStatus::default();
        let mut worker = WorkerStatus {
            pid: 4242,
            state: "ready",
            ..WorkerStatus::default()
        };
        worker.stats.requests_total = 17;
        worker.stats.event_loop_delay.p99_ms = 2.5;
        status.slots.push(SlotStatus {
            slot: 1,
            starts: 3,
            worker: Some(worker),
            ..SlotStatus::default()
        });
        let text = render(&status);
        assert!(
            text.contains(r#"corral_worker_requests_total{slot="1",pid="4242"} 17"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_slot_starts_total{slot="1"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_worker_event_loop_delay_seconds{slot="1",pid="4242",quantile="0.99"} 0.0025"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
