//! The primary's balancer for the accept-and-pass modes: it picks the slot
//! for each accepted connection and holds connections for slots whose worker
//! is being replaced.
//!
//! The supervisor tells it which worker serves each slot; the acceptors ask it
//! where a connection goes. Both run on the primary's single thread; the mutex
//! around it is never contended.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::config::Balance;
use crate::net::fd_passing::PassedConnection;
use crate::net::steering;

/// Connections held for one slot at most; past that new ones are closed
/// rather than letting a dead slot eat memory.
const MAX_WAITING_PER_SLOT: usize = 4096;

/// The worker that currently takes a slot's connections.
#[derive(Debug)]
struct Target {
    generation: u64,
    connections: mpsc::UnboundedSender<PassedConnection>,
    /// Open connections in the worker's last heartbeat.
    reported_open: u64,
    /// Connections passed since that heartbeat.
    passed_since_report: u64,
}

#[derive(Debug, Default)]
struct SlotRoute {
    target: Option<Target>,
    waiting: VecDeque<(Instant, PassedConnection)>,
    /// The supervisor gave up on this slot (crash loop): its clients go to
    /// their next-best slot instead of waiting for a worker that won't come.
    given_up: bool,
}

#[derive(Debug)]
pub(crate) struct Balancer {
    mode: Balance,
    slots: Vec<SlotRoute>,
    next: usize,
}

impl Balancer {
    /// Locks the balancer shared between the supervisor and the acceptors.
    /// Both run on the primary's one thread, so a poisoned lock can only mean
    /// a panic mid-call; its routes are still usable.
    pub fn lock(shared: &Mutex<Balancer>) -> MutexGuard<'_, Balancer> {
        shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn new(mode: Balance, slots: usize) -> Self {
        Balancer {
            mode,
            slots: (0..slots).map(|_| SlotRoute::default()).collect(),
            next: 0,
        }
    }

    /// Makes room for slots added at run time.
    pub fn ensure_slots(&mut self, slots: usize) {
        while self.slots.len() < slots {
            self.slots.push(SlotRoute::default());
        }
    }

    /// Sends a new connection to the slot the policy picks.
    pub fn route(&mut self, connection: PassedConnection) {
        let slot = match self.mode {
            Balance::Sticky => {
                let available = |slot: usize| !self.slots[slot].given_up;
                sticky_slot_among(connection.header.client.ip(), self.slots.len(), available)
            }
            Balance::LeastConnections => self.least_loaded(),
            _ => self.next_round_robin(),
        };
        self.deliver(slot, connection);
    }

    /// A connection a worker could not take (it died): sticky connections
    /// wait for their slot's replacement, others go elsewhere.
    pub fn requeue(&mut self, slot: usize, generation: u64, connection: PassedConnection) {
        self.worker_gone(slot, generation);
        if self.mode == Balance::Sticky {
            self.deliver(slot, connection);
        } else {
            self.route(connection);
        }
    }

    /// A worker is ready to take `slot`'s connections; whatever waited for the
    /// slot goes to it now.
    pub fn worker_ready(
        &mut self,
        slot: usize,
        generation: u64,
        connections: mpsc::UnboundedSender<PassedConnection>,
    ) {
        let route = &mut self.slots[slot];
        route.target = Some(Target {
            generation,
            connections,
            reported_open: 0,
            passed_since_report: 0,
        });
        let waiting = std::mem::take(&mut route.waiting);
        for (_, connection) in waiting {
            self.deliver(slot, connection);
        }
    }

    /// The worker stops taking connections (draining, killed or exited).
    pub fn worker_gone(&mut self, slot: usize, generation: u64) {
        let route = &mut self.slots[slot];
        if route
            .target
            .as_ref()
            .is_some_and(|t| t.generation == generation)
        {
            route.target = None;
        }
    }

    /// The slot is in a crash loop: its waiting connections go elsewhere.
    pub fn slot_given_up(&mut self, slot: usize) {
        self.slots[slot].given_up = true;
        self.slots[slot].target = None;
        let waiting = std::mem::take(&mut self.slots[slot].waiting);
        if self.slots.iter().all(|route| route.given_up) {
            return;
        }
        for (_, connection) in waiting {
            self.route(connection);
        }
    }

    /// The slot is being tried again (a reload).
    pub fn slot_back(&mut self, slot: usize) {
        self.slots[slot].given_up = false;
    }

    /// The open-connection count from a worker's heartbeat.
    pub fn report(&mut self, slot: usize, generation: u64, open_connections: u64) {
        if let Some(target) = self.slots[slot]
            .target
            .as_mut()
            .filter(|t| t.generation == generation)
        {
            target.reported_open = open_connections;
            target.passed_since_report = 0;
        }
    }

    /// Closes connections that waited longer than `limit` for their slot.
    pub fn expire(&mut self, now: Instant, limit: Duration) -> usize {
        let mut closed = 0;
        for route in &mut self.slots {
            while route
                .waiting
                .front()
                .is_some_and(|(since, _)| now.duration_since(*since) >= limit)
            {
                route.waiting.pop_front();
                closed += 1;
            }
        }
        closed
    }

