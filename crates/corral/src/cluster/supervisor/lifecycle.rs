//! A worker's life: start, ready, heartbeats, exit and restart, the crash
//! loop, spawn errors, deadlines and the graceful stop.

use std::time::Duration;

use super::state::{DrainNotice, Phase, Plan, Worker, WorkerId};
use super::{Action, Decision, Kind, Level, ReplyId, SpawnError};
use crate::metrics::WorkerStats;

/// Which position a worker holds in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Position {
    Current,
    Incoming,
    Retiring,
}

impl Decision<'_> {
    pub(super) fn start(&mut self) {
        self.log(
            Level::Info,
            format!("starting {} workers", self.state.slots.len()),
        );
        for index in 0..self.state.slots.len() {
            self.spawn_current(index);
        }
    }

    /// Starts the slot's serving worker, of the slot's generation.
    pub(super) fn spawn_current(&mut self, index: usize) {
        let now = self.now;
        let slot = &mut self.state.slots[index];
        slot.plan = Plan::Run;
        let id = slot.next_id();
        let build = slot.build;
        slot.current = Some(Worker::new(id, build, now));
        self.actions.push(Action::Spawn { id, build });
    }

    /// Starts a worker that takes over from the slot's current one once ready.
    pub(super) fn spawn_incoming(&mut self, index: usize) {
        let now = self.now;
        let slot = &mut self.state.slots[index];
        if slot.incoming.is_some() {
            return;
        }
        let id = slot.next_id();
        let build = slot.build;
        slot.incoming = Some(Worker::new(id, build, now));
        self.actions.push(Action::Spawn { id, build });
    }

    pub(super) fn spawned(&mut self, id: WorkerId, pid: u32) {
        let now = self.now;
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        worker.pid = Some(pid);
        worker.phase = Phase::Starting;
        worker.started = now;
        worker.last_heartbeat = now;
        let build = worker.build;
        self.log(
            Level::Info,
            format!(
                "slot {}: started worker pid {pid} (generation {build})",
                id.slot
            ),
        );
        // A restart during the drain delay joins a node that is going away.
        if self.state.drain_notice.is_some() && self.state.rules.kind.hears_node_drain() {
            self.actions.push(Action::NotifyDraining { id });
        }
    }

    pub(super) fn spawn_failed(&mut self, id: WorkerId, error: SpawnError) {
        let Some(position) = self.remove(id).map(|(position, _)| position) else {
            return;
        };
        let index = id.slot;
        if position == Position::Incoming {
            self.log(
                Level::Error,
                format!(
                    "slot {index}: cannot start a new worker: {}; the old worker keeps serving",
                    error.message
                ),
            );
            self.new_build_failed(index, format!("cannot start a worker: {}", error.message));
            return;
        }
        if error.transient {
            let slot = &mut self.state.slots[index];
            slot.spawn_failures += 1;
            let delay = self.state.rules.spawn_retry_delay(slot.spawn_failures);
            slot.plan = Plan::BackOff {
                until: self.now + delay,
            };
            self.log(
                Level::Warn,
                format!(
                    "slot {index}: cannot start a worker: {}; retrying in {} (a system limit, not counted as a crash)",
                    error.message,
                    humantime::format_duration(delay)
                ),
            );
        } else {
            self.failure(index, format!("cannot start a worker: {}", error.message));
        }
    }

    pub(super) fn ready(&mut self, id: WorkerId) {
        let now = self.now;
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        if worker.phase != Phase::Starting {
            return;
        }
        worker.phase = Phase::Ready;
        worker.ready_since = Some(now);
        worker.last_heartbeat = now;
        let what = worker.describe();
        let index = id.slot;
        self.state.slots[index].spawn_failures = 0;
        self.log(Level::Info, format!("slot {index}: {what} is ready"));
        let slot = &mut self.state.slots[index];
        if slot.incoming.as_ref().is_some_and(|w| w.id == id) {
            let new = slot.incoming.take().expect("checked above");
            match slot.current.replace(new) {
                Some(old) if old.pid.is_some() => {
                    let message = format!(
                        "slot {index}: {what} takes over; draining {}",
                        old.describe()
                    );
                    slot.retiring.push(old);
                    self.log(Level::Info, message);
                    self.drain(id_of_last_retiring(&self.state.slots[index]), false);
                }
                _ => {}
            }
        }
    }

    pub(super) fn heartbeat(&mut self, id: WorkerId, stats: WorkerStats) {
        let now = self.now;
        let max_memory = self.state.rules.max_memory;
        let blocked_limit = self.state.rules.heartbeat_timeout;
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        worker.last_heartbeat = now;
        worker.stats = stats;
        let rss = worker.stats.rss_bytes;
        let blocked = Duration::from_millis(worker.stats.intake_blocked_ms);
        if let Some(limit) = max_memory.filter(|&limit| rss > limit) {
            let reason = format!(
                "resident memory {} MiB is over the limit of {} MiB",
                rss >> 20,
                limit >> 20
            );
            self.recycle(id, &reason);
        } else if blocked >= blocked_limit {
            let reason = format!(
                "it could not take connections for {}",
                humantime::format_duration(blocked)
            );
            self.recycle(id, &reason);
        }
    }

    /// Replaces the slot's current worker gracefully: a new one starts, the
    /// old one drains once it is ready.
    pub(super) fn recycle(&mut self, id: WorkerId, reason: &str) {
        if self.state.leaving() {
            return;
        }
        let slot = &self.state.slots[id.slot];
        let is_current = slot
            .current
            .as_ref()
            .is_some_and(|w| w.id == id && w.is_ready());
        if !is_current || slot.incoming.is_some() || slot.plan != Plan::Run {
            return;
        }
        let what = slot
            .current
            .as_ref()
            .map(Worker::describe)
            .unwrap_or_default();
        self.log(
            Level::Info,
            format!("slot {}: replacing {what}: {reason}", id.slot),
        );
        self.spawn_incoming(id.slot);
    }

    pub(super) fn channel_broken(&mut self, id: WorkerId, reason: &str) {
        let stopping = self.state.stopping;
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        if stopping || worker.is_draining() {
            return;
        }
        let what = worker.describe();
        self.log(
            Level::Warn,
            format!(
                "slot {}: {what} broke its IPC channel ({reason}); killing and replacing it",
                id.slot
            ),
        );
        self.kill(id, "it broke its IPC channel");
    }

    pub(super) fn kill(&mut self, id: WorkerId, because: &str) {
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        if worker.phase == Phase::Killed || worker.pid.is_none() {
            return;
        }
        worker.phase = Phase::Killed;
        worker.killed_because = Some(because.to_owned());
        self.actions.push(Action::Kill { id });
    }

    /// Tells a worker to drain, with the shutdown deadline.
    pub(super) fn drain(&mut self, id: WorkerId, backlog: bool) {
        let deadline = self.now + self.state.rules.shutdown_timeout;
        let by = self.state.rules.kind.drain_by();
        let Some(worker) = self.worker_mut(id) else {
            return;
        };
        match worker.phase {
            Phase::Draining { .. } | Phase::Killed => {}
            Phase::Spawning => {}
            Phase::Starting | Phase::Ready => {
                worker.phase = Phase::Draining { deadline };
                self.actions.push(Action::Drain { id, by, backlog });
            }
        }
    }

    pub(super) fn exited(&mut self, id: WorkerId, how: &str) {
        let Some((position, worker)) = self.remove(id) else {
            return;
        };
        let index = id.slot;
        let what = worker.describe();
        let how = match &worker.killed_because {
            Some(because) => format!("{how} (killed: {because})"),
            None => how.to_owned(),
        };
        match position {
            Position::Retiring => {
                self.log(Level::Debug, format!("slot {index}: drained {what} {how}"));
            }
            Position::Incoming => {
                self.log(
                    Level::Error,
                    format!("slot {index}: new {what} {how} before it was ready; the old worker keeps serving"),
                );
                self.new_build_failed(index, format!("a new worker {how} before it was ready"));
            }
            Position::Current if self.state.stopping || worker.is_draining() => {
                self.log(Level::Debug, format!("slot {index}: {what} {how}"));
            }
            Position::Current => self.current_exited(worker, &how),
        }
    }

    fn current_exited(&mut self, worker: Worker, how: &str) {
        let index = worker.id.slot;
        let now = self.now;
        let min_uptime = self.state.rules.min_uptime;
        let young = worker
            .ready_since
            .is_none_or(|since| now.duration_since(since) < min_uptime);
        let what = if worker.ready_since.is_some() {
            format!("{} {how}", worker.describe())
        } else {
            format!("{} {how} before it was ready", worker.describe())
        };
        let slot = &mut self.state.slots[index];
        slot.last_exit = Some(how.to_owned());
        slot.restarts += 1;
        if young && worker.build != self.state.good && self.is_on_trial(worker.build) {
            // The new generation is at fault, not this slot.
            self.log(Level::Error, format!("slot {index}: {what}"));
            self.new_build_failed(
                index,
                format!(
                    "a worker of generation {} {how} within --min-uptime",
                    worker.build
                ),
            );
            let slot = &mut self.state.slots[index];
            if slot.current.is_none() && slot.incoming.is_none() && slot.plan == Plan::Run {
                self.spawn_current(index);
            }
            return;
        }
        if !young {
            self.state.slots[index].failures = 0;
        }
        let slot = &mut self.state.slots[index];
        if let Some(incoming) = slot.incoming.take() {
            // Its replacement is already starting: it takes over when ready.
            slot.current = Some(incoming);
            self.log(
                Level::Warn,
                format!("slot {index}: {what}; its replacement is starting"),
            );
            return;
        }
        if slot.plan != Plan::Run {
            return;
        }
        if young {
            self.failure(index, what);
        } else {
            self.log(Level::Warn, format!("slot {index}: {what}; restarting it"));
            self.spawn_current(index);
        }
    }

    /// Counts a young exit (or a hard spawn error) towards the crash loop and
    /// restarts the slot after its back-off, or gives the slot up for a while.
    pub(super) fn failure(&mut self, index: usize, what: String) {
        let rules = self.state.rules.clone();
        let now = self.now;
        let slot = &mut self.state.slots[index];
        slot.failures += 1;
        if slot.failures >= rules.crash_loop_limit {
            slot.give_ups += 1;
            let retry = rules.retry_delay(slot.give_ups);
            slot.plan = Plan::GivenUp {
                retry_at: now + retry,
            };
            let failures = slot.failures;
            let announced = self.state.announced;
            if !announced
                && self
                    .state
                    .slots
                    .iter()
                    .all(|slot| matches!(slot.plan, Plan::GivenUp { .. }))
            {
                self.log(
                    Level::Error,
                    format!("slot {index}: {what}; {failures} failures in a row (crash loop)"),
                );
                let ids: Vec<WorkerId> = self.state.workers().map(|w| w.id).collect();
                for id in ids {
                    self.kill(id, "the cluster is stopping");
                }
                self.actions.push(Action::Exit(Err(what)));
                return;
            }
            self.log(
                Level::Error,
                format!(
                    "slot {index}: {what}; {failures} failures in a row, not restarting this slot for {} (crash loop); the other slots keep serving",
                    humantime::format_duration(retry)
                ),
            );
            return;
        }
        let delay = rules.restart_delay(slot.failures);
        if delay.is_zero() {
            self.log(Level::Warn, format!("slot {index}: {what}; restarting it"));
            self.spawn_current(index);
        } else {
            let failures = slot.failures;
            slot.plan = Plan::BackOff { until: now + delay };
            self.log(
                Level::Warn,
                format!(
                    "slot {index}: {what}; restarting it in {} (failure {failures} of {})",
                    humantime::format_duration(delay),
                    rules.crash_loop_limit
                ),
            );
        }
    }

    pub(super) fn timers(&mut self) {
        let now = self.now;
        if let Some(notice) = self
            .state
            .drain_notice
            .take_if(|notice| now >= notice.stop_at)
        {
            self.log(
                Level::Info,
                format!(
                    "drain delay of {} over",
                    humantime::format_duration(self.state.rules.drain_delay)
                ),
            );
            self.begin_stop(&notice.why);
        }
        let rules = self.state.rules.clone();
        let stopping = self.state.stopping;
        let mut to_ready = Vec::new();
        let mut to_kill = Vec::new();
        for slot in &self.state.slots {
            for worker in slot.workers() {
                let age = now.saturating_duration_since(worker.started);
                match worker.phase {
                    Phase::Starting => match rules.kind {
                        Kind::External { ready_after } if age >= ready_after => {
                            to_ready.push(worker.id);
                        }
                        _ if age >= rules.ready_timeout => to_kill.push((
                            worker.id,
                            format!(
                                "slot {}: {} did not become ready within {}; killing it",
                                slot.index,
                                worker.describe(),
                                humantime::format_duration(rules.ready_timeout)
                            ),
                            "it did not become ready in time",
                        )),
                        _ => {}
                    },
                    Phase::Ready
                        if !stopping
                            && rules.kind.sends_heartbeats()
                            && now.saturating_duration_since(worker.last_heartbeat)
                                >= rules.heartbeat_timeout =>
                    {
                        to_kill.push((
                            worker.id,
                            format!(
                                "slot {}: {} sent no heartbeat for {} (event loop blocked?); killing and replacing it",
                                slot.index,
                                worker.describe(),
                                humantime::format_duration(rules.heartbeat_timeout)
                            ),
                            "no heartbeat",
                        ));
                    }
                    Phase::Draining { deadline } if now >= deadline => to_kill.push((
                        worker.id,
                        format!(
                            "slot {}: {} still draining at its deadline; killing it",
                            slot.index,
                            worker.describe()
                        ),
                        "still draining at its deadline",
                    )),
                    _ => {}
                }
            }
        }
        for id in to_ready {
            self.ready(id);
        }
        for (id, message, because) in to_kill {
            self.log(Level::Error, message);
            self.kill(id, because);
        }
        if stopping {
            return;
        }
        for index in 0..self.state.slots.len() {
            match self.state.slots[index].plan {
                Plan::BackOff { until } if now >= until => self.spawn_current(index),
                Plan::GivenUp { retry_at } if now >= retry_at => {
                    // One more failure gives it up again, for longer.
                    let slot = &mut self.state.slots[index];
                    slot.failures = rules.crash_loop_limit.saturating_sub(1);
                    self.log(
                        Level::Warn,
                        format!("slot {index}: retrying the slot given up on (crash loop)"),
                    );
                    self.spawn_current(index);
                }
                _ => {}
            }
        }
    }

    /// A stop asked for: the workers hear that the node is draining, keep
    /// serving for `--drain-delay` (so load balancers see readiness fail and
    /// stop sending first), then drain. Asked again during the delay, it
    /// stops at once.
    pub(super) fn stop(&mut self, why: &str, reply: Option<ReplyId>) {
        if self.state.drain_notice.take().is_some() {
            self.log(
                Level::Warn,
                format!("{why} again during the drain delay: stopping now, without waiting"),
            );
            self.begin_stop(why);
            self.reply(reply, Ok("stopping".to_owned()));
            return;
        }
        if self.state.stopping {
            if why == "SIGINT" {
                self.log(
                    Level::Warn,
                    "second SIGINT: killing every worker now".to_owned(),
                );
                let ids: Vec<WorkerId> = self.state.workers().map(|w| w.id).collect();
                for id in ids {
                    self.kill(id, "second SIGINT");
                }
            }
            self.reply(reply, Ok("stopping".to_owned()));
            return;
        }
        self.abort_reload("the cluster is stopping");
        for wait in std::mem::take(&mut self.state.scale_waits) {
            self.reply(Some(wait.reply), Err("the cluster is stopping".to_owned()));
        }
        if self.state.rules.kind.hears_node_drain() {
            let ids: Vec<WorkerId> = self
                .state
                .workers()
                .filter(|w| w.pid.is_some())
                .map(|w| w.id)
                .collect();
            for id in ids {
                self.actions.push(Action::NotifyDraining { id });
            }
        }
        let delay = self.state.rules.drain_delay;
        if delay.is_zero() {
            self.begin_stop(why);
        } else {
            self.state.drain_notice = Some(DrainNotice {
                stop_at: self.now + delay,
                why: why.to_owned(),
            });
            self.log(
                Level::Info,
                format!(
                    "{why}: the node is draining; workers keep serving for {} (--drain-delay) while load balancers move traffic away, then stop (send it again to stop at once)",
                    humantime::format_duration(delay)
                ),
            );
        }
        self.reply(reply, Ok("stopping".to_owned()));
    }

    /// Today's graceful stop: every worker drains, stragglers are killed at
    /// `--shutdown-timeout`, the primary exits once all are gone.
    fn begin_stop(&mut self, why: &str) {
        self.state.stopping = true;
        // The sockets must stop listening, or what queues on them is reset
        // when the primary exits, after its clients sent their requests;
        // refused connections are retried elsewhere. Whoever accepts shuts
        // them once its queue is empty: corral workers after taking their
        // backlog (a busy worker's queue is still served), the primary at
        // once when it accepts itself (it never falls behind) or when an
        // external program, which cannot be asked, does.
        let rules = &self.state.rules;
        if rules.primary_accepts || !rules.kind.hears_node_drain() {
            self.actions.push(Action::StopListening);
        }
        let take_backlog = rules.kind.hears_node_drain();
        let ids: Vec<WorkerId> = self.state.workers().map(|w| w.id).collect();
        let draining = ids.len();
        for id in ids {
            match self.state.worker(id).map(|w| w.phase) {
                Some(Phase::Spawning) => {}
                _ => self.drain(id, take_backlog),
            }
        }
        for slot in &mut self.state.slots {
            if matches!(slot.plan, Plan::BackOff { .. } | Plan::GivenUp { .. }) {
                slot.plan = Plan::Run;
            }
        }
        self.log(
            Level::Info,
            format!(
                "{why}: stopping; draining {draining} workers (killed after {})",
                humantime::format_duration(self.state.rules.shutdown_timeout)
            ),
        );
    }

    pub(super) fn announce_when_serving(&mut self) {
        let slots = &self.state.slots;
        if self.state.announced
            || !slots
                .iter()
                .all(|slot| slot.is_serving() || matches!(slot.plan, Plan::GivenUp { .. }))
            || !slots.iter().any(|slot| slot.is_serving())
        {
            return;
        }
        self.state.announced = true;
        self.actions.push(Action::Announce);
    }

    pub(super) fn worker_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.state.slots.get_mut(id.slot)?.find_mut(id)
    }

    /// Takes an exited (or never started) worker out of its slot.
    pub(super) fn remove(&mut self, id: WorkerId) -> Option<(Position, Worker)> {
        let slot = self.state.slots.get_mut(id.slot)?;
        if slot.current.as_ref().is_some_and(|w| w.id == id) {
            return slot.current.take().map(|w| (Position::Current, w));
        }
        if slot.incoming.as_ref().is_some_and(|w| w.id == id) {
            return slot.incoming.take().map(|w| (Position::Incoming, w));
        }
        let at = slot.retiring.iter().position(|w| w.id == id)?;
        Some((Position::Retiring, slot.retiring.swap_remove(at)))
    }
}

fn id_of_last_retiring(slot: &super::state::Slot) -> WorkerId {
    slot.retiring.last().expect("just pushed").id
}
