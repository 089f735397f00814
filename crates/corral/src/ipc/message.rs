//! The messages that cross a worker's IPC channel.

use serde::{Deserialize, Serialize};

use crate::metrics::WorkerStats;

/// From a worker to the primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToPrimary {
    /// The worker is accepting connections.
    Ready,
    /// The event loop is alive; sent from the loop itself every interval.
    Heartbeat(WorkerStats),
    /// The worker asks to be replaced (it reached its request limit).
    Recycle { reason: String },
    /// A user message for the primary's handler (JSON payload).
    User(Vec<u8>),
    /// A user message for every worker (JSON payload).
    Broadcast(Vec<u8>),
    /// The application's own metrics (OpenMetrics text), sent after each
    /// heartbeat by a worker that registered some.
    Metrics(String),
}

/// From the primary to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Stop accepting, finish in-flight requests, exit.
    Drain,
    /// A message some worker broadcast.
    Broadcast { from_slot: u32, payload: Vec<u8> },
    /// Like `Drain`, but the slot is going away (scaled down): accept what is
    /// already queued on its socket first, since no replacement will.
    Retire,
    /// The node is going away (`--drain-delay` runs): fail readiness, keep
    /// serving until `Drain`. Last, so older workers' variant numbers stay.
    NodeDraining,
}
