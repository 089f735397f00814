//! Cluster-wide broadcast in the primary: what
//! [`Worker::broadcast`](crate::Worker::broadcast) sends and
//! [`Worker::subscribe`](crate::Worker::subscribe) receives, within one node
//! (the default) or across every node on one Redis server.
//!
//! The primary hands each worker broadcast to a [`BroadcastPublisher`] and
//! forwards each [`Delivered`] message from [`Deliveries`] to its local
//! workers. With a remote backend:
//!
//! - a message is delivered to this node's workers at once, and published
//!   once, as one frame, for every other node; each node skips its own frames,
//!   so a Redis outage never stops broadcast inside a node, and local
//!   subscribers get their node's messages without a round trip;
//! - each node numbers its frames, so order per sender is kept (one
//!   connection publishes them in turn) and a message that never arrives is
//!   seen: its sender's next number, or its next heartbeat, shows the gap;
//! - a lost connection is retried with back-off; the outage and what was
//!   missed are logged and counted in [`BroadcastStats`], never hidden;
//! - every queue is bounded in messages and bytes; a full one drops the
//!   message, counts it and logs it, and the caller never waits.
//!
//! ```no_run
//! # async fn demo() -> corral::Result<()> {
//! use corral::broadcast::{self, BroadcastConfig};
//!
//! let config = BroadcastConfig::redis("redis://127.0.0.1:6379")?.channel("demo");
//! let (publisher, mut deliveries) = broadcast::start(&config)?;
//! publisher.publish(0, br#"{"event":"payment.captured"}"#.to_vec());
//! while let Some(message) = deliveries.recv().await {
//!     println!("slot {} of node {}: {} bytes", message.from_slot, message.from_node, message.payload.len());
//! }
//! # Ok(())
//! # }
//! ```

mod backend;
mod envelope;
mod link;
mod queue;
mod redis;
mod sequence;
mod stats;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use self::backend::{BroadcastBackend, FrameStream};
pub use self::redis::RedisBackend;
pub use self::stats::BroadcastStats;

use self::envelope::Frame;
use self::link::Link;
use self::queue::{QueueReceiver, QueueSender};
use self::stats::Counters;
use crate::cluster::MAX_MESSAGE_BYTES;
use crate::error::{Error, Result};

/// Where broadcast messages go: this node only (the default) or every node
/// on a backend. Given to [`ClusterBuilder::broadcast`](crate::ClusterBuilder::broadcast).
///
/// ```
/// use corral::broadcast::BroadcastConfig;
///
/// assert!(BroadcastConfig::default().is_in_cluster());
/// let redis: BroadcastConfig = "redis://127.0.0.1:6379/1".parse()?;
/// assert!(!redis.is_in_cluster());
/// let err = "127.0.0.1:6379".parse::<BroadcastConfig>().unwrap_err();
/// assert!(err.to_string().contains("redis://HOST:PORT[/DB]"));
/// # Ok::<(), corral::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct BroadcastConfig {
    backend: Backend,
    options: BroadcastOptions,
}

#[derive(Clone, Default)]
enum Backend {
    #[default]
    InCluster,
    Redis {
        url: String,
        channel: Option<String>,
    },
    Custom(Arc<dyn BroadcastBackend>),
}

/// Limits and timings shared by every backend.
#[derive(Debug, Clone)]
pub(crate) struct BroadcastOptions {
    pub queue_messages: usize,
    pub queue_bytes: usize,
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub timeout: Duration,
    pub forget_after: Duration,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        BroadcastOptions {
            queue_messages: 4096,
            queue_bytes: 16 << 20,
            heartbeat: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            forget_after: Duration::from_secs(120),
        }
    }
}

impl std::fmt::Debug for BroadcastConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL itself: it may hold a password.
        let backend = match &self.backend {
            Backend::InCluster => "in-cluster".to_owned(),
            Backend::Redis { channel, .. } => format!("redis (channel {channel:?})"),
            Backend::Custom(backend) => backend.describe(),
        };
        f.debug_struct("BroadcastConfig")
            .field("backend", &backend)
            .field("options", &self.options)
            .finish()
    }
}

impl BroadcastConfig {
    /// Broadcast stays inside this node (the default).
    ///
    /// ```
    /// assert!(corral::broadcast::BroadcastConfig::in_cluster().is_in_cluster());
    /// ```
    pub fn in_cluster() -> Self {
        BroadcastConfig::default()
    }

