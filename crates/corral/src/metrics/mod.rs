//! Measurements: event-loop delay, worker statistics, and the primary's view
//! of the cluster (`/status`, `/metrics`).

pub(crate) mod app_metrics;
mod event_loop_delay;
pub(crate) mod exposition;
mod process;
pub(crate) mod prometheus;
pub(crate) mod status;
mod worker_stats;

pub use event_loop_delay::{EventLoopDelay, LoopDelayStats};
pub(crate) use process::ProcessFigures;
pub(crate) use worker_stats::WorkerCounters;
pub use worker_stats::WorkerStats;

/// The `prometheus-client` crate corral encodes with: register application
/// metrics with [`Worker::register_metrics`](crate::Worker::register_metrics)
/// using this version's types (or depend on the same version yourself).
pub use prometheus_client;
