//! What the broadcast has done, for `/status` and `/metrics`: every loss is
//! a number here as well as a log line.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of a node's broadcast figures, from
/// [`BroadcastPublisher::stats`](super::BroadcastPublisher::stats).
///
/// Counters only grow; `connected` and `senders` are the state now. Every
/// way a message can be lost has its own counter, so a loss is never silent.
///
/// ```
/// let stats = corral::broadcast::BroadcastStats::default();
/// assert_eq!(stats.gaps_total, 0);
/// let json = serde_json::to_value(&stats).unwrap();
/// assert!(json.get("missed_total").is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BroadcastStats {
    /// The backend (`"in-cluster"` or `"redis"`).
    pub backend: &'static str,
    /// True while the subscription to the other nodes is up (always true
    /// in-cluster).
    pub connected: bool,
    /// Messages from this node's workers delivered to this node's workers.
    pub local_total: u64,
    /// Messages from this node published to the other nodes.
    pub published_total: u64,
    /// Failed publish attempts (each is retried with back-off).
    pub publish_errors_total: u64,
    /// Messages from other nodes delivered to this node's workers.
    pub received_total: u64,
    /// Messages not sent to the other nodes because the outgoing queue was full.
    pub dropped_outgoing_total: u64,
    /// Messages not delivered to this node's workers because the delivery
    /// queue was full (the supervisor fell behind).
    pub dropped_incoming_total: u64,
    /// Times the subscription was re-established after it was lost.
    pub reconnects_total: u64,
    /// Milliseconds the subscription has spent down after having been up.
    pub down_ms_total: u64,
    /// Runs of messages from another node that never arrived, detected by
    /// their sequence numbers.
    pub gaps_total: u64,
    /// Messages in those runs.
    pub missed_total: u64,
    /// Messages that arrived twice (a retried publish) and were skipped.
    pub duplicates_total: u64,
    /// Frames on the channel that were not corral's, or of another version.
    pub malformed_total: u64,
    /// Other nodes heard from recently.
    pub senders: u64,
}

/// The live counters behind [`BroadcastStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connected: AtomicBool,
    pub local: AtomicU64,
    pub published: AtomicU64,
    pub publish_errors: AtomicU64,
    pub received: AtomicU64,
    pub reconnects: AtomicU64,
    pub down_ms: AtomicU64,
    pub gaps: AtomicU64,
    pub missed: AtomicU64,
    pub duplicates: AtomicU64,
    pub malformed: AtomicU64,
    pub senders: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(
        &self,
        backend: &'static str,
        dropped_outgoing: u64,
        dropped_incoming: u64,
    ) -> BroadcastStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BroadcastStats {
            backend,
            connected: self.connected.load(Ordering::Relaxed),
            local_total: get(&self.local),
            published_total: get(&self.published),
            publish_errors_total: get(&self.publish_errors),
            received_total: get(&self.received),
            dropped_outgoing_total: dropped_outgoing,
            dropped_incoming_total: dropped_incoming,
            reconnects_total: get(&self.reconnects),
            down_ms_total: get(&self.down_ms),
            gaps_total: get(&self.gaps),
            missed_total: get(&self.missed),
            duplicates_total: get(&self.duplicates),
            malformed_total: get(&self.malformed),
            senders: get(&self.senders),
        }
    }
}
