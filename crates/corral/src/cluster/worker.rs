//! The worker role: the event loop the primary starts in each slot, and the
//! [`Worker`] handle user code serves with.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::Config;
use super::request_tracking::TrackRequestsLayer;
use crate::error::{BoxError, Error, Result};
use crate::ipc::{self, ToPrimary, ToWorker};
use crate::metrics::{WorkerCounters, WorkerStats};
use crate::net::Listener;

/// Environment variables the primary sets for each worker.
pub(crate) const ENV_SLOT: &str = "CORRAL_WORKER_SLOT";
pub(crate) const ENV_GENERATION: &str = "CORRAL_WORKER_GENERATION";
pub(crate) const ENV_LISTENERS: &str = "CORRAL_WORKER_LISTENERS";
/// The worker's end of its IPC socket.
pub(crate) const IPC_FD: RawFd = 3;
/// The first inherited listening socket; the others follow in `--listen` order.
pub(crate) const FIRST_LISTENER_FD: RawFd = 4;

/// What a worker inherits from the primary.
pub(crate) struct WorkerEnv {
    slot: usize,
    generation: u64,
    ipc: OwnedFd,
    listeners: Vec<OwnedFd>,
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
        let listeners = (0..count)
            .map(|index| take_fd(FIRST_LISTENER_FD + index))
            .collect::<Result<Vec<_>>>()?;
        // Remove the markers so a program this worker starts is not mistaken for one.
        for name in [ENV_SLOT, ENV_GENERATION, ENV_LISTENERS] {
            // SAFETY: called before the worker starts any thread.
            unsafe { std::env::remove_var(name) };
        }
        Ok(Some(WorkerEnv {
            slot: slot as usize,
            generation,
            ipc,
            listeners,
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
    counters: Arc<WorkerCounters>,
    to_primary: mpsc::UnboundedSender<ToPrimary>,
    ready_sent: AtomicBool,
    /// Cancelled when draining starts: stop accepting, close keep-alives.
    draining: CancellationToken,
    /// Cancelled when the serve future should wind up.
    shutdown: CancellationToken,
}

impl Shared {
    fn begin_drain(&self, why: &str) {
        if !self.draining.is_cancelled() {
            tracing::info!("draining: {why}");
            self.draining.cancel();
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
            let _ = self.shared.to_primary.send(ToPrimary::Ready);
        }
        Listener::new(
            sockets,
            self.shared.draining.clone(),
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
        self.shared.draining.is_cancelled()
    }

    /// A tower layer that counts requests for the heartbeat (and for
    /// `max_requests` recycling) and, while the worker drains, answers with
    /// `Connection: close` so keep-alive clients reconnect to a live worker
    /// instead of meeting a closed socket.
    pub fn track_requests(&self) -> TrackRequestsLayer {
        TrackRequestsLayer::new(self.shared.counters.clone(), self.shared.draining.clone())
    }

    /// This worker's figures now.
    pub fn stats(&self) -> WorkerStats {
        self.shared.counters.snapshot()
    }
}

/// Runs the worker role: one single-threaded event loop serving `serve`.
pub(crate) fn run<F, Fut, E>(config: Config, env: WorkerEnv, serve: F) -> Result<()>
where
    F: FnOnce(Worker) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
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
        let (to_primary, outbox) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            slot: env.slot,
            generation: env.generation,
            sockets: env
                .listeners
                .into_iter()
                .map(std::net::TcpListener::from)
                .collect(),
            counters: Arc::default(),
            to_primary,
            ready_sent: AtomicBool::new(false),
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(send_to_primary(sender, outbox));
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

async fn send_to_primary(mut sender: ipc::Sender, mut outbox: mpsc::UnboundedReceiver<ToPrimary>) {
    while let Some(message) = outbox.recv().await {
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
            Err(err) => {
                // Without its primary nobody supervises this worker: finish
                // what is in flight and leave.
                shared.begin_drain(&format!("lost the primary ({err})"));
                return;
            }
        }
    }
}

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
        let stats = shared.counters.snapshot();
        if let Some(limit) = recycle_at {
            if !asked_to_recycle && stats.requests_total >= limit {
                asked_to_recycle = true;
                let reason = format!("served {} requests (limit {limit})", stats.requests_total);
                let _ = shared.to_primary.send(ToPrimary::Recycle { reason });
            }
        }
        if shared.to_primary.send(ToPrimary::Heartbeat(stats)).is_err() {
            return;
        }
    }
}

/// Once draining starts, gives keep-alive clients `drain_grace` to be told
/// `Connection: close` on their next request, then asks the server to stop.
async fn sequence_drain(shared: Arc<Shared>, grace: Duration) {
    shared.draining.cancelled().await;
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline
        && shared.counters.connections_open.load(Ordering::Relaxed) > 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.shutdown.cancel();
}
