//! The cluster as the primary sees it, for `/status` and `/metrics`.

use serde::Serialize;

use super::WorkerStats;

/// A snapshot of the whole cluster (`GET /status` on the admin address).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ClusterStatus {
    pub pid: u32,
    pub balance: String,
    pub listen: Vec<String>,
    pub reloading: bool,
    pub stopping: bool,
    pub slots: Vec<SlotStatus>,
}

/// One slot: its serving worker (if any) and how often it was started.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SlotStatus {
    pub slot: usize,
    /// Workers started in this slot so far (first start, restarts, reloads).
    pub starts: u64,
    /// Failed starts or crashes in a row.
    pub failures: u32,
    pub gave_up: bool,
    pub worker: Option<WorkerStatus>,
    /// Older workers of this slot still finishing their requests.
    pub draining: Vec<u32>,
}

/// The slot's current worker.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WorkerStatus {
    pub pid: u32,
    pub generation: u64,
    /// `starting` or `ready`.
    pub state: &'static str,
    pub uptime_seconds: f64,
    pub stats: WorkerStats,
}
