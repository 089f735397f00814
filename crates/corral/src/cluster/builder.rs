//! `Cluster::builder()`: one `main()` for both roles.

use std::future::Future;
use std::time::Duration;

use super::config::{Balance, Config, Workers};
use super::{primary, worker};
use crate::error::{BoxError, Result};

/// A clustered service: a primary process supervising worker processes that
/// all serve the same listening sockets.
///
/// The same `main()` runs in both roles. In the primary, [`ClusterBuilder::run`]
/// binds the sockets, starts the workers by re-executing the current program,
/// and supervises them until `SIGTERM`/`SIGINT`; it never calls the closure.
/// In a worker, it builds a single-threaded event loop and runs the closure on it.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// fn main() -> corral::Result<()> {
///     corral::Cluster::builder()
///         .listen("127.0.0.1:8080")
///         .workers(corral::Workers::PerCore)
///         .run(|worker| async move {
///             let app = Router::new().route("/", get(|| async { "hi" }));
///             axum::serve(worker.listener(), app)
///                 .with_graceful_shutdown(worker.shutdown())
///                 .await
///         })
/// }
/// ```
#[derive(Debug)]
pub struct Cluster {
    _private: (),
}

impl Cluster {
    /// Starts configuring a cluster.
    ///
    /// ```
    /// let builder = corral::Cluster::builder().listen("127.0.0.1:0");
    /// # drop(builder);
    /// ```
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            config: Config::default(),
        }
    }

    /// True in a worker process started by a corral primary.
    ///
    /// ```
    /// assert!(!corral::Cluster::is_worker());
    /// ```
    pub fn is_worker() -> bool {
        worker::WorkerEnv::present()
    }
}

/// Settings of a [`Cluster`]; finish with [`run`](ClusterBuilder::run).
///
/// Every setting has a default that suits a production HTTP service, modelled on
/// the tools people already trust (PM2, Gunicorn, nginx).
#[derive(Debug, Clone)]
#[must_use = "a cluster does nothing until `.run(...)` is called"]
pub struct ClusterBuilder {
    pub(crate) config: Config,
}

