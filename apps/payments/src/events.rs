//! Events published to `/v1/events` subscribers.
//!
//! The router only talks to the [`Events`] trait. The local implementation
//! fans out within one process; the clustered main will plug in one backed by
//! corral's broadcast so a subscriber on any worker sees every worker's events.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One event: `{"type": "...", ...fields}` on the wire (the fields of
/// `data` sit beside `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `payment.captured`, `settlement.progress` or `settlement.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Event payload (a JSON object whose fields sit beside `type`).
    #[serde(flatten)]
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

/// Events shared by the whole cluster through corral's broadcast: a
/// subscriber on any worker sees every worker's events, in the order each
/// worker published them.
#[derive(Clone)]
pub struct ClusterEvents {
    worker: corral::Worker,
    local: broadcast::Sender<Arc<Event>>,
}

impl ClusterEvents {
    /// Starts relaying the cluster's events to this worker's subscribers.
    /// Call from within the worker's event loop.
    pub fn start(worker: corral::Worker) -> Self {
        let (local, _) = broadcast::channel(1024);
        let relay = local.clone();
        let mut published = worker.subscribe::<Event>();
        tokio::spawn(async move {
            while let Some(published) = published.recv().await {
                let _ = relay.send(Arc::new(published.message));
            }
        });
        ClusterEvents { worker, local }
    }
}

impl Events for ClusterEvents {
    fn publish(&self, event: Event) {
        if let Err(err) = self.worker.broadcast(&event) {
            tracing::warn!("event {} not published: {err}", event.kind);
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.local.subscribe()
    }
}
