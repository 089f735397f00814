//! What the supervisor knows: every slot, the workers in it, the reload in
//! progress. Plain data, no processes or sockets, so every rule can be tested
//! by feeding events to [`decide`](super::decide).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::metrics::WorkerStats;

/// A program generation: 1 is the primary's own program, each reload makes the next.
pub(crate) type Build = u64;

/// One worker process: its slot and the how-many-th start of that slot it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WorkerId {
    pub slot: usize,
    pub serial: u64,
}

/// How a worker is told to drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainBy {
    /// The `Drain` message over its channel.
    Message,
    /// `SIGTERM`, a program's conventional graceful stop.
    Signal,
}

/// What kind of program fills the slots: its readiness and drain rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A corral worker: says when it is ready, sends heartbeats, drains on a message.
    Corral,
    /// Any program under `corral run`: no channel, so it counts as ready once it
    /// has stayed up `ready_after`, and it drains on `SIGTERM`.
    External { ready_after: Duration },
}

impl Kind {
    pub fn sends_heartbeats(self) -> bool {
        matches!(self, Kind::Corral)
    }

    /// Whether it can be told that its node is draining (it has a channel);
    /// an external program only hears its own `SIGTERM`, after the delay.
    pub fn hears_node_drain(self) -> bool {
        matches!(self, Kind::Corral)
    }

    pub fn drain_by(self) -> DrainBy {
        match self {
            Kind::Corral => DrainBy::Message,
            Kind::External { .. } => DrainBy::Signal,
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Asked for; the executor is starting the process.
    Spawning,
    /// Running, not yet ready.
    Starting,
    /// Serving.
    Ready,
    /// Told to finish its work and exit by `deadline`.
    Draining { deadline: Instant },
    /// Sent `SIGKILL`; its exit is on the way.
    Killed,
}

#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub id: WorkerId,
    pub build: Build,
    pub pid: Option<u32>,
    pub phase: Phase,
    pub started: Instant,
    pub ready_since: Option<Instant>,
    pub last_heartbeat: Instant,
    pub stats: WorkerStats,
    /// Why the supervisor killed it, if it did.
    pub killed_because: Option<String>,
}

impl Worker {
    pub fn new(id: WorkerId, build: Build, now: Instant) -> Self {
        Worker {
            id,
            build,
            pid: None,
            phase: Phase::Spawning,
            started: now,
            ready_since: None,
            last_heartbeat: now,
            stats: WorkerStats::default(),
            killed_because: None,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn is_draining(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
    }

    /// The name the logs use for it.
    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("worker pid {pid}"),
            None => "a worker".to_owned(),
        }
    }
}

/// What the supervisor intends for a slot. The slot's visible state
/// ([`SlotState`]) follows from this and its workers; nothing is stored twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Keep a worker serving here.
    Run,
    /// Start the next worker at `until` (restart back-off or a spawn error).
    BackOff { until: Instant },
    /// Crash loop: leave the slot empty until `retry_at`.
    GivenUp { retry_at: Instant },
    /// Scaled down: its workers drain and the slot goes away.
    Retire,
}

/// A slot's state as status and routing see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    Empty,
    Starting,
    Serving,
    Replacing,
    BackingOff { until: Instant },
    GivenUp { retry_at: Instant },
    Retiring,
}

#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub index: usize,
    /// The generation this slot runs (a reload moves it, a rollback moves it back).
    pub build: Build,
    pub plan: Plan,
    pub current: Option<Worker>,
    /// Starting to take over from `current` (reload, recycle).
    pub incoming: Option<Worker>,
    /// Replaced and draining.
    pub retiring: Vec<Worker>,
    /// Exits of young workers in a row (the crash loop count).
    pub failures: u32,
    /// Spawn errors in a row (EMFILE, EAGAIN...): retried, never a crash.
    pub spawn_failures: u32,
    /// How often this slot was given up on (the retry back-off grows with it).
    pub give_ups: u32,
    /// Workers restarted here after an unexpected exit.
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub next_serial: u64,
}

impl Slot {
    pub fn new(index: usize, build: Build) -> Self {
        Slot {
            index,
            build,
            plan: Plan::Run,
            current: None,
            incoming: None,
            retiring: Vec::new(),
            failures: 0,
            spawn_failures: 0,
            give_ups: 0,
            restarts: 0,
            last_exit: None,
            next_serial: 0,
        }
    }

