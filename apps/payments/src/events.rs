//! Events published to `/v1/events` subscribers.
//!
//! The router only talks to the [`Events`] trait. The local implementation
//! fans out within one process; the clustered main will plug in one backed by
//! corral's broadcast so a subscriber on any worker sees every worker's events.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One event: `{"type": "...", "data": {...}}` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// `payment.captured`, `settlement.progress` or `settlement.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Event payload.
    pub data: Value,
}

impl Event {
    /// A payment was captured; `data` is the payment as answered.
    pub fn payment_captured(payment: Value) -> Self {
        Event {
            kind: "payment.captured".into(),
            data: payment,
        }
    }

    /// Progress of a settlement batch.
    pub fn settlement_progress(batch_id: &str, processed: u64, total: u64) -> Self {
        Event {
            kind: "settlement.progress".into(),
            data: json!({"batch_id": batch_id, "processed": processed, "total": total}),
        }
    }

    /// A settlement batch finished; `data` is its result.
    pub fn settlement_completed(result: Value) -> Self {
        Event {
            kind: "settlement.completed".into(),
            data: result,
        }
    }

    /// The JSON text sent to subscribers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where the service publishes events and where subscribers listen.
pub trait Events: Send + Sync + 'static {
    /// Publish an event; never blocks, never fails the request that caused it.
    fn publish(&self, event: Event);
    /// A receiver of events published from now on.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>>;
}

/// In-process fan-out over a tokio broadcast channel.
#[derive(Debug, Clone)]
pub struct LocalEvents {
    tx: broadcast::Sender<Arc<Event>>,
}

impl LocalEvents {
    /// A channel keeping up to `capacity` events for slow subscribers (older
    /// ones are dropped for them; they are told they lagged).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        LocalEvents { tx }
    }
}

impl Default for LocalEvents {
    fn default() -> Self {
        LocalEvents::new(1024)
    }
}

impl Events for LocalEvents {
    fn publish(&self, event: Event) {
        // No subscribers is not an error.
        let _ = self.tx.send(Arc::new(event));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