    /// Broadcast spans every node on the Redis server at `url`
    /// (`redis://HOST:PORT[/DB]`). Nothing connects until the cluster runs;
    /// a server that is down then is retried, never fatal.
    ///
    /// The channel is `corral:PROGRAM:DB:broadcast` (the program's file name
    /// and the URL's database number, since Redis pub/sub ignores databases)
    /// unless [`channel`](Self::channel) names one.
    ///
    /// ```
    /// let config = corral::broadcast::BroadcastConfig::redis("redis://10.0.0.5:6379/2")?;
    /// # drop(config);
    /// assert!(corral::broadcast::BroadcastConfig::redis("10.0.0.5:6379").is_err());
    /// # Ok::<(), corral::Error>(())
    /// ```
    pub fn redis(url: &str) -> Result<Self> {
        RedisBackend::db(url)?;
        Ok(BroadcastConfig {
            backend: Backend::Redis {
                url: url.to_owned(),
                channel: None,
            },
            options: BroadcastOptions::default(),
        })
    }

    /// Broadcast through a backend of your own (NATS, ...).
    ///
    /// ```no_run
    /// # fn nats() -> std::sync::Arc<dyn corral::broadcast::BroadcastBackend> { unimplemented!() }
    /// let config = corral::broadcast::BroadcastConfig::backend(nats());
    /// # drop(config);
    /// ```
    pub fn backend(backend: Arc<dyn BroadcastBackend>) -> Self {
        BroadcastConfig {
            backend: Backend::Custom(backend),
            options: BroadcastOptions::default(),
        }
    }

    /// The Redis channel to use; every node that should hear each other
    /// names the same one. Ignored by the other backends.
    ///
    /// ```
    /// let config = corral::broadcast::BroadcastConfig::redis("redis://127.0.0.1")?
    ///     .channel("payments:events");
    /// # drop(config);
    /// # Ok::<(), corral::Error>(())
    /// ```
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        if let Backend::Redis { channel: slot, .. } = &mut self.backend {
            *slot = Some(channel.into());
        }
        self
    }

    /// Bounds each queue (to the other nodes, and to this node's workers) to
    /// `messages` messages and `bytes` bytes (default 4096 and 16 MiB);
    /// past either, a message is dropped and counted.
    ///
    /// ```
    /// let config = corral::broadcast::BroadcastConfig::in_cluster().queue_limits(1024, 4 << 20);
    /// # drop(config);
    /// ```
    pub fn queue_limits(mut self, messages: usize, bytes: usize) -> Self {
        self.options.queue_messages = messages.max(1);
        self.options.queue_bytes = bytes.max(MAX_MESSAGE_BYTES);
        self
    }

    /// The shortest and longest wait between reconnection attempts (default
    /// 100 ms, doubling with jitter up to 5 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = corral::broadcast::BroadcastConfig::in_cluster()
    ///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
    /// # drop(config);
    /// ```
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options.reconnect_min = min;
        self.options.reconnect_max = max.max(min);
        self
    }

    /// How often an idle node tells the others its last sequence number
    /// (default 1 s), which bounds how long a lost last message goes unseen.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = corral::broadcast::BroadcastConfig::in_cluster()
    ///     .heartbeat(Duration::from_millis(200));
    /// # drop(config);
    /// ```
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.options.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// The connect, reply and ping deadline (default 2 s): a connection
    /// silent for longer is taken as lost.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = corral::broadcast::BroadcastConfig::in_cluster().timeout(Duration::from_secs(1));
    /// # drop(config);
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// True when broadcast stays inside this node.
    pub fn is_in_cluster(&self) -> bool {
        matches!(self.backend, Backend::InCluster)
    }

    fn make_backend(&self) -> Result<Option<Arc<dyn BroadcastBackend>>> {
        Ok(match &self.backend {
            Backend::InCluster => None,
            Backend::Redis { url, channel } => {
                let channel = match channel {
                    Some(channel) => channel.clone(),
                    None => default_channel(RedisBackend::db(url)?),
                };
                Some(Arc::new(RedisBackend::new(
                    url,
                    channel,
                    self.options.timeout,
                )?))
            }
            Backend::Custom(backend) => Some(backend.clone()),
        })
    }
}

impl std::str::FromStr for BroadcastConfig {
    type Err = Error;

    /// Reads a `--broadcast` value: a `redis://` URL.
    fn from_str(url: &str) -> Result<Self> {
        BroadcastConfig::redis(url)
    }
}

