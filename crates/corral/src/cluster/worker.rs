//! The worker role: the event loop the primary starts in each slot, and the
//! [`Worker`] handle user code serves with.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::config::Config;
use super::messages::{self, RawPublished, Subscription};
use super::outbox::{payload_size, Outbox, OutboxQueues};
use super::request_tracking::TrackRequestsLayer;
use crate::error::{BoxError, Error, Result};
use crate::ipc::{self, ToPrimary, ToWorker};
use crate::metrics::{EventLoopDelay, WorkerCounters, WorkerStats};
use crate::net::fd_passing::{ConnectionReceiver, PassedConnection};
use crate::net::{Drain, Listener, PassedQueue};
use crate::pool::Pool;

/// Environment variables the primary sets for each worker.
pub(crate) const ENV_SLOT: &str = "CORRAL_WORKER_SLOT";
pub(crate) const ENV_GENERATION: &str = "CORRAL_WORKER_GENERATION";
pub(crate) const ENV_LISTENERS: &str = "CORRAL_WORKER_LISTENERS";
/// Set when a listening socket came from systemd, which keeps it for the
/// next start: the worker must not stop it listening.
pub(crate) const ENV_KEEP_LISTENING: &str = "CORRAL_WORKER_KEEP_LISTENING";
/// The worker's end of its IPC socket.
pub(crate) const IPC_FD: RawFd = 3;
/// The worker's end of the socket connections are passed on (accept-and-pass modes).
pub(crate) const CONNECTIONS_FD: RawFd = 4;
/// The first inherited listening socket; the others follow in `--listen` order.
pub(crate) const FIRST_LISTENER_FD: RawFd = 5;

/// What a worker inherits from the primary.
pub(crate) struct WorkerEnv {
    slot: usize,
    generation: u64,
    ipc: OwnedFd,
    connections: OwnedFd,
    listeners: Vec<OwnedFd>,
    keep_listening: bool,
}

impl WorkerEnv {
    pub fn present() -> bool {
        std::env::var_os(ENV_SLOT).is_some()
    }

    /// `None` in the primary; the inherited state in a worker.
    pub fn from_env() -> Result<Option<WorkerEnv>> {
        if !Self::present() {
            return Ok(None);
        }
        let slot = env_number(ENV_SLOT)?;
        let generation = env_number(ENV_GENERATION)?;
        let count = env_number(ENV_LISTENERS)? as RawFd;
        let ipc = take_fd(IPC_FD)?;
        let connections = take_fd(CONNECTIONS_FD)?;
        let listeners = (0..count)
            .map(|index| take_fd(FIRST_LISTENER_FD + index))
            .collect::<Result<Vec<_>>>()?;
        let keep_listening = std::env::var_os(ENV_KEEP_LISTENING).is_some();
        // Remove the markers so a program this worker starts is not mistaken for one.
        for name in [ENV_SLOT, ENV_GENERATION, ENV_LISTENERS, ENV_KEEP_LISTENING] {
            // SAFETY: called before the worker starts any thread.
            unsafe { std::env::remove_var(name) };
        }
        Ok(Some(WorkerEnv {
            slot: slot as usize,
            generation,
            ipc,
            connections,
            listeners,
            keep_listening,
        }))
    }
}

fn env_number(name: &str) -> Result<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| Error::WorkerEnvironment(format!("{name} is missing or not a number")))
}

/// Takes ownership of an inherited descriptor, checking that it exists, and
/// marks it close-on-exec so programs the worker runs do not inherit it.
fn take_fd(fd: RawFd) -> Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: the primary placed this descriptor here for us and nothing else
    // in this process refers to it; we check it is open before owning it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|err| {
        Error::WorkerEnvironment(format!("inherited descriptor {fd} is not open ({err})"))
    })?;
    // SAFETY: as above; the descriptor is open and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The state one worker process shares between its tasks.
