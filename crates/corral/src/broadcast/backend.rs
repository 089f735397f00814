//! The one seam between corral's broadcast and the engine that carries it
//! between nodes. Everything above it (sequence numbers, gap detection,
//! bounded queues, back-off, figures) is shared, so a NATS backend is this
//! trait and nothing more.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::error::BoxError;

/// The frames published by every node, as a backend's subscription yields
/// them. An `Err` item says why the connection was lost; the stream ends after
/// it (or without one, when the backend cannot tell).
pub type FrameStream = BoxStream<'static, Result<Bytes, BoxError>>;

/// A transport that carries opaque frames from one node to every node on the
/// same channel: Redis pub/sub ([`RedisBackend`](super::RedisBackend)), or any
/// engine with the same at-most-once fan-out.
///
/// A backend only moves bytes. Encoding, sequence numbers, detecting what was
/// missed, retrying, reconnecting with back-off and the figures are corral's,
/// the same for every backend. A backend must keep the order of the frames one
/// node publishes (one connection per node does).
///
/// ```no_run
/// use corral::broadcast::{BroadcastBackend, FrameStream};
/// use corral::BoxError;
/// use futures_util::future::BoxFuture;
///
/// /// Frames go nowhere and none arrive: a node on its own.
/// struct Alone;
///
/// impl BroadcastBackend for Alone {
///     fn kind(&self) -> &'static str {
///         "alone"
///     }
///     fn describe(&self) -> String {
///         "no other node".into()
///     }
///     fn publish(&self, _frames: Vec<bytes::Bytes>) -> BoxFuture<'static, Result<(), BoxError>> {
///         Box::pin(async { Ok(()) })
///     }
///     fn subscribe(&self) -> BoxFuture<'static, Result<FrameStream, BoxError>> {
///         Box::pin(async {
///             let frames: FrameStream = Box::pin(futures_util::stream::pending());
///             Ok(frames)
///         })
///     }
/// }
///
/// let config = corral::broadcast::BroadcastConfig::backend(std::sync::Arc::new(Alone));
/// # drop(config);
/// ```
pub trait BroadcastBackend: Send + Sync + 'static {
    /// A short name for figures and logs, such as `"redis"`.
    fn kind(&self) -> &'static str;

    /// Where the backend connects, for log lines; never includes a password.
    fn describe(&self) -> String;

    /// Publishes frames, in this order, to every subscribed node; several at
    /// once when they queued up, so a backend can send them in one round trip
    /// (Redis pipelines them). An error means some may not have reached the
    /// engine; corral retries them all with back-off, and receivers skip the
    /// ones they already have by their sequence numbers.
    fn publish(&self, frames: Vec<Bytes>) -> BoxFuture<'static, Result<(), BoxError>>;

    /// Subscribes to the frames every node publishes (this node's own may be
    /// among them; they are skipped). The stream must end once the connection
    /// is lost, also when it went silent without closing (a backend probes
    /// it), so that corral can reconnect and report the gap.
    fn subscribe(&self) -> BoxFuture<'static, Result<FrameStream, BoxError>>;
}
