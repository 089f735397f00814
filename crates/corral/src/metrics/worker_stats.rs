//! What a worker reports about itself with every heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A worker's figures at one heartbeat.
///
/// ```
/// let stats = corral::metrics::WorkerStats::default();
/// assert_eq!(stats.requests_total, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Requests seen by [`Worker::track_requests`](crate::Worker::track_requests).
    pub requests_total: u64,
    /// Requests currently being answered.
    pub requests_in_flight: u64,
    /// Connections accepted since the worker started.
    pub connections_total: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Resident set size of the worker process, in bytes.
    pub rss_bytes: u64,
    /// How late the event loop's timers fire (the loop's responsiveness).
    pub event_loop_delay: crate::metrics::LoopDelayStats,
    /// The worker's CPU pool.
    pub pool: crate::pool::PoolStats,
    /// How long the worker has been unable to take connections from the
    /// primary or its sockets (out of descriptors, say); 0 when it can.
    pub intake_blocked_ms: u64,
}

/// The live counters behind [`WorkerStats`], shared by the listener, the
/// request layer and the heartbeat.
#[derive(Debug, Default)]
pub(crate) struct WorkerCounters {
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
}

impl WorkerCounters {
    pub fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            requests_total: self.requests_total.load(Ordering::Relaxed),
            requests_in_flight: self.requests_in_flight.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_open: self.connections_open.load(Ordering::Relaxed),
            rss_bytes: super::ProcessFigures::this().map_or(0, |figures| figures.rss_bytes),
            ..WorkerStats::default()
        }
    }
}