struct Shared {
    slot: usize,
    generation: u64,
    sockets: Vec<std::net::TcpListener>,
    pool: Pool,
    loop_delay: EventLoopDelay,
    passed: PassedQueue,
    /// Connections received from the primary and not yet accepted.
    passed_pending: Arc<AtomicUsize>,
    /// Set once the primary closed the connection channel and every
    /// connection it sent is in the queue.
    passed_done: AtomicBool,
    broadcasts: broadcast::Sender<Arc<RawPublished>>,
    counters: Arc<WorkerCounters>,
    to_primary: Outbox,
    ready_sent: AtomicBool,
    /// Set when the primary's channel reached end-of-file (for the watchdog).
    primary_lost: Arc<AtomicBool>,
    /// Since when (ms after `born`) connections could not be taken; 0: they can.
    intake_blocked_at_ms: AtomicU64,
    born: Instant,
    /// The drain as the primary asked for it and as far as it has got.
    drain: Arc<Drain>,
    /// Cancelled when the serve future should wind up.
    shutdown: CancellationToken,
    /// The limits `Worker::serve` enforces.
    serve_options: crate::net::ServeOptions,
    /// The application's own metrics, sent to the primary after each heartbeat.
    app_metrics: std::sync::Mutex<prometheus_client::registry::Registry>,
    app_metrics_registered: AtomicBool,
    app_metrics_too_big: AtomicBool,
}

impl Shared {
    /// Queues a user message for the primary.
    fn send_user(&self, message: ToPrimary) -> Result<()> {
        self.to_primary.user(message)
    }

    fn stats(&self) -> WorkerStats {
        let mut stats = self.counters.snapshot();
        stats.event_loop_delay = self.loop_delay.snapshot();
        stats.pool = self.pool.stats();
        let blocked_at = self.intake_blocked_at_ms.load(Ordering::Relaxed);
        if blocked_at > 0 {
            stats.intake_blocked_ms =
                (self.born.elapsed().as_millis() as u64).saturating_sub(blocked_at);
        }
        stats
    }

    /// Records whether connections can be taken right now.
    fn intake_blocked(&self, blocked: bool) {
        let now = (self.born.elapsed().as_millis() as u64).max(1);
        if blocked {
            let _ = self.intake_blocked_at_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.intake_blocked_at_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The application's metrics as OpenMetrics text, if it registered any;
    /// empty when they do not fit in one message, so the primary shows no
    /// figures rather than frozen ones.
    fn encode_app_metrics(&self) -> Option<String> {
        if !self.app_metrics_registered.load(Ordering::Relaxed) {
            return None;
        }
        let mut text = String::new();
        let registry = self
            .app_metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        drop(registry);
        // Room for the message's own framing.
        let limit = ipc::MAX_FRAME_BYTES - 1024;
        if text.len() > limit {
            if !self.app_metrics_too_big.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the registered metrics encode to {} bytes, over the {limit} a message carries; /metrics leaves them out until they fit (drop labels with many values)",
                    text.len()
                );
            }
            return Some(String::new());
        }
        self.app_metrics_too_big.store(false, Ordering::Relaxed);
        Some(text)
    }

    fn begin_drain(&self, why: &str) {
        if !self.drain.started.is_cancelled() {
            tracing::info!("draining: {why}");
            self.drain.started.cancel();
        }
    }
}