impl ClusterBuilder {
    /// Adds an address to listen on (`HOST:PORT`, `:PORT` for every interface;
    /// port 0 picks a free port). May be called several times.
    ///
    /// ```
    /// let b = corral::Cluster::builder().listen("127.0.0.1:0").listen("[::1]:0");
    /// # drop(b);
    /// ```
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.config.listen.push(addr.into());
        self
    }

    /// How many worker processes to run (default: one per core).
    ///
    /// ```
    /// let b = corral::Cluster::builder().workers(corral::Workers::Fixed(2));
    /// # drop(b);
    /// ```
    pub fn workers(mut self, workers: Workers) -> Self {
        self.config.workers = workers;
        self
    }

    /// How connections are spread over workers (default: [`Balance::ReusePort`]).
    ///
    /// ```
    /// let b = corral::Cluster::builder().balance(corral::Balance::Shared);
    /// # drop(b);
    /// ```
    pub fn balance(mut self, balance: Balance) -> Self {
        self.config.balance = balance;
        self
    }

    /// Reads a PROXY protocol (v1 or v2) header at the start of every
    /// connection and uses the client address it names (for
    /// [`Balance::Sticky`] and for the address the listener reports). Only for
    /// the modes where the primary accepts ([`Balance::passes_connections`]);
    /// a connection with a missing or malformed header is closed.
    ///
    /// ```
    /// let b = corral::Cluster::builder()
    ///     .balance(corral::Balance::Sticky)
    ///     .proxy_protocol(true);
    /// # drop(b);
    /// ```
    pub fn proxy_protocol(mut self, enabled: bool) -> Self {
        self.config.proxy_protocol = enabled;
        self
    }

    /// Handles, in the primary, the messages workers send with
    /// [`Worker::send`](crate::Worker::send): the slot that sent it and the
    /// message. Called on the primary's event loop, so keep it short.
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct Report { jobs: u32 }
    ///
    /// let b = corral::Cluster::builder().on_message(|slot, message| {
    ///     if let Ok(report) = message.decode::<Report>() {
    ///         println!("slot {slot} ran {} jobs", report.jobs);
    ///     }
    /// });
    /// # drop(b);
    /// ```
    pub fn on_message(
        mut self,
        handler: impl FnMut(usize, crate::Message) + Send + 'static,
    ) -> Self {
        self.config.on_message = Some(super::config::MessageHook(std::sync::Arc::new(
            std::sync::Mutex::new(handler),
        )));
        self
    }

    /// How long a new worker may take to start serving before it is killed
    /// (default 10 s; PM2's `listen_timeout`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().ready_timeout(Duration::from_secs(30));
    /// # drop(b);
    /// ```
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// How long a worker's event loop may go without sending a heartbeat
    /// before it is considered hung, killed and replaced (default 5 s;
    /// Gunicorn's `timeout`). Heartbeats are sent from the event loop itself,
    /// so a loop blocked by CPU work or a blocking call is caught.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().heartbeat_timeout(Duration::from_secs(2));
    /// # drop(b);
    /// ```
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.config.heartbeat_timeout = timeout;
        self.config.heartbeat_interval = self
            .config
            .heartbeat_interval
            .min(timeout / 4)
            .max(Duration::from_millis(10));
        self
    }

    /// How long draining workers get to finish in-flight requests on shutdown
    /// or reload before they are killed (default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().shutdown_timeout(Duration::from_secs(10));
    /// # drop(b);
    /// ```
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// On stop (`SIGTERM`, `SIGINT`, `corral stop`), how long the workers keep
    /// serving after being told their node is draining (default 0: drain at
    /// once). During the delay [`Worker::is_node_draining`](crate::Worker::is_node_draining)
    /// is true, so a readiness endpoint can answer 503 and a load balancer or
    /// Kubernetes Service stops sending before anyone stops accepting; then
    /// the usual graceful stop follows. A second stop request during the delay
    /// stops at once. Programs under `corral run` have no channel and are not
    /// told: for them the delay only holds back their `SIGTERM`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().drain_delay(Duration::from_secs(5));
    /// # drop(b);
    /// ```
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.config.drain_delay = delay;
        self
    }

    /// How long a draining worker keeps idle keep-alive connections open, so
    /// that clients sending on them get a response with `Connection: close`
    /// rather than a reset (default 2 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().drain_grace(Duration::from_millis(500));
    /// # drop(b);
    /// ```
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.config.drain_grace = grace;
        self
    }

    /// Replaces a worker after it has served about `requests` requests, plus a
    /// random `0..=jitter` so workers do not all recycle at once (Gunicorn's
    /// `max_requests` and `max_requests_jitter`). Requests are counted by
    /// [`Worker::track_requests`](crate::Worker::track_requests).
    ///
    /// ```
    /// let b = corral::Cluster::builder().max_requests(10_000, 1_000);
    /// # drop(b);
    /// ```
    pub fn max_requests(mut self, requests: u64, jitter: u64) -> Self {
        self.config.max_requests = Some(requests.max(1));
        self.config.max_requests_jitter = jitter;
        self
    }

    /// Replaces a worker whose resident memory exceeds `bytes` (PM2's
    /// `max_memory_restart`).
    ///
    /// ```
    /// let b = corral::Cluster::builder().max_memory(512 * 1024 * 1024);
    /// # drop(b);
    /// ```
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.config.max_memory = Some(bytes);
        self
    }

    /// After this many consecutive failed starts a slot is not restarted any
    /// more (default 5). A worker that serves for [`min_uptime`](Self::min_uptime)
    /// resets the count.
    ///
    /// ```
    /// let b = corral::Cluster::builder().crash_loop_limit(3);
    /// # drop(b);
    /// ```
    pub fn crash_loop_limit(mut self, failures: u32) -> Self {
        self.config.crash_loop_limit = failures.max(1);
        self
    }

    /// How long a worker must have been serving for its crash not to count
    /// towards the crash loop (default 5 s; PM2's `min_uptime`). Shorter-lived
    /// workers are restarted with growing back-off and, after
    /// [`crash_loop_limit`](Self::crash_loop_limit) in a row, given up on.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().min_uptime(Duration::from_secs(1));
    /// # drop(b);
    /// ```
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.config.stable_after = uptime;
        self
    }

    /// During a rolling reload, how long each new worker must stay ready
    /// before the next slot moves (default 2 s). A new generation that dies
    /// within [`min_uptime`](Self::min_uptime) of becoming ready, during the
    /// reload or after it, is rolled back slot by slot behind the same gate.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().reload_gate(Duration::from_secs(5));
    /// # drop(b);
    /// ```
    pub fn reload_gate(mut self, gate: Duration) -> Self {
        self.config.reload_gate = gate;
        self
    }

    /// Threads of each worker's CPU pool ([`Worker::pool`](crate::Worker::pool)).
    /// Default: the cores divided by the number of workers (at least one), so
    /// the whole cluster uses every core once without oversubscribing.
    ///
    /// ```
    /// let b = corral::Cluster::builder().pool_threads(2);
    /// # drop(b);
    /// ```
    pub fn pool_threads(mut self, threads: usize) -> Self {
        self.config.pool_threads = Some(threads.max(1));
        self
    }

    /// Tasks each worker's pool queues beyond its running ones before
    /// `try_run` rejects with [`PoolError::QueueFull`](crate::pool::PoolError::QueueFull)
    /// (default: the pool's own default).
    ///
    /// ```
    /// let b = corral::Cluster::builder().pool_queue(64);
    /// # drop(b);
    /// ```
    pub fn pool_queue(mut self, tasks: usize) -> Self {
        self.config.pool_queue = Some(tasks);
        self
    }

    /// Serves the primary's admin pages on this address: `/status` (JSON),
    /// `/metrics` (Prometheus) and `/` (a live dashboard) with every worker's
    /// requests, connections, memory, event-loop delay and pool figures from
    /// its last heartbeat. Off by default; keep it on loopback.
    ///
    /// ```
    /// let b = corral::Cluster::builder().admin("127.0.0.1:9090");
    /// # drop(b);
    /// ```
    pub fn admin(mut self, addr: impl Into<String>) -> Self {
        self.config.admin = Some(addr.into());
        self
    }

    /// The cluster's name (default: the program's file name): it names the
    /// control socket, so `corral status --name NAME` finds this cluster, and
    /// a second cluster of the same name is refused.
    ///
    /// ```
    /// let b = corral::Cluster::builder().name("payments");
    /// # drop(b);
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Where the control socket is (default: `$XDG_RUNTIME_DIR/corral/NAME.sock`,
    /// or `/tmp/corral-UID/NAME.sock`).
    ///
    /// ```
    /// let b = corral::Cluster::builder().control_path("/run/payments/control.sock");
    /// # drop(b);
    /// ```
    pub fn control_path(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.control = Some(path.into());
        self
    }

    /// Runs the workers as this user (a name or a numeric uid). The primary
    /// binds the listening sockets first, so start it as root to serve a
    /// port below 1024 from unprivileged workers.
    ///
    /// ```
    /// let b = corral::Cluster::builder().user("www-data");
    /// # drop(b);
    /// ```
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.config.user = Some(user.into());
        self
    }

    /// Runs the workers with this group (a name or a numeric gid; default:
    /// the [`user`](Self::user)'s primary group).
    ///
    /// ```
    /// let b = corral::Cluster::builder().user("www-data").group("www-data");
    /// # drop(b);
    /// ```
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.config.group = Some(group.into());
        self
    }

    /// Where [`Worker::broadcast`](crate::Worker::broadcast) messages go:
    /// this node's workers (the default) or every worker of every node on a
    /// Redis server (Socket.IO's Redis adapter, for corral). The primary
    /// publishes each message once for the other nodes, keeps each sender's
    /// order, and reconnects with back-off after a lost connection, counting
    /// and logging what was missed.
    ///
    /// ```
    /// let broadcast = corral::broadcast::BroadcastConfig::redis("redis://127.0.0.1:6379")?;
    /// let b = corral::Cluster::builder().broadcast(broadcast);
    /// # drop(b);
    /// # Ok::<(), corral::Error>(())
    /// ```
    pub fn broadcast(mut self, broadcast: crate::broadcast::BroadcastConfig) -> Self {
        self.config.broadcast = broadcast;
        self
    }

    /// Whether corral installs a `tracing` subscriber that writes to stderr,
    /// each line tagged with the process's role, slot and pid (default true;
    /// set to false to install your own).
    ///
    /// ```
    /// let b = corral::Cluster::builder().logging(false);
    /// # drop(b);
    /// ```
    pub fn logging(mut self, enabled: bool) -> Self {
        self.config.logging = enabled;
        self
    }

    /// For [`run_command`](Self::run_command): how long a started program
    /// must stay up to count as ready, since it sends no handshake
    /// (default 1 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().ready_after(Duration::from_millis(300));
    /// # drop(b);
    /// ```
    pub fn ready_after(mut self, uptime: Duration) -> Self {
        self.config.ready_after = uptime;
        self
    }

    /// How long a client of [`Worker::serve`](crate::Worker::serve) has to
    /// send a complete request head: from accept on a new connection, from
    /// its first byte on a keep-alive one; a request body gets as long and
    /// must then keep arriving (default 30 s; `--header-timeout`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().header_timeout(Duration::from_secs(10));
    /// # drop(b);
    /// ```
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.config.header_timeout = timeout;
        self
    }

    /// How long a keep-alive connection of [`Worker::serve`](crate::Worker::serve)
    /// may wait for its next request (default 60 s; `--idle-timeout`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = corral::Cluster::builder().idle_timeout(Duration::from_secs(15));
    /// # drop(b);
    /// ```
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Open connections per worker above which [`Worker::serve`](crate::Worker::serve)
    /// stops accepting until one closes, so new ones wait in the kernel's
    /// queue instead of failing (default: what the worker's `RLIMIT_NOFILE`
    /// allows with headroom, [`default_max_connections`](crate::net::default_max_connections);
    /// `--max-connections`).
    ///
    /// ```
    /// let b = corral::Cluster::builder().max_connections(10_000);
    /// # drop(b);
    /// ```
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.config.max_connections = Some(connections.max(1));
        self
    }

    /// Clusters another program instead of this one: each worker is
    /// `program args...`, started with its slot's listening sockets by the
    /// systemd socket-activation convention (descriptors 3, 4, ...,
    /// `LISTEN_FDS`, `LISTEN_PID`) and its slot in `CORRAL_INSTANCE`. The
    /// supervision is the same — restarts with back-off, crash-loop
    /// detection, `SIGHUP` rolling reload, `SIGTERM` graceful stop — except
    /// that a program that is not a corral worker sends no heartbeat, is ready
    /// once it has stayed up for [`ready_after`](Self::ready_after), and is
    /// asked to drain with `SIGTERM`. Only the kernel balancing modes
    /// (`reuseport`, `shared`) apply.
    ///
    /// ```no_run
    /// corral::Cluster::builder()
    ///     .listen("127.0.0.1:8080")
    ///     .run_command("python3", ["server.py"])
    /// # .unwrap();
    /// ```
    pub fn run_command<I, S>(mut self, program: impl AsRef<std::ffi::OsStr>, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.config.external = Some(super::config::ExternalProgram {
            program: program.as_ref().to_owned(),
            args: args
                .into_iter()
                .map(|arg| arg.as_ref().to_owned())
                .collect(),
        });
        primary::run(self.config)
    }

    /// Runs the cluster.
    ///
    /// In the primary this supervises workers until `SIGTERM` or `SIGINT` and
    /// returns `Ok(())` after a graceful stop, or an error if the sockets cannot
    /// be bound or every slot is in a crash loop. In a worker it runs `serve`
    /// on a single-threaded tokio event loop and returns when it completes.
    ///
    /// ```no_run
    /// # use axum::Router;
    /// corral::Cluster::builder()
    ///     .listen("127.0.0.1:8080")
    ///     .run(|worker| async move {
    ///         axum::serve(worker.listener(), Router::new())
    ///             .with_graceful_shutdown(worker.shutdown())
    ///             .await
    ///     })
    /// # .unwrap();
    /// ```
    pub fn run<F, Fut, E>(self, serve: F) -> Result<()>
    where
        F: FnOnce(crate::Worker) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: Into<BoxError>,
    {
        match worker::WorkerEnv::from_env()? {
            Some(env) => worker::run(self.config, env, serve),
            None => primary::run(self.config),
        }
    }
}
