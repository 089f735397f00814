//! Per-sender sequence numbers on the receiving side: what makes a lost
//! message visible. Redis pub/sub keeps no history, so a message published
//! while a subscriber was away is gone; each node numbers its frames 1, 2, 3...
//! and a receiver that sees 7 after 4 knows it missed 5 and 6.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The largest number of senders remembered; past it the longest silent is
/// forgotten, so a channel full of short-lived nodes cannot grow the map.
const MAX_SENDERS: usize = 4096;

/// A run of sequence numbers that never arrived from one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub first: u64,
    pub last: u64,
}

impl Gap {
    pub(crate) fn missed(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// What to do with an arriving message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it; `gap` is what was lost just before it.
    Deliver { gap: Option<Gap> },
    /// Already seen (a publish retried after an error that happened once the
    /// frame had reached Redis): skip it.
    Duplicate,
}

#[derive(Debug)]
struct Sender {
    last: u64,
    seen: Instant,
}

/// The last sequence number seen from each node.
#[derive(Debug)]
pub(crate) struct Senders {
    nodes: HashMap<String, Sender>,
    forget_after: Duration,
}

impl Senders {
    /// Senders silent for `forget_after` (no message, no heartbeat) are
    /// forgotten: their node has stopped.
    pub(crate) fn new(forget_after: Duration) -> Self {
        Senders {
            nodes: HashMap::new(),
            forget_after,
        }
    }

    /// Senders heard from recently.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A message `seq` from `node`. The first one heard from a node starts its
    /// count: what it sent before this node subscribed was never ours to miss.
    pub(crate) fn message(&mut self, node: &str, seq: u64, now: Instant) -> Verdict {
        match self.nodes.get_mut(node) {
            Some(sender) => {
                sender.seen = now;
                if seq <= sender.last {
                    return Verdict::Duplicate;
                }
                let gap = (seq > sender.last + 1).then(|| Gap {
                    first: sender.last + 1,
                    last: seq - 1,
                });
                sender.last = seq;
                Verdict::Deliver { gap }
            }
            None => {
                self.insert(node, seq, now);
                Verdict::Deliver { gap: None }
            }
        }
    }

    /// A heartbeat: `node` has published or dropped everything up to `last`.
    pub(crate) fn heartbeat(&mut self, node: &str, last: u64, now: Instant) -> Option<Gap> {
        match self.nodes.get_mut(node) {
            Some(sender) => {
                sender.seen = now;
                if last <= sender.last {
                    return None;
                }
                let gap = Gap {
                    first: sender.last + 1,
                    last,
                };
                sender.last = last;
                Some(gap)
            }
            None => {
                self.insert(node, last, now);
                None
            }
        }
    }

    /// Forgets the senders silent for too long.
    pub(crate) fn forget_silent(&mut self, now: Instant) {
        let limit = self.forget_after;
        self.nodes
            .retain(|_, sender| now.saturating_duration_since(sender.seen) < limit);
    }

    /// Counts every sender as heard from now: after this node's own outage,
    /// so the outage does not make it forget the senders whose next number
    /// shows what it missed.
    pub(crate) fn touch_all(&mut self, now: Instant) {
        for sender in self.nodes.values_mut() {
            sender.seen = now;
        }
    }

    fn insert(&mut self, node: &str, last: u64, now: Instant) {
        if self.nodes.len() >= MAX_SENDERS {
            self.forget_silent(now);
        }
        if self.nodes.len() >= MAX_SENDERS {
            let oldest = self
                .nodes
                .iter()
                .min_by_key(|(_, sender)| sender.seen)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.nodes.remove(&oldest);
            }
        }
        self.nodes
            .insert(node.to_owned(), Sender { last, seen: now });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(gap: Option<(u64, u64)>) -> Verdict {
        Verdict::Deliver {
            gap: gap.map(|(first, last)| Gap { first, last }),
        }
    }

    #[test]
    fn consecutive_messages_have_no_gap_and_a_skip_is_one_gap_of_the_right_size() {
        let now = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(60));
        assert_eq!(senders.message("a", 1, now), deliver(None));
        assert_eq!(senders.message("a", 2, now), deliver(None));
        assert_eq!(senders.message("a", 6, now), deliver(Some((3, 5))));
        assert_eq!(Gap { first: 3, last: 5 }.missed(), 3);
        assert_eq!(senders.message("a", 7, now), deliver(None));
    }

    #[test]
    fn each_sender_has_its_own_count() {
        let now = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(60));
        senders.message("a", 1, now);
        senders.message("b", 10, now);
        assert_eq!(senders.message("a", 2, now), deliver(None));
        assert_eq!(senders.message("b", 12, now), deliver(Some((11, 11))));
        assert_eq!(senders.len(), 2);
    }

    #[test]
    fn a_late_joiner_does_not_count_what_was_sent_before_it_listened() {
        let now = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(60));
        assert_eq!(senders.message("a", 500, now), deliver(None));
        assert_eq!(senders.heartbeat("b", 70, now), None);
        assert_eq!(senders.message("b", 71, now), deliver(None));
    }

    #[test]
    fn repeated_and_older_numbers_are_duplicates() {
        let now = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(60));
        senders.message("a", 5, now);
        assert_eq!(senders.message("a", 5, now), Verdict::Duplicate);
        assert_eq!(senders.message("a", 3, now), Verdict::Duplicate);
        assert_eq!(senders.message("a", 6, now), deliver(None));
    }

    #[test]
    fn a_heartbeat_reveals_messages_lost_at_the_end_of_a_burst() {
        let now = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(60));
        senders.message("a", 1, now);
        assert_eq!(senders.heartbeat("a", 1, now), None);
        assert_eq!(
            senders.heartbeat("a", 4, now),
            Some(Gap { first: 2, last: 4 })
        );
        // Counted once: the next heartbeat with the same number adds nothing.
        assert_eq!(senders.heartbeat("a", 4, now), None);
        assert_eq!(senders.message("a", 5, now), deliver(None));
    }

    #[test]
    fn silent_senders_are_forgotten_and_the_map_is_bounded() {
        let start = Instant::now();
        let mut senders = Senders::new(Duration::from_secs(10));
        senders.message("old", 1, start);
        senders.message("new", 1, start + Duration::from_secs(8));
        senders.forget_silent(start + Duration::from_secs(12));
        assert_eq!(senders.len(), 1);
        // Forgotten means a fresh start, not a gap (it was at 1).
        assert_eq!(
            senders.message("old", 9, start + Duration::from_secs(12)),
            deliver(None)
        );
        // After an outage longer than the limit, touching keeps "new".
        senders.touch_all(start + Duration::from_secs(30));
        senders.forget_silent(start + Duration::from_secs(31));
        assert_eq!(
            senders.message("new", 3, start + Duration::from_secs(31)),
            deliver(Some((2, 2)))
        );

        let mut many = Senders::new(Duration::from_secs(3600));
        for i in 0..MAX_SENDERS + 10 {
            many.message(&format!("n{i}"), 1, start + Duration::from_millis(i as u64));
        }
        assert_eq!(many.len(), MAX_SENDERS);
        // The oldest went first: its next number starts afresh, no gap.
        assert_eq!(
            many.message("n0", 5, start + Duration::from_secs(100)),
            deliver(None)
        );
    }
}
