//! Measurements: event-loop delay, worker statistics.

mod event_loop_delay;
mod worker_stats;

pub use event_loop_delay::{EventLoopDelay, LoopDelayStats};
pub(crate) use worker_stats::WorkerCounters;
pub use worker_stats::WorkerStats;