/// The handle a worker serves with: its sockets, its shutdown signal, and
/// who it is.
///
/// Cheap to clone.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// corral::Cluster::builder().listen("127.0.0.1:8080").run(|worker| async move {
///     let slot = worker.slot();
///     let app = Router::new()
///         .route("/", get(move || async move { format!("slot {slot}") }))
///         .layer(worker.track_requests());
///     axum::serve(worker.listener(), app)
///         .with_graceful_shutdown(worker.shutdown())
///         .await
/// })
/// # .unwrap();
/// ```
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("slot", &self.shared.slot)
            .field("generation", &self.shared.generation)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// This worker's slot, `0..workers`. A replacement keeps its slot number.
    pub fn slot(&self) -> usize {
        self.shared.slot
    }

    /// How many workers filled this slot before this one (0 for the first).
    pub fn generation(&self) -> u64 {
        self.shared.generation
    }

    /// The connections of every address the cluster listens on.
    ///
    /// The first call tells the primary this worker is ready, so call it once
    /// the service can answer (after opening databases and the like). Must be
    /// called from within the worker's event loop (the closure given to
    /// [`run`](crate::ClusterBuilder::run)).
    pub fn listener(&self) -> Listener {
        let sockets = self
            .shared
            .sockets
            .iter()
            .filter_map(|socket| {
                let socket = socket.try_clone().ok()?;
                socket.set_nonblocking(true).ok()?;
                tokio::net::TcpListener::from_std(socket).ok()
            })
            .collect();
        if !self.shared.ready_sent.swap(true, Ordering::SeqCst) {
            let _ = self.shared.to_primary.control(ToPrimary::Ready);
        }
        Listener::new(
            sockets,
            self.shared.passed.clone(),
            self.shared.passed_pending.clone(),
            self.shared.drain.clone(),
            self.shared.counters.clone(),
        )
    }

    /// Resolves when the worker should stop serving: give it to
    /// `with_graceful_shutdown`. By then the listener has stopped accepting
    /// and idle keep-alive connections have had their grace period.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.shutdown.clone().cancelled_owned()
    }

    /// True once the primary asked this worker to drain (on stop, reload or
    /// recycle).
    pub fn is_draining(&self) -> bool {
        self.shared.drain.started.is_cancelled()
    }

    /// True once the node this worker belongs to is going away: the primary
    /// was asked to stop and told its workers first (it then keeps serving
    /// for `--drain-delay` before they drain). The worker still accepts and
    /// serves; a readiness endpoint should fail from now on, so a load
    /// balancer or Kubernetes Service stops sending before the workers stop
    /// accepting. Unlike [`is_draining`](Self::is_draining), a worker drained
    /// by a rolling reload or a recycle does not set it: its node stays.
    ///
    /// ```no_run
    /// use axum::http::StatusCode;
    /// # fn demo(worker: corral::Worker) {
    /// let ready = move || async move {
    ///     if worker.is_node_draining() {
    ///         StatusCode::SERVICE_UNAVAILABLE
    ///     } else {
    ///         StatusCode::OK
    ///     }
    /// };
    /// # drop(ready);
    /// # }
    /// ```
    pub fn is_node_draining(&self) -> bool {
        self.shared.drain.node.load(Ordering::SeqCst)
    }

    /// A tower layer that counts requests for the heartbeat (and for
    /// `max_requests` recycling) and, while the worker drains, answers with
    /// `Connection: close` so keep-alive clients reconnect to a live worker
    /// instead of meeting a closed socket.
    pub fn track_requests(&self) -> TrackRequestsLayer {
        TrackRequestsLayer::new(
            self.shared.counters.clone(),
            self.shared.drain.started.clone(),
        )
    }

    /// Sends a message to the primary's
    /// [`on_message`](crate::ClusterBuilder::on_message) handler. Messages
    /// from one worker arrive in the order they were sent.
    ///
    /// ```no_run
    /// # async fn demo(worker: corral::Worker) -> corral::Result<()> {
    /// worker.send(&serde_json::json!({ "event": "cache-warm" }))?;
    /// # Ok(()) }
    /// ```
    pub fn send<T: Serialize>(&self, message: &T) -> Result<()> {
        self.shared
            .send_user(ToPrimary::User(messages::encode(message)?))
    }

    /// Publishes a message to every worker of the cluster (this one
    /// included): the cluster-wide pub/sub a WebSocket app fans out with.
    /// Each worker receives one publisher's messages in order.
    ///
    /// ```no_run
    /// # async fn demo(worker: corral::Worker) -> corral::Result<()> {
    /// worker.broadcast(&"price changed")?;
    /// # Ok(()) }
    /// ```
    pub fn broadcast<T: Serialize>(&self, message: &T) -> Result<()> {
        self.shared
            .send_user(ToPrimary::Broadcast(messages::encode(message)?))
    }

    /// Receives every message broadcast from now on, by any worker.
    ///
    /// ```no_run
    /// # async fn demo(worker: corral::Worker) {
    /// let mut messages = worker.subscribe::<String>();
    /// while let Some(published) = messages.recv().await {
    ///     println!("slot {} says {}", published.from_slot, published.message);
    /// }
    /// # }
    /// ```
    pub fn subscribe<T: DeserializeOwned>(&self) -> Subscription<T> {
        Subscription::new(self.shared.broadcasts.subscribe())
    }

    /// This worker's CPU pool: run heavy work here so the event loop keeps
    /// answering. Its threads run at a lower priority than the event loops
    /// and are sized so all workers together use each core once.
    ///
    /// ```no_run
    /// # async fn demo(worker: corral::Worker) -> Result<(), corral::pool::PoolError> {
    /// let sum = worker.pool().run(|| (0..10_000_000u64).sum::<u64>()).await?;
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// This worker's figures now (also sent to the primary with every heartbeat).
    pub fn stats(&self) -> WorkerStats {
        self.shared.stats()
    }

    /// Registers the application's own metrics in this worker's
    /// [`prometheus-client`](crate::metrics::prometheus_client) registry.
    /// The primary's `/metrics` (on `--admin`) serves them merged across
    /// workers, each sample labelled with this worker's `slot`: corral adds
    /// that label, so leave it out. The figures travel with every heartbeat,
    /// so a scrape sees them at most one heartbeat interval old.
    ///
    /// A worker that takes over the slot (after a crash, a reload, a
    /// recycle) continues the slot's series from its own figures (a counter
    /// restarts from zero, which Prometheus reads as a reset); a slot that
    /// is scaled away or given up on leaves no series behind. Registering
    /// under a name of corral's own (`corral_...`) or with a type another
    /// slot disagrees with leaves the family out, with a log line.
    ///
    /// ```no_run
    /// use corral::metrics::prometheus_client::metrics::counter::Counter;
    /// use axum::{routing::get, Router};
    ///
    /// corral::Cluster::builder().listen("127.0.0.1:8080").run(|worker| async move {
    ///     let greetings = Counter::<u64>::default();
    ///     worker.register_metrics(|registry| {
    ///         registry.register("greetings", "Greetings served", greetings.clone())
    ///     });
    ///     let app = Router::new().route(
    ///         "/",
    ///         get(move || async move {
    ///             greetings.inc();
    ///             "hello"
    ///         }),
    ///     );
    ///     worker.serve(app).await
    /// })
    /// # .unwrap();
    /// ```
    pub fn register_metrics<R>(
        &self,
        register: impl FnOnce(&mut prometheus_client::registry::Registry) -> R,
    ) -> R {
        let mut registry = self
            .shared
            .app_metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.shared
            .app_metrics_registered
            .store(true, Ordering::Relaxed);
        register(&mut registry)
    }

    /// Serves `app` (an axum `Router` or any tower service) on this worker's
    /// connections until the worker has drained — the one call a worker
    /// needs. It tells the primary the worker is ready, counts requests and
    /// answers `Connection: close` while draining (as
    /// [`track_requests`](Self::track_requests) does, so do not add that
    /// layer too), and keeps clients from pinning the worker:
    /// `--header-timeout`, `--idle-timeout` and `--max-connections` (see
    /// [`ClusterBuilder::header_timeout`](crate::ClusterBuilder::header_timeout)
    /// and the two after it).
    ///
    /// ```no_run
    /// use axum::{routing::get, Router};
    ///
    /// corral::Cluster::builder().listen("127.0.0.1:8080").run(|worker| async move {
    ///     let app = Router::new().route("/", get(|| async { "hello" }));
    ///     worker.serve(app).await
    /// })
    /// # .unwrap();
    /// ```
    pub async fn serve<S, B>(&self, app: S) -> std::io::Result<()>
    where
        S: tower::Service<
                axum::http::Request<axum::body::Body>,
                Response = axum::http::Response<B>,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let app = tower::Layer::layer(&self.track_requests(), app);
        let options = self.shared.serve_options;
        tracing::info!(
            "serving with --header-timeout {:?}, --idle-timeout {:?}, --max-connections {}",
            options.header_timeout_value(),
            options.idle_timeout_value(),
            options.max_connections_value()
        );
        crate::net::serve(self.listener(), app, options, self.shutdown()).await
    }
}

