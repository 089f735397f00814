//! The primary's executor: it turns what happens in the world (a child
//! exits, a worker's message arrives, a signal, a deadline) into
//! [`supervisor::Event`]s, asks [`supervisor::decide`] what to do, and does
//! it (spawn, drain, kill, route, announce, exit). Every decision is made in
//! the supervisor; nothing here chooses.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use super::acceptor::{accept_and_pass, dispatch};
use super::admin::{self, SharedStatus};
use super::balancer::Balancer;
use super::config::Config;
use super::messages::Message;
use super::spawn::{is_transient, spawn_program, spawn_worker, Program};
use super::supervisor::{
    self, Action, Build, DrainBy, Event, Kind, Level, Phase, Plan, ReplyId, Route, Rules,
    ScaleTarget, SlotState, SpawnError, State, WorkerId,
};
use crate::control::{ControlCommand, ControlHandle, LogBook};
use crate::error::{Error, Result};
use crate::ipc::{self, ChannelError, ToPrimary, ToWorker};
use crate::metrics::app_metrics::SharedAppMetrics;
use crate::metrics::status::{
    ClusterStatus, ReloadStatus, SlotStatus, WorkerStatus, WorkerSummary,
};
use crate::metrics::ProcessFigures;
use crate::net::bind::{adopt, bind_all, bind_error, resolve, steer_all, BoundAddress};
use crate::net::fd_passing::{ConnectionSender, PassedConnection};
use crate::net::steering::{SlotTraffic, Steering};

/// The longest the loop sleeps: status figures (CPU %, req/s) refresh at least this often.
const REFRESH: Duration = Duration::from_secs(1);
/// Messages queued for one worker at most, and their bytes: a slow worker
/// loses broadcasts (counted, logged) instead of growing the primary.
const WORKER_OUTBOX_MESSAGES: usize = 1024;
const WORKER_OUTBOX_BYTES: usize = 16 << 20;
/// What the world reports, queued for the loop (bounded: a flooding worker
/// waits on its own channel, it cannot grow the primary).
const INPUT_QUEUE: usize = 4096;

/// Runs the primary role until a graceful stop or a fatal error.
pub(crate) fn run(config: Config) -> Result<()> {
    if config.logging {
        crate::logging::init(format!("[primary pid {}]", std::process::id()));
    }
    if config.external.is_some() && config.primary_accepts() {
        return Err(Error::Config(format!(
            "--balance {} needs corral workers, which take connections from the primary; a program run by `corral run` accepts from its own sockets, so use --balance reuseport or shared",
            config.balance
        )));
    }
    let slots = config.workers.count();
    let name = config
        .name
        .clone()
        .unwrap_or_else(crate::control::default_name);
    let identity = super::identity::resolve(config.user.as_deref(), config.group.as_deref())?;
    // Socket activation: sockets systemd handed over replace binding.
    let activated = crate::systemd::listen_fds()?;
    let bound = if activated.is_empty() {
        bind_all(&config.listen, slots, config.layout())?
    } else {
        tracing::info!(
            "using {} listening socket(s) passed by systemd instead of --listen",
            activated.len()
        );
        activated
            .into_iter()
            .map(|passed| {
                let address = adopt(socket2::Socket::from(passed.fd), slots, config.layout())?;
                let name = passed.name.as_deref().unwrap_or("unnamed");
                tracing::info!("socket {name} from systemd: {}", address.local);
                Ok(address)
            })
            .collect::<Result<Vec<_>>>()?
    };
    // Before any worker starts, so a second live cluster of this name fails at once.
    let control_path = crate::control::socket_path(&name, config.control.as_deref());
    let control = crate::control::bind(&control_path, &name)?;
    let admin = match &config.admin {
        Some(text) => {
            let addr = resolve(text)?;
            let listener =
                std::net::TcpListener::bind(addr).map_err(|err| bind_error(addr, err))?;
            listener.set_nonblocking(true)?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "--admin {addr} is not a loopback address: its pages have no authentication, so anyone who can reach it sees the cluster's status"
                );
            }
            Some(listener)
        }
        None => None,
    };
    let (program_path, first, args) = match &config.external {
        Some(external) => {
            let path = PathBuf::from(&external.program);
            (path.clone(), Program::Path(path), external.args.clone())
        }
        None => {
            let path = std::env::current_exe()?;
            // The first generation is the very program running now.
            let pinned = Program::pin(std::path::Path::new("/proc/self/exe"))
                .map(|program| match program {
                    Program::Pinned { file, .. } => Program::Pinned {
                        file,
                        path: path.clone(),
                    },
                    other => other,
                })
                .unwrap_or_else(|_| Program::Path(path.clone()));
            (path, pinned, std::env::args_os().skip(1).collect())
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let program = Launch {
            path: program_path,
            first,
            args,
        };
        let executor = Executor::new(config, bound, program, slots, name, identity);
        executor.run(admin, control).await
    })
}