    pub fn state(&self) -> SlotState {
        match self.plan {
            Plan::Retire => SlotState::Retiring,
            Plan::GivenUp { retry_at } => SlotState::GivenUp { retry_at },
            Plan::BackOff { until } => SlotState::BackingOff { until },
            Plan::Run => match (&self.current, &self.incoming) {
                (Some(current), Some(_)) if current.is_ready() => SlotState::Replacing,
                (Some(current), None) if current.is_ready() => SlotState::Serving,
                (None, None) => SlotState::Empty,
                _ => SlotState::Starting,
            },
        }
    }

    pub fn is_serving(&self) -> bool {
        matches!(self.state(), SlotState::Serving | SlotState::Replacing)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.current
            .iter()
            .chain(self.incoming.iter())
            .chain(self.retiring.iter())
    }

    pub fn workers_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.current
            .iter_mut()
            .chain(self.incoming.iter_mut())
            .chain(self.retiring.iter_mut())
    }

    pub fn find_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.workers_mut().find(|worker| worker.id == id)
    }

    pub fn next_id(&mut self) -> WorkerId {
        let id = WorkerId {
            slot: self.index,
            serial: self.next_serial,
        };
        self.next_serial += 1;
        id
    }
}

/// Where a slot's new connections go, derived from the state for the
/// balancer and the kernel's steering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// To this ready worker.
    Serve(WorkerId),
    /// Its worker is being replaced at once: connections wait for the new one.
    Hold,
    /// Nobody will serve here soon: its share goes to the other slots.
    Away,
}

/// A reply the executor owes a caller (a control-socket command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ReplyId(pub u64);

/// How a reload ended, as `/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadOutcome {
    Completed,
    Failed,
    RolledBack,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Completed => "completed",
            ReloadOutcome::Failed => "failed",
            ReloadOutcome::RolledBack => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastReload {
    pub outcome: ReloadOutcome,
    pub generation: Build,
    pub reason: Option<String>,
}

/// A rolling reload (or its rollback): one slot at a time, each new worker
/// ready for the reload gate before the next slot moves.
#[derive(Debug, Clone)]
pub(crate) struct Reload {
    /// The generation the slots are moving to.
    pub target: Build,
    /// The generation that was asked for (differs from `target` in a rollback).
    pub attempted: Build,
    /// Set once the reload failed and the moved slots go back.
    pub rollback_reason: Option<String>,
    pub queue: VecDeque<usize>,
    /// The slot being moved now.
    pub step: Option<usize>,
    pub replies: Vec<ReplyId>,
}

/// After a reload completed: its workers must still outlive `--min-uptime`
/// before their generation counts as good.
#[derive(Debug, Clone)]
pub(crate) struct Probation {
    pub generation: Build,
    pub previous: Build,
    pub until: Instant,
    /// `corral reload` callers: answered once the generation has proven itself.
    pub replies: Vec<ReplyId>,
}

/// A `scale` waiting for the cluster to reach its size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScaleWait {
    pub target: usize,
    pub reply: ReplyId,
}

/// The supervisor's settings.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub kind: Kind,
    pub ready_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// A worker that exits sooner than this after becoming ready counts towards the crash loop.
    pub min_uptime: Duration,
    pub reload_gate: Duration,
    pub crash_loop_limit: u32,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// The first retry of a given-up slot; it doubles up to `retry_max`.
    pub retry_first: Duration,
    pub retry_max: Duration,
    pub max_memory: Option<u64>,
    /// On stop, how long the workers keep serving after being told their
    /// node is draining (`--drain-delay`), so load balancers stop sending
    /// before anyone stops accepting.
    pub drain_delay: Duration,
    /// The primary accepts and passes connections (round-robin, least-conn,
    /// sticky with PROXY): its accept queue is its own, not the workers'.
    pub primary_accepts: bool,
}

impl Rules {
    /// The delay before the `failures`-th consecutive restart: the first is
    /// immediate (a crash after a long healthy run should not cost
    /// availability), then it doubles up to the maximum.
    pub fn restart_delay(&self, failures: u32) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        doubled(self.restart_backoff, failures - 2).min(self.restart_backoff_max)
    }

    /// The delay before retrying a slot given up for the `give_ups`-th time.
    pub fn retry_delay(&self, give_ups: u32) -> Duration {
        doubled(self.retry_first, give_ups.saturating_sub(1)).min(self.retry_max)
    }

    /// The delay after the `failures`-th spawn error in a row.
    pub fn spawn_retry_delay(&self, failures: u32) -> Duration {
        doubled(self.restart_backoff, failures.saturating_sub(1)).min(self.restart_backoff_max)
    }
}