    /// Drops every held connection (the primary is stopping).
    pub fn clear(&mut self) {
        for route in &mut self.slots {
            route.waiting.clear();
            route.target = None;
        }
    }

    fn deliver(&mut self, slot: usize, connection: PassedConnection) {
        let route = &mut self.slots[slot];
        let connection = match &mut route.target {
            Some(target) => match target.connections.send(connection) {
                Ok(()) => {
                    target.passed_since_report += 1;
                    return;
                }
                Err(mpsc::error::SendError(connection)) => {
                    route.target = None;
                    connection
                }
            },
            None => connection,
        };
        if route.waiting.len() < MAX_WAITING_PER_SLOT {
            route.waiting.push_back((Instant::now(), connection));
        } else {
            tracing::warn!("slot {slot}: {MAX_WAITING_PER_SLOT} connections already wait for a worker; closing a new one");
        }
    }

    /// The next slot with a worker, in turn; any slot if none has one (the
    /// connection then waits there).
    fn next_round_robin(&mut self) -> usize {
        let count = self.slots.len();
        for offset in 0..count {
            let slot = (self.next + offset) % count;
            if self.slots[slot].target.is_some() {
                self.next = (slot + 1) % count;
                return slot;
            }
        }
        // No worker anywhere: wait at the next slot still being tried.
        let slot = (0..count)
            .map(|offset| (self.next + offset) % count)
            .find(|&slot| !self.slots[slot].given_up)
            .unwrap_or(self.next % count);
        self.next = (slot + 1) % count;
        slot
    }

    fn least_loaded(&mut self) -> usize {
        let loads = self.slots.iter().enumerate().filter_map(|(slot, route)| {
            route
                .target
                .as_ref()
                .map(|t| (t.reported_open + t.passed_since_report, slot))
        });
        // Ties go round-robin, so an idle cluster still spreads its load.
        let start = self.next;
        let count = self.slots.len();
        match loads.min_by_key(|&(load, slot)| (load, (slot + count - start) % count)) {
            Some((_, slot)) => {
                self.next = (slot + 1) % count;
                slot
            }
            None => self.next_round_robin(),
        }
    }
}

/// Rendezvous (highest-random-weight) hashing: each client goes to the slot
/// with the highest score for it. Changing the slot count from n to n+1 moves
/// only the ~1/(n+1) clients the new slot wins, and a slot's restart moves no
/// one.
#[cfg(test)]
pub(crate) fn sticky_slot(client: IpAddr, slots: usize) -> usize {
    sticky_slot_among(client, slots, |_| true)
}

/// The same, among the slots `available` accepts (a slot given up on hands
/// only its own clients to their second choice). With none available, the
/// first choice.
///
/// A client goes through its bucket ([`steering::bucket_of`]), so this is
/// exactly the slot the kernel-steered sticky mode picks for it.
pub(crate) fn sticky_slot_among(
    client: IpAddr,
    slots: usize,
    available: impl Fn(usize) -> bool,
) -> usize {
    steering::bucket_slot_among(steering::bucket_of(client), slots, available)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn clients() -> impl Iterator<Item = IpAddr> {
        (0..10_000u32).map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
    }

    #[test]
    fn sticky_spreads_clients_evenly() {
        let mut counts = [0usize; 4];
        for client in clients() {
            counts[sticky_slot(client, 4)] += 1;
        }
        for count in counts {
            assert!((2_200..=2_800).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn sticky_moves_few_clients_when_a_slot_is_added() {
        let moved = clients()
            .filter(|&client| sticky_slot(client, 4) != sticky_slot(client, 5))
            .count();
        // Ideal is 1/5 of the clients; modulo hashing would move about 4/5.
        assert!(moved < 2_400, "{moved} of 10000 clients moved");
        for client in clients() {
            let (before, after) = (sticky_slot(client, 4), sticky_slot(client, 5));
            assert!(
                before == after || after == 4,
                "a client moved between old slots"
            );
        }
    }

    #[test]
    fn sticky_moves_only_a_given_up_slots_clients() {
        for client in clients() {
            let first = sticky_slot(client, 4);
            let without_2 = sticky_slot_among(client, 4, |slot| slot != 2);
            if first == 2 {
                assert_ne!(without_2, 2);
            } else {
                assert_eq!(without_2, first);
            }
        }
    }

    #[test]
    fn sticky_passing_agrees_with_the_kernel_steered_table() {
        let table = steering::sticky_table(&[true, true, false, true, true]);
        for client in clients() {
            let passed = sticky_slot_among(client, 5, |slot| slot != 2);
            assert_eq!(passed, table[steering::bucket_of(client)]);
        }
    }

    #[test]
    fn sticky_treats_mapped_ipv4_as_ipv4() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(sticky_slot(v4, 7), sticky_slot(mapped, 7));
    }
}