fn default_channel(db: i64) -> String {
    let program = std::env::current_exe()
        .ok()
        .and_then(|path| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "corral".to_owned());
    format!("corral:{program}:{db}:broadcast")
}

/// The name one node goes by on the channel: host, primary's pid and a
/// random part, so a restarted primary is a new sender with a new count.
///
/// ```
/// # async fn demo(publisher: corral::broadcast::BroadcastPublisher) {
/// println!("this node is {}", publisher.node());
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    fn generate() -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "host".to_owned());
        let random: u32 = rand::random();
        NodeId(format!("{host}:{}:{random:08x}", std::process::id()).into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(name: &str) -> Self {
        NodeId(name.into())
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One broadcast message to hand to every local worker.
///
/// ```
/// # fn forward(message: corral::broadcast::Delivered) {
/// let json: serde_json::Value = serde_json::from_slice(&message.payload).unwrap_or_default();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The node whose worker sent it.
    pub from_node: NodeId,
    /// That worker's slot (on its own node).
    pub from_slot: usize,
    /// The JSON payload, as the worker encoded it.
    pub payload: Bytes,
    /// True when it came from this node.
    pub local: bool,
}

/// Takes this node's worker broadcasts; made by [`start`]. Dropping the last
/// clone stops the backend's tasks.
///
/// ```no_run
/// # fn demo(publisher: corral::broadcast::BroadcastPublisher) {
/// publisher.publish(1, br#""hello""#.to_vec());
/// println!("{} sent to other nodes", publisher.stats().published_total);
/// # }
/// ```
#[derive(Clone)]
pub struct BroadcastPublisher {
    shared: Arc<Shared>,
}

struct Shared {
    node: NodeId,
    kind: &'static str,
    local: QueueSender<Delivered>,
    remote: Option<Remote>,
    counters: Arc<Counters>,
    _stop: DropGuard,
}

struct Remote {
    queue: QueueSender<Bytes>,
    /// The last sequence number handed out. Numbering and queueing happen
    /// under this lock, so queue order is number order and the heartbeat can
    /// tell when every number handed out has left the queue.
    last_seq: Arc<Mutex<u64>>,
}

impl std::fmt::Debug for BroadcastPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BroadcastPublisher")
            .field("node", &self.shared.node)
            .field("backend", &self.shared.kind)
            .finish_non_exhaustive()
    }
}