fn doubled(base: Duration, times: u32) -> Duration {
    base.saturating_mul(1u32 << times.min(16))
}

/// A stop announced to the workers and held back by `--drain-delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DrainNotice {
    /// When the workers are told to drain.
    pub stop_at: Instant,
    /// What asked for the stop (`SIGTERM`, `corral stop`), for the log.
    pub why: String,
}

/// Everything the supervisor decides from.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub rules: Rules,
    pub slots: Vec<Slot>,
    /// The last generation that passed its reload (the rollback target).
    pub good: Build,
    /// The highest generation handed out so far.
    pub latest: Build,
    /// A reload asked for whose program is being pinned.
    pub pinning: Option<(Build, Vec<ReplyId>)>,
    pub reload: Option<Reload>,
    pub probation: Option<Probation>,
    pub last_reload: Option<LastReload>,
    pub stopping: bool,
    /// Set during `--drain-delay`: the node announced its stop, the workers
    /// still serve. `stopping` follows once it is over.
    pub drain_notice: Option<DrainNotice>,
    /// The listening line was printed: from now on no worker failure ends the primary.
    pub announced: bool,
    pub scale_waits: Vec<ScaleWait>,
}

impl State {
    pub fn new(rules: Rules, slots: usize) -> Self {
        State {
            rules,
            slots: (0..slots.max(1)).map(|index| Slot::new(index, 1)).collect(),
            good: 1,
            latest: 1,
            pinning: None,
            reload: None,
            probation: None,
            last_reload: None,
            stopping: false,
            drain_notice: None,
            announced: false,
            scale_waits: Vec::new(),
        }
    }

    /// True from the moment a stop is asked for, drain delay included: no
    /// reload, scale or recycle starts any more.
    pub fn leaving(&self) -> bool {
        self.stopping || self.drain_notice.is_some()
    }

    /// The generation new slots and fresh starts run.
    pub fn serving_build(&self) -> Build {
        self.probation
            .as_ref()
            .map_or(self.good, |probation| probation.generation)
    }

    /// Slots that are not being scaled away.
    pub fn active_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.plan != Plan::Retire)
            .count()
    }

    pub fn serving_slots(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_serving()).count()
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.slots.get(id.slot)?.workers().find(|w| w.id == id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots.iter().flat_map(Slot::workers)
    }

    /// Where each slot's new connections go.
    pub fn routes(&self) -> Vec<Route> {
        self.slots
            .iter()
            .map(|slot| {
                if self.stopping {
                    return Route::Away;
                }
                match slot.plan {
                    Plan::Run => match &slot.current {
                        Some(current) if current.is_ready() => Route::Serve(current.id),
                        _ => Route::Hold,
                    },
                    _ => Route::Away,
                }
            })
            .collect()
    }

    /// The earliest moment a timer rule may fire; the executor sleeps until then.
    pub fn next_deadline(&self) -> Option<Instant> {
        let rules = &self.rules;
        let mut deadlines: Vec<Instant> = Vec::new();
        for slot in &self.slots {
            match slot.plan {
                Plan::BackOff { until } => deadlines.push(until),
                Plan::GivenUp { retry_at } => deadlines.push(retry_at),
                _ => {}
            }
            for worker in slot.workers() {
                match worker.phase {
                    Phase::Starting => {
                        deadlines.push(worker.started + rules.ready_timeout);
                        if let Kind::External { ready_after } = rules.kind {
                            deadlines.push(worker.started + ready_after);
                        }
                    }
                    Phase::Ready if rules.kind.sends_heartbeats() => {
                        deadlines.push(worker.last_heartbeat + rules.heartbeat_timeout);
                    }
                    Phase::Draining { deadline } => deadlines.push(deadline),
                    _ => {}
                }
            }
        }
        if let Some(step) = self.reload.as_ref().and_then(|reload| reload.step) {
            if let Some(since) = self.slots[step]
                .current
                .as_ref()
                .and_then(|worker| worker.ready_since)
            {
                deadlines.push(since + rules.reload_gate);
            }
        }
        if let Some(probation) = &self.probation {
            deadlines.push(probation.until);
        }
        if let Some(notice) = &self.drain_notice {
            deadlines.push(notice.stop_at);
        }
        deadlines.into_iter().min()
    }
}
