//! Rolling reloads: pin the new program, move one slot at a time behind the
//! reload gate, and roll the moved slots back when the new generation fails
//! within `--min-uptime` of becoming ready.

use super::state::{Build, LastReload, Plan, Probation, Reload, ReloadOutcome};
use super::{Action, Decision, Level, ReplyId};

impl Decision<'_> {
    pub(super) fn reload_requested(&mut self, reply: Option<ReplyId>) {
        if self.state.leaving() {
            self.reply(reply, Err("the cluster is stopping".to_owned()));
            return;
        }
        if let Some((_, replies)) = &mut self.state.pinning {
            replies.extend(reply);
            return;
        }
        if let Some(reload) = &mut self.state.reload {
            if reload.rollback_reason.is_none() {
                reload.replies.extend(reply);
                let target = reload.target;
                self.log(
                    Level::Warn,
                    format!("reload: generation {target} is already being rolled out; this request waits for it"),
                );
                return;
            }
            self.reply(
                reply,
                Err("a failed reload is being rolled back; try again once it is over".to_owned()),
            );
            return;
        }
        // A reload during probation: the previous one is good enough now.
        self.finish_probation();
        let generation = self.state.latest + 1;
        self.state.latest = generation;
        self.state.pinning = Some((generation, reply.into_iter().collect()));
        self.actions.push(Action::PinBuild { generation });
    }

    pub(super) fn build_pinned(&mut self, generation: Build) {
        let Some((pinned, replies)) = self.state.pinning.take() else {
            return;
        };
        if pinned != generation || self.state.leaving() {
            for reply in replies {
                self.reply(Some(reply), Err("the cluster is stopping".to_owned()));
            }
            self.actions.push(Action::ForgetBuild { generation });
            return;
        }
        let queue = self
            .state
            .slots
            .iter()
            .filter(|slot| slot.plan != Plan::Retire)
            .map(|slot| slot.index)
            .collect();
        self.log(
            Level::Info,
            format!(
                "reload: rolling out generation {generation} to {} slots, one at a time",
                self.state.active_slots()
            ),
        );
        self.state.reload = Some(Reload {
            target: generation,
            attempted: generation,
            rollback_reason: None,
            queue,
            step: None,
            replies,
        });
    }

    pub(super) fn build_unavailable(&mut self, generation: Build, error: &str) {
        let Some((_, replies)) = self.state.pinning.take() else {
            return;
        };
        let reason = format!("cannot read the program: {error}");
        self.log(
            Level::Error,
            format!(
                "reload failed: {reason}; the workers keep running generation {}",
                self.state.good
            ),
        );
        self.state.last_reload = Some(LastReload {
            outcome: ReloadOutcome::Failed,
            generation,
            reason: Some(reason.clone()),
        });
        for reply in replies {
            self.reply(Some(reply), Err(format!("reload failed: {reason}")));
        }
    }

    /// True while workers of `build` may still prove it bad: during its
    /// reload, or in the probation after it.
    pub(super) fn is_on_trial(&self, build: Build) -> bool {
        self.state
            .reload
            .as_ref()
            .is_some_and(|reload| reload.attempted == build && reload.rollback_reason.is_none())
            || self
                .state
                .probation
                .as_ref()
                .is_some_and(|probation| probation.generation == build)
    }

    /// Moves the reload on: the slot in progress needs its new worker ready
    /// for the gate; then the next slot.
    pub(super) fn advance_reload(&mut self) {
        loop {
            let Some(reload) = &self.state.reload else {
                return;
            };
            let target = reload.target;
            if let Some(index) = reload.step {
                let gate = self.state.rules.reload_gate;
                let slot = &self.state.slots[index];
                if slot.plan == Plan::Retire {
                    // Scaled away meanwhile: nothing to move.
                } else {
                    let current = slot.current.as_ref();
                    let moved = current.is_some_and(|w| w.build == target && w.is_ready());
                    if !moved {
                        if slot.plan != Plan::Run {
                            // Given up or backing off: start the new generation
                            // there now, which is also how a reload retries it.
                            let slot = &mut self.state.slots[index];
                            slot.failures = 0;
                            slot.give_ups = 0;
                            if slot.current.is_none() {
                                self.spawn_current(index);
                            }
                        } else if current.is_some_and(|w| w.is_ready() && w.build != target)
                            && slot.incoming.is_none()
                        {
                            self.spawn_incoming(index);
                        } else if current.is_none() && slot.incoming.is_none() {
                            self.spawn_current(index);
                        }
                        return;
                    }
                    let since = current.and_then(|w| w.ready_since).expect("ready");
                    if self.now < since + gate {
                        return;
                    }
                }
            }
            let reload = self.state.reload.as_mut().expect("checked above");
            match reload.queue.pop_front() {
                Some(index) => {
                    reload.step = Some(index);
                    let slot = &mut self.state.slots[index];
                    slot.build = target;
                }
                None => {
                    self.finish_reload();
                    return;
                }
            }
        }
    }

    fn finish_reload(&mut self) {
        let Some(reload) = self.state.reload.take() else {
            return;
        };
        match reload.rollback_reason {
            None => {
                let until = self
                    .state
                    .slots
                    .iter()
                    .filter_map(|slot| slot.current.as_ref()?.ready_since)
                    .max()
                    .unwrap_or(self.now)
                    + self.state.rules.min_uptime;
                // Callers hear of it once the new workers outlived
                // --min-uptime: a build that dies soon after is a failure.
                self.state.probation = Some(Probation {
                    generation: reload.target,
                    previous: self.state.good,
                    until,
                    replies: reload.replies,
                });
                self.state.last_reload = Some(LastReload {
                    outcome: ReloadOutcome::Completed,
                    generation: reload.target,
                    reason: None,
                });
                self.log(
                    Level::Info,
                    format!(
                        "reload complete: every slot runs generation {}",
                        reload.target
                    ),
                );
            }
            Some(reason) => {
                self.state.last_reload = Some(LastReload {
                    outcome: ReloadOutcome::RolledBack,
                    generation: reload.attempted,
                    reason: Some(reason.clone()),
                });
                self.log(
                    Level::Error,
                    format!(
                        "reload failed ({reason}); rolled back to generation {}",
                        reload.target
                    ),
                );
                self.actions.push(Action::ForgetBuild {
                    generation: reload.attempted,
                });
                for reply in reload.replies {
                    self.reply(
                        Some(reply),
                        Err(format!(
                            "reload failed ({reason}); rolled back to generation {}",
                            reload.target
                        )),
                    );
                }
            }
        }
    }

    /// A worker of the generation on trial failed at `index`: stop moving
    /// slots forward, and move back the ones already moved.
    pub(super) fn new_build_failed(&mut self, index: usize, reason: String) {
        let attempted = match (&self.state.reload, &self.state.probation) {
            (Some(reload), _) if reload.rollback_reason.is_none() => reload.attempted,
            (None, Some(probation)) => probation.generation,
            _ => return,
        };
        let (good, mut replies) = match self.state.probation.take() {
            Some(probation) if probation.generation == attempted => {
                (probation.previous, probation.replies)
            }
            _ => (self.state.good, Vec::new()),
        };
        self.state.good = good;
        replies.extend(
            self.state
                .reload
                .take()
                .map(|reload| reload.replies)
                .unwrap_or_default(),
        );
        let reason = format!("slot {index}: {reason}");
        // The failed slot goes back at once; its old worker (if any) still serves.
        let mut moved = Vec::new();
        for slot in &mut self.state.slots {
            if slot.build != attempted {
                continue;
            }
            let serves_new = slot.current.as_ref().is_some_and(|w| w.build == attempted);
            if slot.index == index || !serves_new {
                slot.build = good;
            }
            if serves_new {
                moved.push(slot.index);
            }
        }
        let incoming: Vec<_> = self
            .state
            .slots
            .iter()
            .filter_map(|slot| slot.incoming.as_ref())
            .filter(|w| w.build == attempted)
            .map(|w| w.id)
            .collect();
        for id in incoming {
            self.kill(id, "its reload failed");
        }
        moved.retain(|&slot| slot != index || self.state.slots[slot].current.is_some());
        if moved.is_empty() {
            self.log(
                Level::Error,
                format!("reload failed ({reason}); the workers keep running generation {good}"),
            );
            self.state.last_reload = Some(LastReload {
                outcome: ReloadOutcome::Failed,
                generation: attempted,
                reason: Some(reason.clone()),
            });
            self.actions.push(Action::ForgetBuild {
                generation: attempted,
            });
            for reply in replies {
                self.reply(
                    Some(reply),
                    Err(format!(
                        "reload failed ({reason}); the workers keep running generation {good}"
                    )),
                );
            }
            return;
        }
        self.log(
            Level::Error,
            format!(
                "reload of generation {attempted} failed ({reason}); rolling {} slots back to generation {good}",
                moved.len()
            ),
        );
        self.state.reload = Some(Reload {
            target: good,
            attempted,
            rollback_reason: Some(reason),
            queue: moved.into(),
            step: None,
            replies,
        });
    }

    pub(super) fn abort_reload(&mut self, why: &str) {
        if let Some((generation, replies)) = self.state.pinning.take() {
            self.actions.push(Action::ForgetBuild { generation });
            for reply in replies {
                self.reply(Some(reply), Err(why.to_owned()));
            }
        }
        if let Some(reload) = self.state.reload.take() {
            for reply in reload.replies {
                self.reply(Some(reply), Err(why.to_owned()));
            }
        }
        let waiting = self
            .state
            .probation
            .as_mut()
            .map(|probation| std::mem::take(&mut probation.replies))
            .unwrap_or_default();
        for reply in waiting {
            self.reply(Some(reply), Err(why.to_owned()));
        }
    }

    pub(super) fn end_probation(&mut self) {
        if self
            .state
            .probation
            .as_ref()
            .is_some_and(|probation| self.now >= probation.until)
        {
            self.finish_probation();
        }
    }

    /// The generation on probation is good from now on.
    fn finish_probation(&mut self) {
        if let Some(probation) = self.state.probation.take() {
            self.state.good = probation.generation;
            for reply in probation.replies {
                self.reply(
                    Some(reply),
                    Ok(format!("generation {}", probation.generation)),
                );
            }
            if probation.previous != probation.generation {
                self.actions.push(Action::ForgetBuild {
                    generation: probation.previous,
                });
            }
        }
    }
}
