//! Measurements: event-loop delay, worker statistics, and the primary's view
//! of the cluster (`/status`, `/metrics`).

mod event_loop_delay;
mod process;
pub(crate) mod prometheus;
pub(crate) mod status;
mod worker_stats;

pub use event_loop_delay::{EventLoopDelay, LoopDelayStats};
pub(crate) use process::ProcessFigures;
pub(crate) use worker_stats::WorkerCounters;
pub use worker_stats::WorkerStats;