fn rules(config: &Config) -> Rules {
    Rules {
        kind: match config.external {
            Some(_) => Kind::External {
                ready_after: config.ready_after,
            },
            None => Kind::Corral,
        },
        ready_timeout: config.ready_timeout,
        heartbeat_timeout: config.heartbeat_timeout,
        shutdown_timeout: config.shutdown_timeout,
        min_uptime: config.stable_after,
        reload_gate: config.reload_gate,
        crash_loop_limit: config.crash_loop_limit,
        restart_backoff: config.restart_backoff,
        restart_backoff_max: config.restart_backoff_max,
        retry_first: Duration::from_secs(1),
        retry_max: Duration::from_secs(30),
        max_memory: config.max_memory,
        drain_delay: config.drain_delay,
        primary_accepts: config.primary_accepts(),
    }
}

/// What the world reports to the loop.
enum Input {
    /// Boxed: heartbeats carry a worker's figures, the other inputs are small.
    Event(Box<Event>),
    /// A user message for the primary's handler.
    User { slot: usize, payload: Vec<u8> },
    /// A user message for every worker.
    Broadcast { slot: usize, payload: Vec<u8> },
    /// A `corral` command from the control socket.
    Control(ControlCommand),
    /// A broadcast to hand to every local worker (from this node or another).
    Delivered(crate::broadcast::Delivered),
    /// A worker's application metrics (OpenMetrics text).
    Metrics { id: WorkerId, text: String },
}

/// A queue of messages to one worker, bounded in count and bytes.
#[derive(Clone)]
struct Outbox {
    sender: mpsc::Sender<ToWorker>,
    bytes: Arc<AtomicUsize>,
}

impl Outbox {
    fn new() -> (Outbox, mpsc::Receiver<ToWorker>) {
        let (sender, receiver) = mpsc::channel(WORKER_OUTBOX_MESSAGES);
        (
            Outbox {
                sender,
                bytes: Arc::default(),
            },
            receiver,
        )
    }

    /// False when the worker's queue is full (or gone).
    fn try_send(&self, message: ToWorker) -> bool {
        let size = message_size(&message);
        if self.bytes.load(Ordering::Relaxed) + size > WORKER_OUTBOX_BYTES {
            return false;
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        if self.sender.try_send(message).is_err() {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }
}

fn message_size(message: &ToWorker) -> usize {
    match message {
        ToWorker::Broadcast { payload, .. } => payload.len(),
        _ => 0,
    }
}

/// What the workers run: where reloads pin the program from, the first
/// generation's program, and the arguments.
struct Launch {
    path: PathBuf,
    first: Program,
    args: Vec<OsString>,
}

/// Lines of output kept per slot for `corral logs`.
const LOG_LINES_PER_SLOT: usize = 1000;

/// A control-socket caller waiting for the outcome of its command.
enum Pending {
    Reload(tokio::sync::oneshot::Sender<Result<u64, String>>),
    Scale(tokio::sync::oneshot::Sender<Result<usize, String>>),
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// What the executor holds for one live worker process.
struct Handle {
    pid: u32,
    outbox: Option<Outbox>,
    /// Where the balancer sends its connections (accept-and-pass modes).
    connections: Option<mpsc::UnboundedSender<PassedConnection>>,
    /// Broadcasts it could not take.
    dropped: u64,
    vitals: Vitals,
}

/// Figures the primary measures itself, from /proc and between heartbeats.
#[derive(Default)]
struct Vitals {
    cpu_seconds: Option<(Instant, f64)>,
    cpu_percent: Option<f64>,
    rss_bytes: Option<u64>,
    requests: Option<(Instant, u64)>,
    requests_per_s: Option<f64>,
}

struct Executor {
    config: Config,
    name: String,
    state: State,
    bound: Vec<BoundAddress>,
    /// Where a reload pins the next generation from.
    program_path: PathBuf,
    programs: HashMap<Build, Program>,
    args: Vec<OsString>,
    handles: HashMap<WorkerId, Handle>,
    inputs_tx: mpsc::Sender<Input>,
    inputs: mpsc::Receiver<Input>,
    /// Present in the accept-and-pass modes.
    balancer: Option<Arc<Mutex<Balancer>>>,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
    /// The routes last applied to the balancer.
    routes: Vec<Route>,
    status: SharedStatus,
    /// Each slot's last application metrics, for `/metrics`.
    app_metrics: SharedAppMetrics,
    started: Instant,
    /// Control-socket callers waiting for an outcome.
    replies: HashMap<ReplyId, Pending>,
    next_reply: u64,
    logs: LogBook,
    /// The user and group workers run as (`--user`, `--group`).
    identity: Option<super::identity::Identity>,
    /// What systemd was last told (`STATUS=`), to tell it only changes.
    told_systemd: String,
    told_stopping: bool,
    /// Where worker broadcasts go (this node, or every node on Redis).
    publisher: Option<crate::broadcast::BroadcastPublisher>,
    /// Events the actions produced (a spawn's outcome), handled before new input.
    follow_ups: VecDeque<Event>,
    exit: Option<Result<()>>,
}

impl Executor {
    fn new(
        config: Config,
        bound: Vec<BoundAddress>,
        program: Launch,
        slots: usize,
        name: String,
        identity: Option<super::identity::Identity>,
    ) -> Self {
        let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
        let balancer = config
            .primary_accepts()
            .then(|| Arc::new(Mutex::new(Balancer::new(config.balance, slots))));
        let state = State::new(rules(&config), slots);
        Executor {
            config,
            name,
            state,
            bound,
            program_path: program.path,
            programs: HashMap::from([(1, program.first)]),
            args: program.args,
            handles: HashMap::new(),
            inputs_tx,
            inputs,
            balancer,
            acceptors: Vec::new(),
            routes: Vec::new(),
            status: SharedStatus::default(),
            app_metrics: SharedAppMetrics::default(),
            started: Instant::now(),
            replies: HashMap::new(),
            next_reply: 0,
            logs: LogBook::new(LOG_LINES_PER_SLOT),
            identity,
            told_systemd: String::new(),
            told_stopping: false,
            publisher: None,
            follow_ups: VecDeque::new(),
            exit: None,
        }
    }

    async fn run(
        mut self,
        admin: Option<std::net::TcpListener>,
        control: crate::control::ControlListener,
    ) -> Result<()> {
        let (commands_tx, mut commands) = mpsc::channel(64);
        let status = self.status.clone();
        let handle = ControlHandle {
            status: Arc::new(move || {
                let snapshot = status
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                serde_json::to_value(snapshot).unwrap_or(serde_json::Value::Null)
            }),
            commands: commands_tx,
            logs: self.logs.clone(),
        };
        let control_task = tokio::spawn(crate::control::serve(control, handle));
        let inputs = self.inputs_tx.clone();
        tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                if inputs.send(Input::Control(command)).await.is_err() {
                    return;
                }
            }
        });
        let (publisher, mut deliveries) = crate::broadcast::start(&self.config.broadcast)?;
        self.publisher = Some(publisher);
        let inputs = self.inputs_tx.clone();
        tokio::spawn(async move {
            while let Some(delivered) = deliveries.recv().await {
                if inputs.send(Input::Delivered(delivered)).await.is_err() {
                    return;
                }
            }
        });
        if let Some(interval) = crate::systemd::watchdog_interval() {
            tokio::spawn(crate::systemd::watchdog_loop(interval));
        }
        let result = self.serve(admin).await;
        // Dropping the server removes the socket file.
        control_task.abort();
        let _ = control_task.await;
        result
    }

