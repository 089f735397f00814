//! The application metrics each slot's worker last reported, kept by the
//! primary for `/metrics`.
//!
//! One text per slot, replaced by every report: a restarted worker's series
//! carry on under the same slot (its counters start again from zero, which
//! Prometheus reads as a reset), and a slot's text is forgotten once no
//! worker is left to replace it. This is where prom-client's cluster
//! aggregator (which sums workers, so a dead worker's share vanishes from a
//! counter) and Python's multiprocess mode (which keeps a dead pid's files
//! until told otherwise) go wrong.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Report {
    /// The reporting worker's start number within its slot.
    serial: u64,
    text: Arc<str>,
}

/// The latest report of each slot.
#[derive(Debug, Default)]
pub(crate) struct AppMetrics {
    slots: BTreeMap<usize, Report>,
}

/// Shared by the executor (writer) and the admin routes.
pub(crate) type SharedAppMetrics = Arc<Mutex<AppMetrics>>;

impl AppMetrics {
    /// Keeps `text` as the slot's metrics, unless a newer worker of the slot
    /// (a higher `serial`) already reported: during a reload the draining
    /// worker's figures must not replace its successor's.
    pub fn report(&mut self, slot: usize, serial: u64, text: String) {
        match self.slots.get(&slot) {
            Some(kept) if kept.serial > serial => {}
            _ => {
                self.slots.insert(
                    slot,
                    Report {
                        serial,
                        text: text.into(),
                    },
                );
            }
        }
    }

    /// Forgets every slot for which `live(slot, serial)` is false, with the
    /// serial of the worker whose text is kept.
    pub fn retain(&mut self, mut live: impl FnMut(usize, u64) -> bool) {
        self.slots.retain(|&slot, report| live(slot, report.serial));
    }

    /// Each slot's text, by slot.
    pub fn texts(&self) -> Vec<(usize, Arc<str>)> {
        self.slots
            .iter()
            .map(|(&slot, report)| (slot, report.text.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(metrics: &AppMetrics) -> Vec<(usize, String)> {
        metrics
            .texts()
            .into_iter()
            .map(|(slot, text)| (slot, text.to_string()))
            .collect()
    }

    #[test]
    fn each_report_replaces_the_slots_text() {
        let mut metrics = AppMetrics::default();
        metrics.report(1, 0, "a".into());
        metrics.report(0, 0, "b".into());
        metrics.report(1, 0, "c".into());
        assert_eq!(texts(&metrics), [(0, "b".into()), (1, "c".into())]);
        // The restarted worker (serial 1) takes over slot 1.
        metrics.report(1, 1, "d".into());
        assert_eq!(texts(&metrics), [(0, "b".into()), (1, "d".into())]);
    }

    #[test]
    fn an_older_worker_of_the_slot_does_not_replace_its_successor() {
        let mut metrics = AppMetrics::default();
        metrics.report(0, 3, "new".into());
        metrics.report(0, 2, "draining".into());
        assert_eq!(texts(&metrics), [(0, "new".into())]);
    }

    #[test]
    fn retain_forgets_the_slots_whose_workers_are_gone() {
        let mut metrics = AppMetrics::default();
        metrics.report(0, 0, "a".into());
        metrics.report(1, 4, "b".into());
        let mut asked = Vec::new();
        metrics.retain(|slot, serial| {
            asked.push((slot, serial));
            slot == 0
        });
        assert_eq!(asked, [(0, 0), (1, 4)]);
        assert_eq!(texts(&metrics), [(0, "a".into())]);
    }
}