/// The limits of `Worker::serve`, the connection cap resolved against this
/// process's descriptor limit.
fn serve_options(config: &Config) -> crate::net::ServeOptions {
    let options = crate::net::ServeOptions::default()
        .header_timeout(config.header_timeout)
        .idle_timeout(config.idle_timeout);
    match config.max_connections {
        Some(connections) => options.max_connections(connections),
        None => options,
    }
}

/// Runs the worker role: one single-threaded event loop serving `serve`.
pub(crate) fn run<F, Fut, E>(config: Config, env: WorkerEnv, serve: F) -> Result<()>
where
    F: FnOnce(Worker) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
    name_this_process();
    if config.logging {
        crate::logging::init(format!("[worker {} pid {}]", env.slot, std::process::id()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let ipc = std::os::unix::net::UnixStream::from(env.ipc);
        ipc.set_nonblocking(true)?;
        let (sender, receiver) = ipc::channel(tokio::net::UnixStream::from_std(ipc)?);
        let (to_primary, outbox) = Outbox::new();
        let (passed_tx, passed_rx) = mpsc::unbounded_channel();
        let connections = ConnectionReceiver::new(env.connections)?;
        let mut pool = Pool::builder().threads(
            config
                .pool_threads
                .unwrap_or_else(|| crate::pool::default_threads(Some(config.workers.count()))),
        );
        if let Some(queue) = config.pool_queue {
            pool = pool.queue(queue);
        }
        let pool = pool.build()?;
        let shared = Arc::new(Shared {
            slot: env.slot,
            generation: env.generation,
            sockets: env
                .listeners
                .into_iter()
                .map(std::net::TcpListener::from)
                .collect(),
            pool,
            loop_delay: EventLoopDelay::start(),
            passed: Arc::new(tokio::sync::Mutex::new(passed_rx)),
            passed_pending: Arc::default(),
            passed_done: AtomicBool::new(false),
            broadcasts: broadcast::channel(1024).0,
            counters: Arc::default(),
            to_primary,
            ready_sent: AtomicBool::new(false),
            primary_lost: Arc::default(),
            intake_blocked_at_ms: AtomicU64::new(0),
            born: Instant::now(),
            drain: Arc::new(Drain {
                keep_listening: env.keep_listening,
                ..Drain::default()
            }),
            shutdown: CancellationToken::new(),
            serve_options: serve_options(&config),
            app_metrics: Default::default(),
            app_metrics_registered: AtomicBool::new(false),
            app_metrics_too_big: AtomicBool::new(false),
        });
        super::watchdog::start(
            shared.drain.started.clone(),
            shared.primary_lost.clone(),
            config.shutdown_timeout,
        )?;
        tokio::spawn(send_to_primary(sender, outbox));
        tokio::spawn(receive_connections(connections, passed_tx, shared.clone()));
        tokio::spawn(listen_to_primary(receiver, shared.clone()));
        tokio::spawn(drain_on_signals(shared.clone()));
        tokio::spawn(heartbeat(shared.clone(), config.clone()));
        tokio::spawn(sequence_drain(shared.clone(), config.drain_grace));
        tracing::debug!("worker generation {} starting", env.generation);
        let result = serve(Worker {
            shared: shared.clone(),
        })
        .await;
        result.map_err(|err| Error::Worker(err.into()))
    })
}