    async fn serve(&mut self, admin: Option<std::net::TcpListener>) -> Result<()> {
        if let Some(listener) = admin {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(
                "admin: http://{}/ (dashboard), /status, /metrics",
                listener.local_addr()?
            );
            tokio::spawn(admin::serve(
                listener,
                self.status.clone(),
                self.app_metrics.clone(),
            ));
        }
        self.listen_to_signals()?;
        tracing::info!("program: {}", self.program_path.display());
        self.start_acceptors()?;
        self.apply(Event::Start);
        let mut next_refresh = Instant::now() + REFRESH;
        loop {
            if let Some(result) = self.exit.take() {
                return result;
            }
            // Heartbeats arrive more often than REFRESH, so waiting for a quiet
            // REFRESH would starve the periodic work (CPU % stayed unknown).
            if Instant::now() >= next_refresh {
                next_refresh = Instant::now() + REFRESH;
                self.expire_waiting_connections();
                self.sample_vitals();
                self.apply(Event::Timer);
                continue;
            }
            let wake = self
                .state
                .next_deadline()
                .map_or(next_refresh, |deadline| deadline.min(next_refresh));
            let input = tokio::select! {
                Some(input) = self.inputs.recv() => Some(input),
                _ = tokio::time::sleep_until(wake.into()) => None,
            };
            match input {
                Some(Input::Event(event)) => {
                    let event = *event;
                    if let (Event::Heartbeat { id, stats }, Some(balancer)) =
                        (&event, &self.balancer)
                    {
                        Balancer::lock(balancer).report(id.slot, id.serial, stats.connections_open);
                    }
                    self.apply(event)
                }
                Some(Input::User { slot, payload }) => self.on_user_message(slot, payload),
                Some(Input::Broadcast { slot, payload }) => {
                    if let Some(publisher) = &self.publisher {
                        publisher.publish(slot, payload);
                    }
                }
                Some(Input::Delivered(delivered)) => {
                    self.broadcast(delivered.from_slot, delivered.payload.to_vec())
                }
                Some(Input::Metrics { id, text }) => self.on_app_metrics(id, text),
                Some(Input::Control(command)) => {
                    let event = self.control_event(command);
                    self.apply(event)
                }
                // At the refresh, the periodic work above brings the timer too.
                None if Instant::now() >= next_refresh => {}
                // A supervisor deadline.
                None => self.apply(Event::Timer),
            }
        }
    }

