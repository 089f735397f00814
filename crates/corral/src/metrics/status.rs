//! The cluster as the primary sees it: the `/status` JSON of the admin
//! address and of `corral status --json` (its shape is fixed in
//! interfaces.md), also the source of `/metrics`.

use serde::Serialize;

use super::WorkerStats;

/// A snapshot of the whole cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ClusterStatus {
    pub name: String,
    pub pid: u32,
    pub balance: String,
    pub listen: Vec<String>,
    /// How long the primary has run.
    pub uptime_s: f64,
    /// Each slot's current worker, ordered by slot.
    pub workers: Vec<WorkerSummary>,
    pub last_reload: Option<ReloadStatus>,
    /// The generation that passed its last reload (1: the first program).
    pub generation: u64,
    pub reloading: bool,
    /// A stop was asked for (the drain delay included).
    pub stopping: bool,
    /// During `--drain-delay`: seconds until the workers drain.
    pub drain_delay_left_s: Option<f64>,
    /// Cross-node broadcast figures (published, received, gaps, reconnects...).
    pub broadcast: Option<crate::broadcast::BroadcastStats>,
    /// Every slot, with or without a worker.
    pub slots: Vec<SlotStatus>,
}

/// One worker, in the fields scripts rely on; absent figures are `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WorkerSummary {
    pub slot: usize,
    pub pid: u32,
    pub generation: u64,
    /// `starting`, `ready` or `draining`.
    pub state: &'static str,
    pub uptime_s: f64,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub requests_per_s: Option<f64>,
    pub connections: Option<u64>,
    pub loop_delay_p99_ms: Option<f64>,
    pub pool_queued: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ReloadStatus {
    /// `completed`, `failed` or `rolled_back`.
    pub outcome: &'static str,
    pub generation: u64,
    pub reason: Option<String>,
}

/// One slot: its state, its serving worker (if any) and its history.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SlotStatus {
    pub slot: usize,
    /// `empty`, `starting`, `serving`, `replacing`, `backing_off`, `given_up` or `retiring`.
    pub state: &'static str,
    /// Workers started in this slot so far (first start, restarts, reloads).
    pub starts: u64,
    /// Young exits in a row (the crash-loop count).
    pub failures: u32,
    pub gave_up: bool,
    /// Seconds until a backing-off or given-up slot is tried again.
    pub next_retry_s: Option<f64>,
    pub worker: Option<WorkerStatus>,
    /// Older workers of this slot still finishing their requests.
    pub draining: Vec<u32>,
}

/// The slot's current worker, with its last heartbeat's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WorkerStatus {
    pub pid: u32,
    pub generation: u64,
    /// `starting`, `ready` or `draining`.
    pub state: &'static str,
    pub uptime_seconds: f64,
    pub stats: WorkerStats,
}