impl BroadcastPublisher {
    /// Broadcasts a worker's message: queued for this node's workers at once
    /// and, with a remote backend, encoded once and queued for the other
    /// nodes. Never waits: a full queue drops the message, counts it and
    /// logs it.
    pub fn publish(&self, from_slot: usize, payload: Vec<u8>) {
        let shared = &self.shared;
        let payload = Bytes::from(payload);
        let local = Delivered {
            from_node: shared.node.clone(),
            from_slot,
            payload: payload.clone(),
            local: true,
        };
        if shared.local.try_push(local, payload.len()).is_ok() {
            Counters::add(&shared.counters.local, 1);
        }
        if let Some(remote) = &shared.remote {
            let mut last_seq = remote.last_seq.lock().unwrap_or_else(|p| p.into_inner());
            *last_seq += 1;
            let frame = Frame::Message {
                node: shared.node.as_str(),
                slot: from_slot as u32,
                seq: *last_seq,
                payload: &payload,
            }
            .encode();
            let size = frame.len();
            // A refused frame keeps its number, so the other nodes see the
            // gap; the queue counts and logs it.
            let _ = remote.queue.try_push(Bytes::from(frame), size);
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> BroadcastStats {
        let shared = &self.shared;
        let outgoing = shared.remote.as_ref().map_or(0, |r| r.queue.dropped());
        let mut stats = shared
            .counters
            .snapshot(shared.kind, outgoing, shared.local.dropped());
        if shared.remote.is_none() {
            stats.connected = true;
        }
        stats
    }

    /// This node's name on the channel.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }
}

/// The messages to forward to this node's workers, in order per sender;
/// made by [`start`].
///
/// ```no_run
/// # async fn demo(mut deliveries: corral::broadcast::Deliveries) {
/// while let Some(message) = deliveries.recv().await {
///     println!("{} bytes from slot {}", message.payload.len(), message.from_slot);
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Deliveries {
    queue: QueueReceiver<Delivered>,
}

impl Deliveries {
    /// The next message; `None` once the publisher is dropped. Cancel-safe:
    /// use it in `tokio::select!`.
    pub async fn recv(&mut self) -> Option<Delivered> {
        self.queue.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Delivered> {
        self.queue.try_recv()
    }
}

/// Starts the broadcast for this node. In-cluster it starts nothing; with a
/// remote backend it spawns the publishing and subscribing tasks on the
/// current tokio runtime (so call it from inside one). An invalid
/// configuration is an error; an unreachable server is not (it is retried).
///
/// ```no_run
/// # async fn demo() -> corral::Result<()> {
/// let config = corral::broadcast::BroadcastConfig::in_cluster();
/// let (publisher, mut deliveries) = corral::broadcast::start(&config)?;
/// publisher.publish(0, b"1".to_vec());
/// assert_eq!(deliveries.recv().await.unwrap().payload.as_ref(), b"1");
/// # Ok(())
/// # }
/// ```
pub fn start(config: &BroadcastConfig) -> Result<(BroadcastPublisher, Deliveries)> {
    let backend = config.make_backend()?;
    let options = config.options.clone();
    let (local, deliveries) = queue::bounded(
        "delivery (to this node's workers)",
        options.queue_messages,
        options.queue_bytes,
    );
    let counters = Arc::new(Counters::default());
    let cancel = CancellationToken::new();
    let node = NodeId::generate();
    let kind = backend.as_ref().map_or("in-cluster", |b| b.kind());
    let remote = backend.map(|backend| {
        let (queue, outgoing) = queue::bounded(
            "outgoing (to other nodes)",
            options.queue_messages,
            options.queue_bytes,
        );
        let last_seq = Arc::new(Mutex::new(0));
        let link = Arc::new(Link {
            backend,
            node: node.clone(),
            counters: counters.clone(),
            options,
            cancel: cancel.clone(),
        });
        tokio::spawn(link::publish_loop(link.clone(), outgoing, last_seq.clone()));
        tokio::spawn(link::subscribe_loop(link, local.clone()));
        Remote { queue, last_seq }
    });
    let publisher = BroadcastPublisher {
        shared: Arc::new(Shared {
            node,
            kind,
            local,
            remote,
            counters,
            _stop: cancel.drop_guard(),
        }),
    };
    Ok((publisher, Deliveries { queue: deliveries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_cluster_delivers_locally_in_order_and_counts() {
        let (publisher, mut deliveries) = start(&BroadcastConfig::in_cluster()).unwrap();
        for i in 0..10u8 {
            publisher.publish(usize::from(i % 3), vec![i]);
        }
        for i in 0..10u8 {
            let message = deliveries.recv().await.unwrap();
            assert_eq!(message.payload.as_ref(), &[i]);
            assert_eq!(message.from_slot, usize::from(i % 3));
            assert!(message.local);
            assert_eq!(&message.from_node, publisher.node());
        }
        let stats = publisher.stats();
        assert_eq!(stats.local_total, 10);
        assert_eq!(stats.backend, "in-cluster");
        assert!(stats.connected);
    }

    #[tokio::test]
    async fn a_full_delivery_queue_drops_counts_and_never_blocks() {
        let config = BroadcastConfig::in_cluster().queue_limits(4, 0);
        let (publisher, mut deliveries) = start(&config).unwrap();
        for i in 0..10u8 {
            publisher.publish(0, vec![i]);
        }
        let stats = publisher.stats();
        assert_eq!(stats.local_total, 4);
        assert_eq!(stats.dropped_incoming_total, 6);
        // The oldest were kept: order is never broken by a drop.
        for i in 0..4u8 {
            assert_eq!(deliveries.recv().await.unwrap().payload.as_ref(), &[i]);
        }
        assert!(deliveries.try_recv().is_none());
    }

    #[tokio::test]
    async fn the_deliveries_end_when_the_publisher_is_dropped() {
        let (publisher, mut deliveries) = start(&BroadcastConfig::in_cluster()).unwrap();
        drop(publisher);
        assert!(deliveries.recv().await.is_none());
    }

    #[test]
    fn the_default_channel_names_the_program_and_database() {
        let channel = default_channel(3);
        assert!(channel.starts_with("corral:"), "{channel}");
        assert!(channel.ends_with(":3:broadcast"), "{channel}");
    }

    #[test]
    fn node_names_differ_between_starts() {
        assert_ne!(NodeId::generate(), NodeId::generate());
    }

    #[test]
    fn debug_output_never_shows_the_url() {
        let config = BroadcastConfig::redis("redis://:hunter2@127.0.0.1:6379").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