    /// Decides on `event` and everything that follows from it, performs the
    /// actions, then brings routes and status up to date.
    fn apply(&mut self, event: Event) {
        self.follow_ups.push_back(event);
        while let Some(event) = self.follow_ups.pop_front() {
            let actions = supervisor::decide(&mut self.state, event, Instant::now());
            for action in actions {
                self.perform(action);
            }
        }
        if self.state.leaving() && !self.told_stopping {
            self.told_stopping = true;
            crate::systemd::stopping();
        }
        self.sync_routes();
        self.publish_status();
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Spawn { id, build } => {
                let event = match self.spawn(id, build) {
                    Ok(pid) => Event::Spawned { id, pid },
                    Err(err) => Event::SpawnFailed {
                        id,
                        error: SpawnError {
                            transient: is_transient(&err),
                            message: err.to_string(),
                        },
                    },
                };
                self.follow_ups.push_back(event);
            }
            Action::StopListening => {
                for address in &self.bound {
                    address.stop_listening();
                }
            }
            Action::Drain { id, by, backlog } => self.drain(id, by, backlog),
            Action::NotifyDraining { id } => {
                if let Some(outbox) = self.handles.get(&id).and_then(|h| h.outbox.as_ref()) {
                    // A full queue means a worker far behind; it still drains on time.
                    let _ = outbox.sender.try_send(ToWorker::NodeDraining);
                }
            }
            Action::Kill { id } => {
                if let Some(handle) = self.handles.get_mut(&id) {
                    handle.connections = None;
                    // The pid cannot have been reused: the process is only
                    // reaped by the task that reports its exit, after which
                    // its handle is gone.
                    let _ = kill(Pid::from_raw(handle.pid as i32), Signal::SIGKILL);
                }
            }
            Action::PinBuild { generation } => {
                crate::systemd::reloading();
                let event = match self.pin() {
                    Ok(program) => {
                        tracing::info!(
                            "reload: generation {generation} is {}",
                            program.path().display()
                        );
                        self.programs.insert(generation, program);
                        Event::BuildPinned { generation }
                    }
                    Err(err) => Event::BuildUnavailable {
                        generation,
                        error: format!("{}: {err}", self.program_path.display()),
                    },
                };
                self.follow_ups.push_back(event);
            }
            Action::ForgetBuild { generation } => {
                self.programs.remove(&generation);
            }
            Action::Announce => self.announce(),
            Action::Reply { to, result } => match self.replies.remove(&to) {
                Some(Pending::Reload(done)) => {
                    let generation = self
                        .state
                        .last_reload
                        .as_ref()
                        .map_or(0, |last| last.generation);
                    let _ = done.send(result.map(|_| generation));
                    crate::systemd::ready();
                }
                Some(Pending::Scale(done)) => {
                    let _ = done.send(result.map(|_| self.state.active_slots()));
                }
                Some(Pending::Stop(done)) => {
                    let _ = done.send(());
                }
                None => {}
            },
            Action::Log { level, message } => match level {
                Level::Debug => tracing::debug!("{message}"),
                Level::Info => tracing::info!("{message}"),
                Level::Warn => tracing::warn!("{message}"),
                Level::Error => tracing::error!("{message}"),
            },
            Action::Exit(result) => {
                for acceptor in self.acceptors.drain(..) {
                    acceptor.abort();
                }
                self.exit = Some(result.map_err(|detail| Error::CrashLoop { detail }));
            }
        }
    }

    /// Opens the program for a new generation.
    fn pin(&self) -> std::io::Result<Program> {
        if self.config.external.is_some() {
            // Looked up by name at each start: its interpreter (or `sh`)
            // reopens it by path anyway.
            return Ok(Program::Path(self.program_path.clone()));
        }
        Program::pin(&self.program_path)
    }

    fn spawn(&mut self, id: WorkerId, build: Build) -> std::io::Result<u32> {
        let slot = id.slot;
        let program = self.programs.get(&build).ok_or_else(|| {
            std::io::Error::other(format!(
                "the program of generation {build} is no longer open"
            ))
        })?;
        if let Some(balancer) = &self.balancer {
            Balancer::lock(balancer).ensure_slots(slot + 1);
        }
        // In the accept-and-pass modes only the primary accepts.
        let listeners: Vec<_> = if self.balancer.is_some() {
            Vec::new()
        } else {
            for address in &mut self.bound {
                // Grows the group for a slot added at run time.
                address.reopen_slot(slot).map_err(std::io::Error::other)?;
            }
            self.bound
                .iter()
                .filter_map(|address| address.socket_for_slot(slot))
                .map(AsRawFd::as_raw_fd)
                .collect()
        };
        let identity = self.identity.as_ref();
        let spawned = if self.config.external.is_some() {
            spawn_program(program.path(), &self.args, slot, &listeners, identity)
        } else {
            let keep_listening = self
                .bound
                .iter()
                .any(|address| address.slot_socket_is_systemds(slot));
            spawn_worker(
                program,
                &self.args,
                slot,
                id.serial,
                &listeners,
                keep_listening,
                identity,
            )
        }?;
        let pid = spawned.pid;
        let inputs = self.inputs_tx.clone();
        let mut child = spawned.child;
        if let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) {
            self.logs.capture(slot, pid, stdout, stderr);
        }
        tokio::spawn(async move {
            let status = child.wait().await;
            let how = describe_exit(&status);
            let _ = inputs
                .send(Input::Event(Box::new(Event::Exited { id, how })))
                .await;
        });
        let outbox = spawned.ipc.map(|ipc| {
            let (outbox, queue) = Outbox::new();
            tokio::spawn(relay(
                id,
                ipc,
                queue,
                outbox.bytes.clone(),
                self.inputs_tx.clone(),
            ));
            outbox
        });
        let connections = match (&self.balancer, spawned.connections) {
            (Some(balancer), Some(connections)) => {
                let sender = ConnectionSender::new(connections)?;
                let (connections_tx, connections) = mpsc::unbounded_channel();
                tokio::spawn(dispatch(
                    slot,
                    id.serial,
                    sender,
                    connections,
                    balancer.clone(),
                ));
                Some(connections_tx)
            }
            // The worker sees its end close and accepts from its own sockets.
            _ => None,
        };
        self.handles.insert(
            id,
            Handle {
                pid,
                outbox,
                connections,
                dropped: 0,
                vitals: Vitals::default(),
            },
        );
        Ok(pid)
    }

    fn drain(&mut self, id: WorkerId, by: DrainBy, backlog: bool) {
        let Some(handle) = self.handles.get_mut(&id) else {
            return;
        };
        // Closing our side of the connection queue lets the worker know when
        // the last connection passed to it has arrived.
        handle.connections = None;
        match by {
            DrainBy::Signal => {
                let _ = kill(Pid::from_raw(handle.pid as i32), Signal::SIGTERM);
            }
            DrainBy::Message => {
                let message = if backlog {
                    ToWorker::Retire
                } else {
                    ToWorker::Drain
                };
                // A worker whose queue is full or gone is killed at its deadline.
                if let Some(outbox) = &handle.outbox {
                    let _ = outbox.sender.try_send(message);
                }
            }
        }
    }

    fn on_user_message(&mut self, slot: usize, payload: Vec<u8>) {
        match &self.config.on_message {
            Some(hook) => {
                let mut handler = hook
                    .0
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                handler(slot, Message::new(payload));
            }
            None => tracing::debug!("slot {slot}: message dropped: no on_message handler"),
        }
    }

    fn broadcast(&mut self, from: usize, payload: Vec<u8>) {
        for (id, handle) in &mut self.handles {
            let Some(outbox) = &handle.outbox else {
                continue;
            };
            let message = ToWorker::Broadcast {
                from_slot: from as u32,
                payload: payload.clone(),
            };
            if !outbox.try_send(message) {
                handle.dropped += 1;
                if handle.dropped.is_power_of_two() {
                    tracing::warn!(
                        "slot {}: worker pid {} is not keeping up with broadcasts; {} dropped so far",
                        id.slot,
                        handle.pid,
                        handle.dropped
                    );
                }
            }
        }
    }

    /// A control-socket command as a supervisor event, its caller waiting
    /// under a reply id.
    fn control_event(&mut self, command: ControlCommand) -> Event {
        self.next_reply += 1;
        let reply = ReplyId(self.next_reply);
        match command {
            ControlCommand::Reload { done } => {
                self.replies.insert(reply, Pending::Reload(done));
                Event::Reload { reply: Some(reply) }
            }
            ControlCommand::Scale { target, done } => {
                self.replies.insert(reply, Pending::Scale(done));
                let target = match target {
                    crate::control::ScaleTarget::To(n) => ScaleTarget::To(n),
                    crate::control::ScaleTarget::By(k) => ScaleTarget::By(k),
                };
                Event::Scale {
                    target,
                    reply: Some(reply),
                }
            }
            ControlCommand::Stop { done } => {
                self.replies.insert(reply, Pending::Stop(done));
                Event::Stop {
                    why: "corral stop".to_owned(),
                    reply: Some(reply),
                }
            }
        }
    }

    fn announce(&mut self) {
        let mut stdout = std::io::stdout().lock();
        for address in &self.bound {
            let _ = writeln!(
                stdout,
                "corral: listening on http://{} ({} workers, balance={})",
                address.local,
                self.state.slots.len(),
                self.config.balance
            );
        }
        let _ = stdout.flush();
        crate::systemd::ready();
    }

    /// In the accept-and-pass modes, one task per address accepts and hands
    /// each connection to the balancer.
    fn start_acceptors(&mut self) -> Result<()> {
        let Some(balancer) = &self.balancer else {
            return Ok(());
        };
        for (index, address) in self.bound.iter().enumerate() {
            let Some(socket) = address.socket_for_slot(0) else {
                continue;
            };
            let socket: std::net::TcpListener = socket.try_clone()?.into();
            self.acceptors.push(tokio::spawn(accept_and_pass(
                index as u16,
                socket,
                balancer.clone(),
                self.config.proxy_protocol,
                self.config.header_timeout,
            )));
        }
        Ok(())
    }

    /// Brings the balancer and the sockets in line with the routes the
    /// supervisor's state implies.
    fn sync_routes(&mut self) {
        // Handles of workers that are gone.
        let live: Vec<WorkerId> = self.state.workers().map(|w| w.id).collect();
        self.handles.retain(|id, _| live.contains(id));
        let routes = self.state.routes();
        if routes == self.routes {
            return;
        }
        let old = std::mem::replace(&mut self.routes, routes.clone());
        if self.state.stopping {
            for acceptor in self.acceptors.drain(..) {
                acceptor.abort();
            }
            if let Some(balancer) = &self.balancer {
                Balancer::lock(balancer).clear();
            }
        }
        if let Some(balancer) = &self.balancer {
            let mut balancer = Balancer::lock(balancer);
            for (slot, route) in routes.iter().enumerate() {
                let before = old.get(slot).copied().unwrap_or(Route::Hold);
                if before == *route {
                    continue;
                }
                if before == Route::Away {
                    balancer.slot_back(slot);
                }
                match *route {
                    Route::Serve(id) => {
                        if let Some(connections) =
                            self.handles.get(&id).and_then(|h| h.connections.clone())
                        {
                            balancer.worker_ready(slot, id.serial, connections);
                        }
                    }
                    Route::Hold => {
                        if let Route::Serve(id) = before {
                            balancer.worker_gone(slot, id.serial);
                        }
                    }
                    Route::Away => balancer.slot_given_up(slot),
                }
            }
            for slot in routes.len()..old.len() {
                balancer.slot_given_up(slot);
            }
        } else if !self.steer(&routes) {
            // Without steering, a slot nobody will serve for a while must not
            // collect its share of new connections: close its socket (it
            // rejoins the group when the slot is tried again), unless no
            // slot serves at all, when queueing for the retry is better.
            let any_serving = routes.iter().any(|route| *route != Route::Away);
            for (slot, state) in self.state.slots.iter().enumerate() {
                if !any_serving {
                    break;
                }
                if matches!(state.plan, Plan::GivenUp { .. }) {
                    for address in &mut self.bound {
                        address.close_slot(slot);
                    }
                }
            }
            for slot in routes.len()..old.len() {
                for address in &mut self.bound {
                    address.close_slot(slot);
                }
            }
        }
    }

    /// Connections that waited too long for their slot's worker are closed.
    fn expire_waiting_connections(&mut self) {
        let Some(balancer) = &self.balancer else {
            return;
        };
        let limit = self.config.ready_timeout;
        let closed = Balancer::lock(balancer).expire(Instant::now(), limit);
        if closed > 0 {
            tracing::warn!(
                "closed {closed} connections that waited {} for a worker",
                humantime::format_duration(limit)
            );
        }
    }

    /// Points the kernel's choice of socket at the slots the routes allow
    /// (classic BPF on the reuseport group); false where it cannot steer.
    fn steer(&mut self, routes: &[Route]) -> bool {
        let traffic: Vec<SlotTraffic> = routes
            .iter()
            .map(|route| match route {
                Route::Serve(_) => SlotTraffic::Serving,
                Route::Hold => SlotTraffic::TakingOver,
                Route::Away => SlotTraffic::Away,
            })
            .collect();
        steer_all(
            &mut self.bound,
            &Steering::for_slots(self.config.balance, &traffic),
        )
    }

    /// CPU and memory from /proc for every worker (external programs send
    /// no heartbeat, so this is all we know of them).
    fn sample_vitals(&mut self) {
        let now = Instant::now();
        for handle in self.handles.values_mut() {
            let Some(figures) = ProcessFigures::of(handle.pid) else {
                continue;
            };
            let vitals = &mut handle.vitals;
            if let Some((at, before)) = vitals.cpu_seconds {
                let elapsed = now.duration_since(at).as_secs_f64();
                if elapsed > 0.0 {
                    let spent = (figures.cpu_seconds - before).max(0.0);
                    vitals.cpu_percent = Some(round1(spent / elapsed * 100.0));
                }
            }
            vitals.cpu_seconds = Some((now, figures.cpu_seconds));
            vitals.rss_bytes = Some(figures.rss_bytes);
        }
    }

    /// Keeps a live worker's application metrics as its slot's.
    fn on_app_metrics(&mut self, id: WorkerId, text: String) {
        if self.state.worker(id).is_some() {
            self.app_metrics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .report(id.slot, id.serial, text);
        }
    }

    /// Forgets the application metrics of a slot once neither the worker
    /// that sent them nor a successor (a higher serial) is alive: a slot
    /// scaled away, given up on or backing off shows no series of the dead.
    fn forget_gone_app_metrics(&self) {
        let slots = &self.state.slots;
        self.app_metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|slot, serial| {
                slots
                    .get(slot)
                    .is_some_and(|slot| slot.workers().any(|w| w.id.serial >= serial))
            });
    }

    /// Refreshes the snapshot the admin pages and the control socket read.
    fn publish_status(&mut self) {
        self.forget_gone_app_metrics();
        let now = Instant::now();
        // Requests per second between heartbeats.
        for slot in &self.state.slots {
            for worker in slot.workers() {
                let Some(handle) = self.handles.get_mut(&worker.id) else {
                    continue;
                };
                let total = worker.stats.requests_total;
                let vitals = &mut handle.vitals;
                match vitals.requests {
                    Some((at, before))
                        if total != before || now.duration_since(at) > REFRESH * 3 =>
                    {
                        let elapsed = now.duration_since(at).as_secs_f64();
                        if elapsed >= 0.2 {
                            vitals.requests_per_s = Some(
                                ((total.saturating_sub(before)) as f64 / elapsed * 10.0).round()
                                    / 10.0,
                            );
                            vitals.requests = Some((now, total));
                        }
                    }
                    None => vitals.requests = Some((now, total)),
                    _ => {}
                }
            }
        }
        let snapshot = self.snapshot(now);
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            if let Ok(value) = serde_json::to_value(&snapshot) {
                let line = crate::systemd::status_line(&value);
                if line != self.told_systemd {
                    crate::systemd::status(&line);
                    self.told_systemd = line;
                }
            }
        }
        *self
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
    }

    fn snapshot(&self, now: Instant) -> ClusterStatus {
        let corral = !matches!(self.state.rules.kind, Kind::External { .. });
        let mut workers = Vec::new();
        let mut slots = Vec::new();
        for slot in &self.state.slots {
            let shown = slot.current.as_ref().or(slot.retiring.first());
            let state_name = |phase: Phase| match phase {
                Phase::Ready => "ready",
                Phase::Draining { .. } | Phase::Killed => "draining",
                Phase::Spawning | Phase::Starting => "starting",
            };
            if let Some(worker) = shown.filter(|w| w.pid.is_some()) {
                let vitals = self.handles.get(&worker.id).map(|h| &h.vitals);
                let heard = corral && worker.is_ready() || worker.is_draining();
                let stats = &worker.stats;
                workers.push(WorkerSummary {
                    slot: slot.index,
                    pid: worker.pid.unwrap_or(0),
                    generation: worker.build,
                    state: state_name(worker.phase),
                    uptime_s: round1(now.duration_since(worker.started).as_secs_f64()),
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    cpu_percent: vitals.and_then(|v| v.cpu_percent),
                    rss_bytes: if corral && stats.rss_bytes > 0 {
                        Some(stats.rss_bytes)
                    } else {
                        vitals.and_then(|v| v.rss_bytes)
                    },
                    requests_per_s: vitals.and_then(|v| v.requests_per_s).filter(|_| corral),
                    connections: heard.then_some(stats.connections_open).filter(|_| corral),
                    loop_delay_p99_ms: heard
                        .then_some(stats.event_loop_delay.p99_ms)
                        .filter(|_| corral),
                    pool_queued: heard.then_some(stats.pool.queued).filter(|_| corral),
                });
            }
            let retry = match slot.plan {
                Plan::BackOff { until } => Some(until),
                Plan::GivenUp { retry_at } => Some(retry_at),
                _ => None,
            };
            slots.push(SlotStatus {
                slot: slot.index,
                state: match slot.state() {
                    SlotState::Empty => "empty",
                    SlotState::Starting => "starting",
                    SlotState::Serving => "serving",
                    SlotState::Replacing => "replacing",
                    SlotState::BackingOff { .. } => "backing_off",
                    SlotState::GivenUp { .. } => "given_up",
                    SlotState::Retiring => "retiring",
                },
                starts: slot.next_serial,
                failures: slot.failures,
                gave_up: matches!(slot.plan, Plan::GivenUp { .. }),
                next_retry_s: retry
                    .map(|at| round1(at.saturating_duration_since(now).as_secs_f64())),
                worker: slot
                    .current
                    .as_ref()
                    .filter(|w| w.pid.is_some())
                    .map(|worker| WorkerStatus {
                        pid: worker.pid.unwrap_or(0),
                        generation: worker.build,
                        state: state_name(worker.phase),
                        uptime_seconds: now.duration_since(worker.started).as_secs_f64(),
                        stats: worker.stats.clone(),
                    }),
                draining: slot.retiring.iter().filter_map(|w| w.pid).collect(),
            });
        }
        ClusterStatus {
            name: self.name.clone(),
            pid: std::process::id(),
            balance: self.config.balance.to_string(),
            listen: self.bound.iter().map(|a| a.local.to_string()).collect(),
            uptime_s: round1(now.duration_since(self.started).as_secs_f64()),
            workers,
            last_reload: self.state.last_reload.as_ref().map(|last| ReloadStatus {
                outcome: last.outcome.as_str(),
                generation: last.generation,
                reason: last.reason.clone(),
            }),
            generation: self.state.good,
            reloading: self.state.reload.is_some() || self.state.pinning.is_some(),
            broadcast: self.publisher.as_ref().map(|publisher| publisher.stats()),
            // From the stop request on, drain delay included.
            stopping: self.state.leaving(),
            drain_delay_left_s: self
                .state
                .drain_notice
                .as_ref()
                .map(|notice| round1(notice.stop_at.saturating_duration_since(now).as_secs_f64())),
            slots,
        }
    }

    /// Every signal becomes an event; the ones corral gives no meaning are
    /// logged and ignored, never fatal (the default action of most is to end
    /// the process, which would orphan the workers).
    fn listen_to_signals(&self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let meanings: Vec<(i32, &'static str)> = vec![
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGHUP, "SIGHUP"),
            (libc::SIGTTIN, "SIGTTIN"),
            (libc::SIGTTOU, "SIGTTOU"),
            (libc::SIGUSR1, "SIGUSR1"),
            (libc::SIGUSR2, "SIGUSR2"),
            (libc::SIGPIPE, "SIGPIPE"),
            (libc::SIGWINCH, "SIGWINCH"),
            (libc::SIGQUIT, "SIGQUIT"),
            (libc::SIGALRM, "SIGALRM"),
            (libc::SIGVTALRM, "SIGVTALRM"),
            (libc::SIGPROF, "SIGPROF"),
            (libc::SIGXCPU, "SIGXCPU"),
            (libc::SIGXFSZ, "SIGXFSZ"),
            (libc::SIGIO, "SIGIO"),
            #[cfg(target_os = "linux")]
            (libc::SIGPWR, "SIGPWR"),
            #[cfg(target_os = "linux")]
            (libc::SIGSTKFLT, "SIGSTKFLT"),
        ];
        for (number, name) in meanings {
            let mut stream = signal(SignalKind::from_raw(number))?;
            let inputs = self.inputs_tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    let event = match number {
                        libc::SIGTERM | libc::SIGINT => Event::Stop {
                            why: name.to_owned(),
                            reply: None,
                        },
                        libc::SIGHUP => Event::Reload { reply: None },
                        libc::SIGTTIN => Event::Scale {
                            target: ScaleTarget::By(1),
                            reply: None,
                        },
                        libc::SIGTTOU => Event::Scale {
                            target: ScaleTarget::By(-1),
                            reply: None,
                        },
                        _ => {
                            tracing::warn!("{name} received: corral gives it no meaning; ignored");
                            continue;
                        }
                    };
                    if inputs.send(Input::Event(Box::new(event))).await.is_err() {
                        return;
                    }
                }
            });
        }
        #[cfg(target_os = "linux")]
        for number in libc::SIGRTMIN()..=libc::SIGRTMAX() {
            let Ok(mut stream) = signal(SignalKind::from_raw(number)) else {
                continue;
            };
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    tracing::warn!(
                        "real-time signal {number} received: corral gives it no meaning; ignored"
                    );
                }
            });
        }
        Ok(())
    }
}

