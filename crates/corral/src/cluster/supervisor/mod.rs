//! The supervisor: a pure state machine, nginx's "one place decides" in Rust
//! form. [`decide`] takes the state, one event and the time, changes the
//! state and returns the actions to perform; the executor
//! (`cluster/primary.rs`) performs them and turns what happens in the world
//! (exits, messages, signals, timers) back into events.
//!
//! Nothing here starts a process, touches a socket or reads the clock, so
//! every rule is tested by feeding events (see `tests.rs`).

mod lifecycle;
mod reload;
mod scale;
mod state;
#[cfg(test)]
mod tests;

pub(crate) use state::{
    Build, DrainBy, Kind, Phase, Plan, ReplyId, Route, Rules, SlotState, State, WorkerId,
};

use std::time::Instant;

use crate::metrics::WorkerStats;

/// Something the supervisor reacts to.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// The primary has bound its sockets: fill every slot.
    Start,
    /// The executor started the process for `Action::Spawn`.
    Spawned {
        id: WorkerId,
        pid: u32,
    },
    /// The executor could not start it.
    SpawnFailed {
        id: WorkerId,
        error: SpawnError,
    },
    /// A corral worker reported ready.
    Ready {
        id: WorkerId,
    },
    Heartbeat {
        id: WorkerId,
        stats: WorkerStats,
    },
    /// The worker asks to be replaced (its request limit).
    RecycleRequested {
        id: WorkerId,
        reason: String,
    },
    /// Its channel broke with garbage or an error (not a plain close).
    ChannelBroken {
        id: WorkerId,
        reason: String,
    },
    /// The process is gone; `how` reads like "exited with status 1".
    Exited {
        id: WorkerId,
        how: String,
    },
    /// `SIGTERM`, `SIGINT`, `corral stop`.
    Stop {
        why: String,
        reply: Option<ReplyId>,
    },
    /// `SIGHUP`, `corral reload`.
    Reload {
        reply: Option<ReplyId>,
    },
    /// The executor pinned the program for `Action::PinBuild`.
    BuildPinned {
        generation: Build,
    },
    BuildUnavailable {
        generation: Build,
        error: String,
    },
    /// `SIGTTIN`/`SIGTTOU`, `corral scale`.
    Scale {
        target: ScaleTarget,
        reply: Option<ReplyId>,
    },
    /// Time passed: deadlines may be due.
    Timer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // `To` comes with `corral scale N`
pub(crate) enum ScaleTarget {
    To(usize),
    By(i64),
}

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpawnError {
    pub message: String,
    /// Out of descriptors, memory or processes: the system's trouble, not the
    /// program's, so it is retried and never counted as a crash.
    pub transient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Something the executor must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Start a worker of generation `build` in `id.slot`; answer with
    /// `Spawned` or `SpawnFailed`.
    Spawn {
        id: WorkerId,
        build: Build,
    },
    /// The node is stopping and the primary's sockets are not the workers'
    /// to close: make them refuse new connections now. Once no one accepts,
    /// a connection left in a queue is reset after its client has sent a
    /// request; a refused one is safe to retry on another node.
    StopListening,
    /// Ask the worker to finish its work and exit. `backlog`: its slot (or
    /// the whole node) is going away, so it must first accept what is
    /// queued on its socket; at a node stop it then shuts the socket.
    Drain {
        id: WorkerId,
        by: DrainBy,
        backlog: bool,
    },
    Kill {
        id: WorkerId,
    },
    /// Tell the worker its node is draining: its readiness should fail from
    /// now on, while it keeps accepting and serving until its `Drain`.
    NotifyDraining {
        id: WorkerId,
    },
    /// Open the program file now and keep it, for generation `generation`;
    /// answer with `BuildPinned` or `BuildUnavailable`.
    PinBuild {
        generation: Build,
    },
    /// No worker will run this generation again: close its descriptor.
    ForgetBuild {
        generation: Build,
    },
    /// Print the listening line(s).
    Announce,
    Reply {
        to: ReplyId,
        result: Result<String, String>,
    },
    Log {
        level: Level,
        message: String,
    },
    /// End the primary.
    Exit(Result<(), String>),
}

/// The one place that decides: applies `event` at `now` and returns what to do.
pub(crate) fn decide(state: &mut State, event: Event, now: Instant) -> Vec<Action> {
    let mut decision = Decision {
        state,
        now,
        actions: Vec::new(),
    };
    decision.handle(event);
    decision.settle();
    decision.actions
}

/// One call of [`decide`]: the state, the time, and the actions so far.
struct Decision<'a> {
    state: &'a mut State,
    now: Instant,
    actions: Vec<Action>,
}

impl Decision<'_> {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Start => self.start(),
            Event::Spawned { id, pid } => self.spawned(id, pid),
            Event::SpawnFailed { id, error } => self.spawn_failed(id, error),
            Event::Ready { id } => self.ready(id),
            Event::Heartbeat { id, stats } => self.heartbeat(id, stats),
            Event::RecycleRequested { id, reason } => self.recycle(id, &reason),
            Event::ChannelBroken { id, reason } => self.channel_broken(id, &reason),
            Event::Exited { id, how } => self.exited(id, &how),
            Event::Stop { why, reply } => self.stop(&why, reply),
            Event::Reload { reply } => self.reload_requested(reply),
            Event::BuildPinned { generation } => self.build_pinned(generation),
            Event::BuildUnavailable { generation, error } => {
                self.build_unavailable(generation, &error)
            }
            Event::Scale { target, reply } => self.scale(target, reply),
            Event::Timer => self.timers(),
        }
    }

    /// The rules that follow from any change: reload progress, the listening
    /// line, scale replies, the end of a stop.
    fn settle(&mut self) {
        if !self.state.stopping {
            self.advance_reload();
            self.end_probation();
            self.announce_when_serving();
            self.remove_retired_slots();
            self.answer_scale_waits();
        }
        if self.state.stopping && self.state.workers().next().is_none() {
            self.log(Level::Info, "all workers stopped".to_owned());
            self.actions.push(Action::Exit(Ok(())));
        }
    }

    fn log(&mut self, level: Level, message: String) {
        self.actions.push(Action::Log { level, message });
    }

    fn reply(&mut self, to: Option<ReplyId>, result: Result<String, String>) {
        if let Some(to) = to {
            self.actions.push(Action::Reply { to, result });
        }
    }
}
