//! Measurements: event-loop delay, worker statistics.

mod worker_stats;

pub(crate) use worker_stats::WorkerCounters;
pub use worker_stats::WorkerStats;