/// Carries one worker's messages in both directions until its channel ends.
async fn relay(
    id: WorkerId,
    stream: tokio::net::UnixStream,
    mut outbox: mpsc::Receiver<ToWorker>,
    outbox_bytes: Arc<AtomicUsize>,
    inputs: mpsc::Sender<Input>,
) {
    let (mut sender, mut receiver) = ipc::channel(stream);
    loop {
        tokio::select! {
            received = receiver.recv::<ToPrimary>() => {
                let input = match received {
                    Ok(ToPrimary::Ready) => Input::Event(Box::new(Event::Ready { id })),
                    Ok(ToPrimary::Heartbeat(stats)) => Input::Event(Box::new(Event::Heartbeat { id, stats })),
                    Ok(ToPrimary::Recycle { reason }) => Input::Event(Box::new(Event::RecycleRequested { id, reason })),
                    Ok(ToPrimary::User(payload)) => Input::User { slot: id.slot, payload },
                    Ok(ToPrimary::Broadcast(payload)) => Input::Broadcast { slot: id.slot, payload },
                    Ok(ToPrimary::Metrics(text)) => Input::Metrics { id, text },
                    // The usual end of a worker: its exit follows as its own event.
                    Err(ChannelError::Closed) => return,
                    Err(error) => {
                        let reason = error.to_string();
                        let _ = inputs.send(Input::Event(Box::new(Event::ChannelBroken { id, reason }))).await;
                        return;
                    }
                };
                if inputs.send(input).await.is_err() {
                    return;
                }
            },
            outgoing = outbox.recv() => match outgoing {
                Some(message) => {
                    let size = message_size(&message);
                    let sent = sender.send(&message).await;
                    outbox_bytes.fetch_sub(size, Ordering::Relaxed);
                    if sent.is_err() {
                        // The worker is gone; its exit is reported separately.
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(signal) => format!("was killed by {signal}"),
                Err(_) => format!("was killed by signal {signal}"),
            },
            _ => "exited".to_owned(),
        },
        Err(err) => format!("could not be waited for ({err})"),
    }
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}
