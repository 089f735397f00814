//! The primary: one loop over events (a worker exited, a message arrived, a
//! signal, a timer tick) and one place, [`Supervisor::handle`], that decides
//! what to do about each — the shape of nginx's master cycle.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::admin::{self, SharedStatus};
use super::balancer::Balancer;
use super::config::Config;
use super::messages::Message;
use super::slot::{Position, Slot, WorkerProcess};
use super::spawn::{spawn_program, spawn_worker};
use crate::error::{Error, Result};
use crate::ipc::{self, ChannelError, ToPrimary, ToWorker};
use crate::metrics::status::{ClusterStatus, SlotStatus, WorkerStatus};
use crate::net::bind::{bind_all, bind_error, resolve, BoundAddress};
use crate::net::fd_passing::ConnectionSender;

use super::acceptor::{accept_and_pass, dispatch};

/// How often timers (ready, heartbeat and drain deadlines, restarts) are checked.
const TICK: Duration = Duration::from_millis(50);

/// Runs the primary role until a graceful stop or a fatal error.
pub(crate) fn run(config: Config) -> Result<()> {
    if config.logging {
        crate::logging::init(format!("[primary pid {}]", std::process::id()));
    }
    if config.external.is_some() && config.balance.passes_connections() {
        return Err(Error::Config(format!(
            "--balance {} needs corral workers, which take connections from the primary; a program run by `corral run` accepts from its own sockets, so use --balance reuseport or shared",
            config.balance
        )));
    }
    let slots = config.workers.count();
    let bound = bind_all(&config.listen, slots, config.balance)?;
    let admin = match &config.admin {
        Some(text) => {
            let addr = resolve(text)?;
            let listener =
                std::net::TcpListener::bind(addr).map_err(|err| bind_error(addr, err))?;
            listener.set_nonblocking(true)?;
            Some(listener)
        }
        None => None,
    };
    let (program, args) = match &config.external {
        Some(external) => (PathBuf::from(&external.program), external.args.clone()),
        None => (
            std::env::current_exe()?,
            std::env::args_os().skip(1).collect(),
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(Supervisor::new(config, bound, program, args, slots).run(admin))
}

/// Something the supervisor must react to.
#[derive(Debug)]
enum Event {
    Exited {
        slot: usize,
        generation: u64,
        status: std::io::Result<ExitStatus>,
    },
    Message {
        slot: usize,
        generation: u64,
        message: ToPrimary,
    },
    ChannelClosed {
        slot: usize,
        generation: u64,
        error: ChannelError,
    },
    Stop(&'static str),
    Reload,
    Tick,
}

/// A rolling reload in progress: the slots still to replace, one at a time.
#[derive(Debug)]
struct Reload {
    waiting_on: Option<usize>,
    queue: VecDeque<usize>,
}

struct Supervisor {
    config: Config,
    bound: Vec<BoundAddress>,
    program: PathBuf,
    args: Vec<OsString>,
    slots: Vec<Slot>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    reload: Option<Reload>,
    stopping: bool,
    announced: bool,
    /// Present in the accept-and-pass modes.
    balancer: Option<Arc<Mutex<Balancer>>>,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
    /// What the admin pages show, refreshed after every event.
    status: SharedStatus,
}

/// What the loop does after an event.
enum Flow {
    Continue,
    Exit(Result<()>),
}

impl Supervisor {
    fn new(
        config: Config,
        bound: Vec<BoundAddress>,
        program: PathBuf,
        args: Vec<OsString>,
        slots: usize,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let balancer = config
            .balance
            .passes_connections()
            .then(|| Arc::new(Mutex::new(Balancer::new(config.balance, slots))));
        Supervisor {
            config,
            bound,
            program,
            args,
            slots: (0..slots).map(Slot::new).collect(),
            events_tx,
            events,
            reload: None,
            stopping: false,
            announced: false,
            balancer,
            acceptors: Vec::new(),
            status: SharedStatus::default(),
        }
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
            socket.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(socket)?;
            self.acceptors.push(tokio::spawn(accept_and_pass(
                index as u16,
                listener,
                balancer.clone(),
                self.config.proxy_protocol,
            )));
        }
        Ok(())
    }

    /// Runs `action` on the balancer, in the accept-and-pass modes.
    fn with_balancer<R>(&self, action: impl FnOnce(&mut Balancer) -> R) -> Option<R> {
        self.balancer
            .as_deref()
            .map(|balancer| action(&mut Balancer::lock(balancer)))
    }

    async fn run(mut self, admin: Option<std::net::TcpListener>) -> Result<()> {
        if let Some(listener) = admin {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(
                "admin: http://{}/ (dashboard), /status, /metrics",
                listener.local_addr()?
            );
            tokio::spawn(admin::serve(listener, self.status.clone()));
        }
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        tracing::info!(
            "starting {} workers from {}",
            self.slots.len(),
            self.program.display()
        );
        self.start_acceptors()?;
        for index in 0..self.slots.len() {
            if let Flow::Exit(result) = self.fill_slot(index) {
                return result;
            }
        }
        loop {
            let event = tokio::select! {
                Some(event) = self.events.recv() => event,
                _ = term.recv() => Event::Stop("SIGTERM"),
                _ = int.recv() => Event::Stop("SIGINT"),
                _ = hup.recv() => Event::Reload,
                _ = tick.tick() => Event::Tick,
            };
            if let Flow::Exit(result) = self.handle(event) {
                return result;
            }
            self.publish_status();
        }
    }

    fn resolve_program(&self) -> std::io::Result<PathBuf> {
        if self.config.external.is_some() {
            return Ok(self.program.clone());
        }
        std::fs::canonicalize(&self.program)
    }

    /// Refreshes the snapshot the admin pages read.
    fn publish_status(&self) {
        if self.config.admin.is_none() {
            return;
        }
        let now = Instant::now();
        let snapshot = ClusterStatus {
            pid: std::process::id(),
            balance: self.config.balance.to_string(),
            listen: self.bound.iter().map(|a| a.local.to_string()).collect(),
            reloading: self.reload.is_some(),
            stopping: self.stopping,
            slots: self
                .slots
                .iter()
                .map(|slot| SlotStatus {
                    slot: slot.index,
                    starts: slot.next_generation,
                    failures: slot.failures,
                    gave_up: slot.gave_up,
                    worker: slot.current.as_ref().map(|worker| WorkerStatus {
                        pid: worker.pid,
                        generation: worker.generation,
                        state: if worker.is_ready() {
                            "ready"
                        } else {
                            "starting"
                        },
                        uptime_seconds: now.duration_since(worker.started).as_secs_f64(),
                        stats: worker.stats.clone(),
                    }),
                    draining: slot.retiring.iter().map(|worker| worker.pid).collect(),
                })
                .collect(),
        };
        *self
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
    }

    /// The one place that decides.
    fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Exited {
                slot,
                generation,
                status,
            } => self.on_exit(slot, generation, status),
            Event::Message {
                slot,
                generation,
                message,
            } => self.on_message(slot, generation, message),
            Event::ChannelClosed {
                slot,
                generation,
                error,
            } => {
                self.on_channel_closed(slot, generation, error);
                Flow::Continue
            }
            Event::Stop(signal) => self.on_stop(signal),
            Event::Reload => self.on_reload(),
            Event::Tick => self.on_tick(),
        }
    }

    fn on_exit(
        &mut self,
        index: usize,
        generation: u64,
        status: std::io::Result<ExitStatus>,
    ) -> Flow {
        let stable_after = self.config.stable_after;
        let slot = &mut self.slots[index];
        let Some((position, worker)) = slot.remove(generation) else {
            return Flow::Continue;
        };
        let how = describe_exit(&status);
        self.with_balancer(|b| b.worker_gone(index, generation));
        let slot = &mut self.slots[index];
        let flow = match position {
            Position::Retiring => {
                tracing::debug!("slot {index}: drained worker pid {} {how}", worker.pid);
                Flow::Continue
            }
            Position::Replacement => {
                tracing::error!(
                    "slot {index}: new worker pid {} {how} before it was ready; the old worker keeps serving",
                    worker.pid
                );
                if slot.current.is_none() {
                    self.on_failure(index, format!("worker pid {} {how}", worker.pid))
                } else {
                    self.fail_reload(index);
                    Flow::Continue
                }
            }
            Position::Current if self.stopping || worker.is_draining() => {
                tracing::debug!("slot {index}: worker pid {} {how}", worker.pid);
                Flow::Continue
            }
            Position::Current => {
                if worker
                    .ready_since
                    .is_some_and(|since| since.elapsed() >= stable_after)
                {
                    slot.failures = 0;
                }
                let what = if worker.is_ready() {
                    format!("worker pid {} {how}", worker.pid)
                } else {
                    format!("worker pid {} {how} before it was ready", worker.pid)
                };
                if slot.replacement.is_some() {
                    // A replacement is already starting; it takes over when ready.
                    tracing::warn!("slot {index}: {what}; its replacement is starting");
                    Flow::Continue
                } else {
                    self.on_failure(index, what)
                }
            }
        };
        if let Flow::Exit(_) = flow {
            return flow;
        }
        if self.stopping
            && self
                .slots
                .iter()
                .all(|slot| slot.workers().next().is_none())
        {
            tracing::info!("all workers stopped");
            return Flow::Exit(Ok(()));
        }
        Flow::Continue
    }

    fn on_message(&mut self, index: usize, generation: u64, message: ToPrimary) -> Flow {
        let max_memory = self.config.max_memory;
        let Some((position, worker)) = self.slots[index].find_mut(generation) else {
            return Flow::Continue;
        };
        match message {
            ToPrimary::Ready => {
                let now = Instant::now();
                worker.ready_since = Some(now);
                worker.last_heartbeat = now;
                tracing::info!("slot {index}: worker pid {} is ready", worker.pid);
                match position {
                    Position::Replacement => self.promote_replacement(index),
                    Position::Current => {
                        let connections = worker.connections.clone();
                        if let Some(connections) = connections {
                            self.with_balancer(|b| b.worker_ready(index, generation, connections));
                        }
                    }
                    Position::Retiring => {}
                }
                self.announce_when_serving();
            }
            ToPrimary::Heartbeat(stats) => {
                worker.last_heartbeat = Instant::now();
                let over_memory = max_memory.filter(|&limit| stats.rss_bytes > limit);
                let open = stats.connections_open;
                worker.stats = stats;
                let rss = worker.stats.rss_bytes;
                self.with_balancer(|b| b.report(index, generation, open));
                if let (Position::Current, Some(limit)) = (position, over_memory) {
                    let reason = format!(
                        "resident memory {} MiB is over the limit of {} MiB",
                        rss >> 20,
                        limit >> 20
                    );
                    self.recycle(index, &reason);
                }
            }
            ToPrimary::Recycle { reason } => {
                if position == Position::Current {
                    self.recycle(index, &reason);
                }
            }
            ToPrimary::User(payload) => match &self.config.on_message {
                Some(hook) => {
                    let mut handler = hook
                        .0
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    handler(index, Message::new(payload));
                }
                None => tracing::debug!("slot {index}: message dropped: no on_message handler"),
            },
            ToPrimary::Broadcast(payload) => {
                for worker in self.slots.iter().flat_map(Slot::workers) {
                    worker.send(ToWorker::Broadcast {
                        from_slot: index as u32,
                        payload: payload.clone(),
                    });
                }
            }
        }
        Flow::Continue
    }

    fn on_channel_closed(&mut self, index: usize, generation: u64, error: ChannelError) {
        let stopping = self.stopping;
        let Some((_, worker)) = self.slots[index].find_mut(generation) else {
            return;
        };
        match error {
            // The usual end of a worker: its exit follows as its own event.
            ChannelError::Closed => {}
            error if !stopping && !worker.is_draining() => {
                tracing::warn!(
                    "slot {index}: worker pid {} broke its IPC channel ({error}); killing and replacing it",
                    worker.pid
                );
                worker.kill();
                self.with_balancer(|b| b.worker_gone(index, generation));
            }
            error => tracing::debug!("slot {index}: channel error while draining: {error}"),
        }
    }

    fn on_stop(&mut self, signal: &'static str) -> Flow {
        if self.stopping {
            if signal == "SIGINT" {
                tracing::warn!("second SIGINT: killing every worker now");
                self.slots
                    .iter_mut()
                    .flat_map(Slot::workers_mut)
                    .for_each(WorkerProcess::kill);
            }
            return Flow::Continue;
        }
        self.stopping = true;
        self.reload = None;
        for acceptor in self.acceptors.drain(..) {
            acceptor.abort();
        }
        self.with_balancer(Balancer::clear);
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let mut draining = 0;
        for slot in &mut self.slots {
            slot.restart_at = None;
            for worker in slot.workers_mut() {
                worker.drain(deadline);
                draining += 1;
            }
        }
        tracing::info!(
            "{signal}: stopping; draining {draining} workers (killed after {})",
            humantime::format_duration(self.config.shutdown_timeout)
        );
        if draining == 0 {
            return Flow::Exit(Ok(()));
        }
        Flow::Continue
    }

    fn on_reload(&mut self) -> Flow {
        if self.stopping {
            return Flow::Continue;
        }
        if self.reload.is_some() {
            tracing::warn!("SIGHUP: a reload is already in progress; ignored");
            return Flow::Continue;
        }
        // Take whatever binary is at the path now, so a rebuilt program is
        // what the new workers run (an external program is looked up again
        // on every start anyway).
        match self.resolve_program() {
            Ok(path) => self.program = path,
            Err(err) => {
                tracing::error!(
                    "SIGHUP: cannot reload: {} is not readable ({err}); workers keep running",
                    self.program.display()
                );
                return Flow::Continue;
            }
        }
        tracing::info!(
            "SIGHUP: rolling reload of {} slots from {}",
            self.slots.len(),
            self.program.display()
        );
        self.reload = Some(Reload {
            waiting_on: None,
            queue: (0..self.slots.len()).collect(),
        });
        self.advance_reload()
    }

    fn on_tick(&mut self) -> Flow {
        let now = Instant::now();
        let ready_timeout = self.config.ready_timeout;
        let heartbeat_timeout = self.config.heartbeat_timeout;
        let stopping = self.stopping;
        let mut due = Vec::new();
        let mut unresponsive = Vec::new();
        let mut settled = Vec::new();
        let ready_after = self.config.ready_after;
        for slot in &mut self.slots {
            let index = slot.index;
            for worker in slot.workers_mut().filter(|worker| !worker.killed) {
                if let Some(deadline) = worker.drain_deadline {
                    if now >= deadline {
                        tracing::warn!(
                            "slot {index}: worker pid {} still draining at its deadline; killing it",
                            worker.pid
                        );
                        worker.kill();
                    }
                } else if !worker.is_ready() {
                    if worker.external && now.duration_since(worker.started) >= ready_after {
                        // It has stayed up: as ready as a program without a
                        // handshake can say.
                        settled.push((index, worker.generation));
                    } else if now.duration_since(worker.started) >= ready_timeout {
                        tracing::error!(
                            "slot {index}: worker pid {} did not become ready within {}; killing it",
                            worker.pid,
                            humantime::format_duration(ready_timeout)
                        );
                        worker.kill();
                    }
                } else if !stopping
                    && !worker.external
                    && now.duration_since(worker.last_heartbeat) >= heartbeat_timeout
                {
                    tracing::error!(
                        "slot {index}: worker pid {} sent no heartbeat for {} (event loop blocked?); killing and replacing it",
                        worker.pid,
                        humantime::format_duration(heartbeat_timeout)
                    );
                    worker.kill();
                    unresponsive.push((index, worker.generation));
                }
            }
            if slot.restart_at.is_some_and(|at| now >= at) {
                slot.restart_at = None;
                due.push(index);
            }
        }
        let closed = self
            .with_balancer(|balancer| {
                for (index, generation) in unresponsive {
                    balancer.worker_gone(index, generation);
                }
                balancer.expire(now, ready_timeout)
            })
            .unwrap_or(0);
        if closed > 0 {
            tracing::warn!(
                "closed {closed} connections that waited {} for a worker",
                humantime::format_duration(ready_timeout)
            );
        }
        for (index, generation) in settled {
            if let Flow::Exit(result) = self.on_message(index, generation, ToPrimary::Ready) {
                return Flow::Exit(result);
            }
        }
        for index in due {
            if let Flow::Exit(result) = self.fill_slot(index) {
                return Flow::Exit(result);
            }
        }
        Flow::Continue
    }

    /// Counts a failed start or crash of a slot's worker and restarts it after
    /// the back-off, or gives up on a slot that keeps failing.
    fn on_failure(&mut self, index: usize, what: String) -> Flow {
        let limit = self.config.crash_loop_limit;
        let slot = &mut self.slots[index];
        slot.failures += 1;
        if slot.failures >= limit {
            slot.gave_up = true;
            tracing::error!(
                "slot {index}: {what}; {} failures in a row, not restarting this slot (crash loop). Fix the cause and send SIGHUP to try again",
                slot.failures
            );
            self.fail_reload(index);
            // Stop new connections from queueing for a slot nobody serves.
            for address in &mut self.bound {
                address.close_slot(index);
            }
            self.with_balancer(|b| b.slot_given_up(index));
            if self.slots.iter().all(|slot| slot.gave_up) {
                self.slots
                    .iter_mut()
                    .flat_map(Slot::workers_mut)
                    .for_each(WorkerProcess::kill);
                return Flow::Exit(Err(Error::CrashLoop { detail: what }));
            }
            // The remaining slots may be all that was awaited.
            self.announce_when_serving();
            return Flow::Continue;
        }
        let delay = self.config.restart_delay(slot.failures);
        if delay.is_zero() {
            tracing::warn!("slot {index}: {what}; restarting it");
            self.fill_slot(index)
        } else {
            tracing::warn!(
                "slot {index}: {what}; restarting it in {} (failure {} of {limit})",
                humantime::format_duration(delay),
                slot.failures
            );
            slot.restart_at = Some(Instant::now() + delay);
            Flow::Continue
        }
    }

    /// Starts a worker as the slot's current one.
    fn fill_slot(&mut self, index: usize) -> Flow {
        match self.spawn(index) {
            Ok(worker) => {
                self.slots[index].current = Some(worker);
                Flow::Continue
            }
            Err(err) => self.on_failure(index, err.to_string()),
        }
    }

    /// Starts a worker that takes over the slot once it is ready.
    fn start_replacement(&mut self, index: usize) {
        if self.slots[index].replacement.is_some() {
            return;
        }
        match self.spawn(index) {
            Ok(worker) => self.slots[index].replacement = Some(worker),
            Err(err) => {
                tracing::error!("slot {index}: {err}; the old worker keeps serving");
                self.fail_reload(index);
            }
        }
    }

    /// The replacement is ready: it becomes current and its predecessor drains.
    fn promote_replacement(&mut self, index: usize) {
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let slot = &mut self.slots[index];
        let Some(new) = slot.replacement.take() else {
            return;
        };
        if let Some(mut old) = slot.current.replace(new) {
            tracing::info!(
                "slot {index}: worker pid {} takes over; draining pid {}",
                slot.current.as_ref().map_or(0, |w| w.pid),
                old.pid
            );
            old.drain(deadline);
            slot.retiring.push(old);
        }
        if self.stopping {
            if let Some(current) = slot.current.as_mut() {
                current.drain(deadline);
            }
        } else if let Some(current) = &slot.current {
            if let Some(connections) = current.connections.clone() {
                let generation = current.generation;
                self.with_balancer(|b| b.worker_ready(index, generation, connections));
            }
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|reload| reload.waiting_on == Some(index))
        {
            let _ = self.advance_reload();
        }
    }

    fn recycle(&mut self, index: usize, reason: &str) {
        let slot = &self.slots[index];
        if self.stopping || slot.replacement.is_some() {
            return;
        }
        if let Some(current) = &slot.current {
            tracing::info!(
                "slot {index}: replacing worker pid {}: {reason}",
                current.pid
            );
        }
        self.start_replacement(index);
    }

    /// Moves a rolling reload on to its next slot.
    fn advance_reload(&mut self) -> Flow {
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return Flow::Continue;
            };
            let Some(index) = reload.queue.pop_front() else {
                tracing::info!("reload complete: every slot runs a new worker");
                self.reload = None;
                return Flow::Continue;
            };
            reload.waiting_on = Some(index);
            let slot = &mut self.slots[index];
            if slot.gave_up || slot.current.is_none() {
                // Nothing to hand over from: a reload is also the way to retry
                // a slot that was given up on.
                slot.gave_up = false;
                slot.failures = 0;
                slot.restart_at = None;
                self.with_balancer(|b| b.slot_back(index));
                let slot = &mut self.slots[index];
                if slot.current.is_none() && slot.replacement.is_none() {
                    if let Flow::Exit(result) = self.fill_slot(index) {
                        return Flow::Exit(result);
                    }
                }
                continue;
            }
            self.start_replacement(index);
            return Flow::Continue;
        }
    }

    fn fail_reload(&mut self, index: usize) {
        if self
            .reload
            .as_ref()
            .is_some_and(|reload| reload.waiting_on == Some(index))
        {
            tracing::error!(
                "reload failed at slot {index}; slots not yet reloaded keep their old workers"
            );
            self.reload = None;
        }
    }

    fn announce_when_serving(&mut self) {
        if self.announced
            || !self
                .slots
                .iter()
                .all(|slot| slot.gave_up || slot.is_serving())
            || !self.slots.iter().any(Slot::is_serving)
        {
            return;
        }
        self.announced = true;
        let mut stdout = std::io::stdout().lock();
        for address in &self.bound {
            let _ = writeln!(
                stdout,
                "corral: listening on http://{} ({} workers, balance={})",
                address.local,
                self.slots.len(),
                self.config.balance
            );
        }
        let _ = stdout.flush();
    }

    fn spawn(&mut self, index: usize) -> Result<WorkerProcess> {
        let slot = &mut self.slots[index];
        let generation = slot.next_generation;
        slot.next_generation += 1;
        // In the accept-and-pass modes only the primary accepts.
        let listeners: Vec<_> = if self.balancer.is_some() {
            Vec::new()
        } else {
            for address in &mut self.bound {
                address.reopen_slot(index)?;
            }
            self.bound
                .iter()
                .filter_map(|address| address.socket_for_slot(index))
                .map(AsRawFd::as_raw_fd)
                .collect()
        };
        let spawned = if self.config.external.is_some() {
            spawn_program(&self.program, &self.args, index, &listeners)
        } else {
            spawn_worker(&self.program, &self.args, index, generation, &listeners)
        }
        .map_err(|source| Error::Spawn {
            exe: self.program.display().to_string(),
            source,
        })?;
        tracing::info!(
            "slot {index}: started worker pid {} (generation {generation})",
            spawned.pid
        );
        let (outbox_tx, outbox) = mpsc::unbounded_channel();
        let events = self.events_tx.clone();
        let mut child = spawned.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::Exited {
                slot: index,
                generation,
                status,
            });
        });
        let external = spawned.ipc.is_none();
        if let Some(ipc) = spawned.ipc {
            tokio::spawn(relay(
                index,
                generation,
                ipc,
                outbox,
                self.events_tx.clone(),
            ));
        }
        let connections = match (&self.balancer, spawned.connections) {
            (Some(balancer), Some(connections)) => {
                let sender = ConnectionSender::new(connections)?;
                let (connections_tx, connections) = mpsc::unbounded_channel();
                tokio::spawn(dispatch(
                    index,
                    generation,
                    sender,
                    connections,
                    balancer.clone(),
                ));
                Some(connections_tx)
            }
            // The worker sees its end close and accepts from its own sockets.
            _ => None,
        };
        let mut worker = WorkerProcess::new(generation, spawned.pid, outbox_tx, connections);
        worker.external = external;
        Ok(worker)
    }
}

/// Carries one worker's messages in both directions until its channel ends.
async fn relay(
    slot: usize,
    generation: u64,
    stream: tokio::net::UnixStream,
    mut outbox: mpsc::UnboundedReceiver<ToWorker>,
    events: mpsc::UnboundedSender<Event>,
) {
    let (mut sender, mut receiver) = ipc::channel(stream);
    loop {
        tokio::select! {
            received = receiver.recv::<ToPrimary>() => match received {
                Ok(message) => {
                    let _ = events.send(Event::Message { slot, generation, message });
                }
                Err(error) => {
                    let _ = events.send(Event::ChannelClosed { slot, generation, error });
                    return;
                }
            },
            outgoing = outbox.recv() => match outgoing {
                Some(message) => {
                    if sender.send(&message).await.is_err() {
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