async fn send_to_primary(mut sender: ipc::Sender, mut outbox: OutboxQueues) {
    loop {
        // The supervisor's lane first: a heartbeat never waits behind user messages.
        let message = tokio::select! {
            biased;
            Some(message) = outbox.control.recv() => message,
            Some(message) = outbox.user.recv() => {
                outbox.user_bytes.fetch_sub(payload_size(&message), Ordering::Relaxed);
                message
            }
            else => return,
        };
        if let Err(err) = sender.send(&message).await {
            tracing::warn!("cannot reach the primary: {err}");
            return;
        }
    }
}

async fn listen_to_primary(mut receiver: ipc::Receiver, shared: Arc<Shared>) {
    loop {
        match receiver.recv::<ToWorker>().await {
            Ok(ToWorker::Drain) => shared.begin_drain("asked by the primary"),
            Ok(ToWorker::NodeDraining) => {
                if !shared.drain.node.swap(true, Ordering::SeqCst) {
                    tracing::info!("the node is draining: readiness fails, still serving");
                }
            }
            Ok(ToWorker::Retire) => {
                shared.drain.take_backlog.store(true, Ordering::SeqCst);
                shared.begin_drain(if shared.drain.node.load(Ordering::SeqCst) {
                    "the node is stopping"
                } else {
                    "its slot is retired (scaled down)"
                });
            }
            Ok(ToWorker::Broadcast { from_slot, payload }) => {
                // No subscriber yet is fine: nobody was listening.
                let _ = shared.broadcasts.send(Arc::new(RawPublished {
                    from_slot: from_slot as usize,
                    payload,
                }));
            }
            Err(err) => {
                // Without its primary nobody supervises this worker: finish
                // what is in flight and leave (the watchdog makes sure of it).
                shared.primary_lost.store(true, Ordering::SeqCst);
                shared.drain.node.store(true, Ordering::SeqCst);
                shared.begin_drain(&format!("lost the primary ({err})"));
                return;
            }
        }
    }
}

