//! A slot: one place in the cluster, filled by one worker process at a time
//! (plus, briefly, its replacement and the predecessors still draining).

use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::ipc::ToWorker;
use crate::metrics::WorkerStats;
use crate::net::fd_passing::PassedConnection;

/// What the primary knows about one worker process.
#[derive(Debug)]
pub(crate) struct WorkerProcess {
    pub generation: u64,
    pub pid: u32,
    pub started: Instant,
    pub ready_since: Option<Instant>,
    pub last_heartbeat: Instant,
    pub drain_deadline: Option<Instant>,
    pub killed: bool,
    pub stats: WorkerStats,
    outbox: mpsc::UnboundedSender<ToWorker>,
    /// Where the balancer sends this worker's connections (accept-and-pass modes).
    pub connections: Option<mpsc::UnboundedSender<PassedConnection>>,
    /// A program that is not a corral worker: no IPC, drained with SIGTERM.
    pub external: bool,
}

impl WorkerProcess {
    pub fn new(
        generation: u64,
        pid: u32,
        outbox: mpsc::UnboundedSender<ToWorker>,
        connections: Option<mpsc::UnboundedSender<PassedConnection>>,
    ) -> Self {
        let now = Instant::now();
        WorkerProcess {
            generation,
            pid,
            started: now,
            ready_since: None,
            last_heartbeat: now,
            drain_deadline: None,
            killed: false,
            stats: WorkerStats::default(),
            outbox,
            connections,
            external: false,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready_since.is_some()
    }

    pub fn is_draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    /// Asks the worker to drain, and gives it until `deadline` to exit.
    pub fn drain(&mut self, deadline: Instant) {
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(deadline);
            // Closing our side of the connection queue lets the worker know
            // when the last connection passed to it has arrived.
            self.connections = None;
            if self.external {
                // A program's own graceful stop, by convention.
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            } else {
                // A worker whose channel is gone is either exiting or will be
                // killed at the deadline; nothing more to do here.
                let _ = self.outbox.send(ToWorker::Drain);
            }
        }
    }

    /// Sends a message; a worker whose channel is gone is exiting anyway.
    pub fn send(&self, message: ToWorker) {
        let _ = self.outbox.send(message);
    }

    /// Kills the process outright; its exit arrives as an event.
    pub fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            // The pid cannot have been reused: the process is only reaped by
            // the task that reports its exit, after which it leaves the slot.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

/// Which position a worker holds in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Serving (or starting to serve) the slot.
    Current,
    /// Starting up to take over from the current worker.
    Replacement,
    /// Replaced and draining.
    Retiring,
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub index: usize,
    pub next_generation: u64,
    pub current: Option<WorkerProcess>,
    pub replacement: Option<WorkerProcess>,
    pub retiring: Vec<WorkerProcess>,
    /// Failed starts or crashes in a row, reset by a stable run.
    pub failures: u32,
    pub restart_at: Option<Instant>,
    pub gave_up: bool,
}

impl Slot {
    pub fn new(index: usize) -> Self {
        Slot {
            index,
            next_generation: 0,
            current: None,
            replacement: None,
            retiring: Vec::new(),
            failures: 0,
            restart_at: None,
            gave_up: false,
        }
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerProcess> {
        self.current
            .iter()
            .chain(self.replacement.iter())
            .chain(self.retiring.iter())
    }

    pub fn workers_mut(&mut self) -> impl Iterator<Item = &mut WorkerProcess> {
        self.current
            .iter_mut()
            .chain(self.replacement.iter_mut())
            .chain(self.retiring.iter_mut())
    }

    pub fn find_mut(&mut self, generation: u64) -> Option<(Position, &mut WorkerProcess)> {
        if let Some(worker) = self.current.as_mut().filter(|w| w.generation == generation) {
            return Some((Position::Current, worker));
        }
        if let Some(worker) = self
            .replacement
            .as_mut()
            .filter(|w| w.generation == generation)
        {
            return Some((Position::Replacement, worker));
        }
        self.retiring
            .iter_mut()
            .find(|w| w.generation == generation)
            .map(|worker| (Position::Retiring, worker))
    }

    /// Removes a worker that has exited.
    pub fn remove(&mut self, generation: u64) -> Option<(Position, WorkerProcess)> {
        if self
            .current
            .as_ref()
            .is_some_and(|w| w.generation == generation)
        {
            return self.current.take().map(|w| (Position::Current, w));
        }
        if self
            .replacement
            .as_ref()
            .is_some_and(|w| w.generation == generation)
        {
            return self.replacement.take().map(|w| (Position::Replacement, w));
        }
        let index = self
            .retiring
            .iter()
            .position(|w| w.generation == generation)?;
        Some((Position::Retiring, self.retiring.swap_remove(index)))
    }

    /// True when the slot serves traffic through a ready worker.
    pub fn is_serving(&self) -> bool {
        self.current.as_ref().is_some_and(WorkerProcess::is_ready)
    }
}
