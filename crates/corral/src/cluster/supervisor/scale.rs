//! Scaling at run time: new slots at the top, the highest slots retired
//! (drained, their queued connections served first) when scaling down.

use super::state::{Plan, ScaleWait, Slot};
use super::{Decision, Level, ReplyId, ScaleTarget};

impl Decision<'_> {
    pub(super) fn scale(&mut self, target: ScaleTarget, reply: Option<ReplyId>) {
        if self.state.leaving() {
            self.reply(reply, Err("the cluster is stopping".to_owned()));
            return;
        }
        let active = self.state.active_slots();
        let wanted = match target {
            ScaleTarget::To(n) => n,
            ScaleTarget::By(delta) => (active as i64).saturating_add(delta).max(0) as usize,
        }
        .max(1);
        // A newer size replaces any older request still waiting.
        for wait in std::mem::take(&mut self.state.scale_waits) {
            self.reply(
                Some(wait.reply),
                Err(format!("superseded by a scale to {wanted}")),
            );
        }
        if wanted != active {
            self.log(
                Level::Info,
                format!("scaling from {active} to {wanted} workers"),
            );
        }
        let build = self.state.serving_build();
        for index in 0..wanted {
            if index >= self.state.slots.len() {
                self.state.slots.push(Slot::new(index, build));
                self.spawn_current(index);
                self.queue_for_reload(index);
            } else if self.state.slots[index].plan == Plan::Retire {
                // Scaled down and up again before it was gone.
                let slot = &mut self.state.slots[index];
                slot.plan = Plan::Run;
                slot.build = build;
                if slot.current.is_none() && slot.incoming.is_none() {
                    self.spawn_current(index);
                }
                self.queue_for_reload(index);
            }
        }
        for index in (wanted..self.state.slots.len()).rev() {
            if self.state.slots[index].plan != Plan::Retire {
                self.retire(index);
            }
        }
        if let Some(reply) = reply {
            self.state.scale_waits.push(ScaleWait {
                target: wanted,
                reply,
            });
        }
    }

    fn queue_for_reload(&mut self, index: usize) {
        if let Some(reload) = &mut self.state.reload {
            if reload.rollback_reason.is_none() && !reload.queue.contains(&index) {
                reload.queue.push_back(index);
            }
        }
    }

    /// Drains the slot's workers; the slot goes once they are gone.
    fn retire(&mut self, index: usize) {
        let slot = &mut self.state.slots[index];
        slot.plan = Plan::Retire;
        if let Some(reload) = &mut self.state.reload {
            reload.queue.retain(|&queued| queued != index);
        }
        let incoming = slot.incoming.as_ref().map(|w| w.id);
        if let Some(current) = slot.current.take() {
            let id = current.id;
            slot.retiring.push(current);
            self.drain(id, true);
        }
        if let Some(id) = incoming {
            self.kill(id, "its slot was scaled away");
        }
        self.log(
            Level::Info,
            format!("slot {index}: retired; its worker drains"),
        );
    }

    /// Retired slots at the top go once their workers are gone, so slot
    /// numbers stay `0..workers`.
    pub(super) fn remove_retired_slots(&mut self) {
        while self.state.slots.len() > 1
            && self
                .state
                .slots
                .last()
                .is_some_and(|slot| slot.plan == Plan::Retire && slot.workers().next().is_none())
        {
            self.state.slots.pop();
        }
    }

    pub(super) fn answer_scale_waits(&mut self) {
        let serving = self.state.serving_slots();
        let settled = self.state.slots.len() == self.state.active_slots();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.state.scale_waits)
            .into_iter()
            .partition(|wait| {
                settled && serving == wait.target && self.state.slots.len() == wait.target
            });
        self.state.scale_waits = waiting;
        for wait in done {
            self.reply(
                Some(wait.reply),
                Ok(format!("{} serving workers", wait.target)),
            );
        }
    }
}