/// Moves connections the primary passes into the listener's queue. Each
/// batch is acknowledged as it is received, before any is served, so the
/// primary can let go of its copies.
async fn receive_connections(
    mut receiver: ConnectionReceiver,
    queue: mpsc::UnboundedSender<PassedConnection>,
    shared: Arc<Shared>,
) {
    /// Connections taken (and acknowledged) per wake-up under load.
    const BATCH: usize = 64;
    let mut backoff = INTAKE_BACKOFF_FIRST;
    'receiving: loop {
        match receiver.recv_batch(BATCH).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                shared.intake_blocked(false);
                backoff = INTAKE_BACKOFF_FIRST;
                shared
                    .passed_pending
                    .fetch_add(batch.len(), Ordering::SeqCst);
                for connection in batch {
                    if queue.send(connection).is_err() {
                        break 'receiving;
                    }
                }
            }
            Err(err) => {
                // Out of descriptors or buffers (a spike of connections):
                // the message stays queued in the kernel; try again shortly,
                // and say so in the heartbeat so the primary can tell.
                if backoff == INTAKE_BACKOFF_FIRST {
                    tracing::warn!("cannot receive connections from the primary: {err}; retrying");
                }
                shared.intake_blocked(true);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(INTAKE_BACKOFF_MAX);
            }
        }
    }
    shared.passed_done.store(true, Ordering::SeqCst);
}

/// A worker runs from its generation's pinned descriptor
/// (`/proc/self/fd/N`), so the kernel names the process "N"; `ps`, `top` and
/// `pgrep` should show the program's name instead.
fn name_this_process() {
    #[cfg(target_os = "linux")]
    if let Some(name) = std::env::args_os().next().and_then(|arg0| {
        std::path::Path::new(&arg0)
            .file_name()
            .map(|n| n.to_owned())
    }) {
        use std::os::unix::ffi::OsStrExt;
        // The kernel keeps 15 bytes and a NUL.
        let mut bytes: Vec<u8> = name.as_bytes().iter().copied().take(15).collect();
        bytes.push(0);
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
    }
}

const INTAKE_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const INTAKE_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// `SIGTERM` (also sent when the primary dies) and `SIGINT` (Ctrl-C reaches the
/// whole process group) mean "drain": the primary coordinates the stop.
/// `SIGHUP` (a closed terminal, or a reload sent to the whole group) is the
/// primary's business alone, so a worker ignores it rather than dying.
async fn drain_on_signals(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; relying on the primary's drain message");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => shared.begin_drain("SIGTERM"),
            _ = int.recv() => shared.begin_drain("SIGINT"),
            _ = hup.recv() => tracing::debug!("ignoring SIGHUP: reloads are run by the primary"),
        }
    }
}

/// Sent from the event loop itself, so a blocked loop goes quiet and the
/// primary notices.
async fn heartbeat(shared: Arc<Shared>, config: Config) {
    let recycle_at = config.max_requests.map(|limit| {
        let jitter = if config.max_requests_jitter > 0 {
            rand::random_range(0..=config.max_requests_jitter)
        } else {
            0
        };
        limit.saturating_add(jitter)
    });
    let mut asked_to_recycle = false;
    let mut ticks = tokio::time::interval(config.heartbeat_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let stats = shared.stats();
        if let Some(limit) = recycle_at {
            if !asked_to_recycle && stats.requests_total >= limit {
                asked_to_recycle = true;
                let reason = format!("served {} requests (limit {limit})", stats.requests_total);
                let _ = shared.to_primary.control(ToPrimary::Recycle { reason });
            }
        }
        // A full lane just skips a beat; the next carries fresher figures.
        let _ = shared.to_primary.control(ToPrimary::Heartbeat(stats));
        if let Some(text) = shared.encode_app_metrics() {
            let _ = shared.to_primary.control(ToPrimary::Metrics(text));
        }
        if shared.primary_lost.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Once draining starts, waits until every connection the primary passed has
/// been accepted and every open connection has closed (keep-alive clients are
/// told `Connection: close` on their next request), for at most `grace`, then
/// asks the server to stop.
async fn sequence_drain(shared: Arc<Shared>, grace: Duration) {
    shared.drain.started.cancelled().await;
    let deadline = tokio::time::Instant::now() + grace;
    let settled = |shared: &Shared| {
        // A connection still queued for this worker is not settled: winding
        // up before the listener took it would leave it to be reset.
        let backlog_done = !shared.drain.take_backlog.load(Ordering::SeqCst)
            || shared.drain.backlog_taken.load(Ordering::SeqCst);
        backlog_done
            && shared.passed_done.load(Ordering::SeqCst)
            && shared.passed_pending.load(Ordering::SeqCst) == 0
            && shared.counters.connections_open.load(Ordering::Relaxed) == 0
    };
    while tokio::time::Instant::now() < deadline && !settled(&shared) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.shutdown.cancel();
}
