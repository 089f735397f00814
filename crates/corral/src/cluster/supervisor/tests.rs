//! The supervisor's rules, event by event: no processes, no sleeps. A small
//! simulator plays the executor (answers spawns and pins at once) and moves
//! a fake clock.

use std::time::{Duration, Instant};

use super::state::LastReload;
use super::*;
use crate::metrics::WorkerStats;

fn rules() -> Rules {
    Rules {
        kind: Kind::Corral,
        ready_timeout: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(30),
        min_uptime: Duration::from_secs(5),
        reload_gate: Duration::from_secs(2),
        crash_loop_limit: 5,
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_secs(10),
        retry_first: Duration::from_secs(1),
        retry_max: Duration::from_secs(30),
        max_memory: None,
        drain_delay: Duration::ZERO,
        primary_accepts: false,
    }
}

struct Sim {
    state: State,
    t0: Instant,
    now: Instant,
    next_pid: u32,
    /// Every action so far, in order.
    actions: Vec<Action>,
    /// Spawns answered with this error instead of a pid.
    fail_spawns: Option<SpawnError>,
    /// Pins answered with this error.
    fail_pins: Option<String>,
    exited: bool,
}

impl Sim {
    fn new(slots: usize) -> Sim {
        Sim::with(rules(), slots)
    }

    fn with(rules: Rules, slots: usize) -> Sim {
        let now = Instant::now();
        Sim {
            state: State::new(rules, slots),
            t0: now,
            now,
            next_pid: 100,
            actions: Vec::new(),
            fail_spawns: None,
            fail_pins: None,
            exited: false,
        }
    }

    /// A cluster whose every worker started and became ready.
    fn serving(slots: usize) -> Sim {
        let mut sim = Sim::new(slots);
        sim.send(Event::Start);
        sim.ready_all();
        assert!(sim.announced());
        sim
    }

    fn at_ms(&mut self, ms: u64) {
        self.now = self.t0 + Duration::from_millis(ms);
    }

    fn advance(&mut self, duration: Duration) {
        self.now += duration;
        self.send(Event::Timer);
    }

    /// Applies an event and answers the executor's part at once.
    fn send(&mut self, event: Event) -> Vec<Action> {
        let mut pending = vec![event];
        let mut all = Vec::new();
        while let Some(event) = pending.pop() {
            let actions = decide(&mut self.state, event, self.now);
            for action in &actions {
                match action {
                    Action::Spawn { id, .. } => pending.insert(
                        0,
                        match &self.fail_spawns {
                            Some(error) => Event::SpawnFailed {
                                id: *id,
                                error: error.clone(),
                            },
                            None => {
                                self.next_pid += 1;
                                Event::Spawned {
                                    id: *id,
                                    pid: self.next_pid,
                                }
                            }
                        },
                    ),
                    Action::PinBuild { generation } => pending.insert(
                        0,
                        match &self.fail_pins {
                            Some(error) => Event::BuildUnavailable {
                                generation: *generation,
                                error: error.clone(),
                            },
                            None => Event::BuildPinned {
                                generation: *generation,
                            },
                        },
                    ),
                    Action::Exit(_) => self.exited = true,
                    _ => {}
                }
            }
            all.extend(actions);
        }
        self.actions.extend(all.clone());
        all
    }

    fn ready_all(&mut self) {
        for id in self.starting() {
            self.send(Event::Ready { id });
        }
    }

    fn starting(&self) -> Vec<WorkerId> {
        self.state
            .workers()
            .filter(|w| w.phase == Phase::Starting)
            .map(|w| w.id)
            .collect()
    }

    fn current(&self, slot: usize) -> WorkerId {
        self.state.slots[slot]
            .current
            .as_ref()
            .expect("a worker")
            .id
    }

    fn current_build(&self, slot: usize) -> Build {
        self.state.slots[slot]
            .current
            .as_ref()
            .expect("a worker")
            .build
    }

    fn exit(&mut self, id: WorkerId) -> Vec<Action> {
        self.send(Event::Exited {
            id,
            how: "exited with status 1".to_owned(),
        })
    }

    /// Kills become exits, as the kernel would report them.
    fn reap_killed(&mut self) {
        let killed: Vec<WorkerId> = self
            .state
            .workers()
            .filter(|w| w.phase == Phase::Killed)
            .map(|w| w.id)
            .collect();
        for id in killed {
            self.send(Event::Exited {
                id,
                how: "was killed by SIGKILL".to_owned(),
            });
        }
    }

    /// Drained workers exit.
    fn reap_drained(&mut self) {
        let drained: Vec<WorkerId> = self
            .state
            .workers()
            .filter(|w| w.is_draining())
            .map(|w| w.id)
            .collect();
        for id in drained {
            self.send(Event::Exited {
                id,
                how: "exited with status 0".to_owned(),
            });
        }
    }

    fn announced(&self) -> bool {
        self.actions.contains(&Action::Announce)
    }

    fn logged(&self, text: &str) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Log { message, .. } if message.contains(text)))
    }

    fn spawns(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Spawn { .. }))
            .count()
    }

    fn replies(&self) -> Vec<(ReplyId, Result<String, String>)> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Reply { to, result } => Some((*to, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn plan(&self, slot: usize) -> Plan {
        self.state.slots[slot].plan
    }
}

/// Lets time pass with every ready worker beating each second.
fn run_for(sim: &mut Sim, duration: Duration) {
    let end = sim.now + duration;
    while sim.now < end {
        let step = (end - sim.now).min(Duration::from_secs(1));
        heartbeat(sim, WorkerStats::default());
        sim.advance(step);
    }
    heartbeat(sim, WorkerStats::default());
}

/// Young exits of `slot`'s worker until the slot is given up.
fn crash_loop(sim: &mut Sim, slot: usize) {
    for _ in 0..100 {
        let id = sim.current(slot);
        sim.exit(id);
        if matches!(sim.plan(slot), Plan::GivenUp { .. }) {
            return;
        }
        sim.advance(Duration::from_millis(500));
        sim.ready_all();
    }
    panic!("slot {slot} was never given up");
}

fn heartbeat(sim: &mut Sim, stats: WorkerStats) {
    for slot in 0..sim.state.slots.len() {
        if let Some(current) = &sim.state.slots[slot].current {
            let id = current.id;
            sim.send(Event::Heartbeat {
                id,
                stats: stats.clone(),
            });
        }
    }
}

#[test]
fn delays_follow_their_tables() {
    let rules = rules();
    let restart = [
        (1, 0),
        (2, 100),
        (3, 200),
        (4, 400),
        (8, 6_400),
        (9, 10_000),
        (40, 10_000),
    ];
    for (failures, ms) in restart {
        assert_eq!(
            rules.restart_delay(failures),
            Duration::from_millis(ms),
            "restart after {failures} failures"
        );
    }
    let retry = [
        (1, 1_000),
        (2, 2_000),
        (3, 4_000),
        (5, 16_000),
        (6, 30_000),
        (30, 30_000),
    ];
    for (give_ups, ms) in retry {
        assert_eq!(
            rules.retry_delay(give_ups),
            Duration::from_millis(ms),
            "retry after {give_ups} give-ups"
        );
    }
}

#[test]
fn start_fills_every_slot_and_announces_once_all_are_ready() {
    let mut sim = Sim::new(3);
    sim.send(Event::Start);
    assert_eq!(sim.spawns(), 3);
    let starting = sim.starting();
    sim.send(Event::Ready { id: starting[0] });
    sim.send(Event::Ready { id: starting[1] });
    assert!(!sim.announced(), "announced before every slot served");
    sim.send(Event::Ready { id: starting[2] });
    assert!(sim.announced());
    assert_eq!(
        sim.state.routes(),
        (0..3)
            .map(|s| Route::Serve(sim.current(s)))
            .collect::<Vec<_>>()
    );
}

#[test]
fn ready_timeout_kills_and_counts_as_a_failure() {
    let mut sim = Sim::new(1);
    sim.send(Event::Start);
    let id = sim.current(0);
    sim.advance(Duration::from_secs(9));
    assert!(!sim.actions.contains(&Action::Kill { id }));
    sim.advance(Duration::from_secs(1));
    assert!(sim.actions.contains(&Action::Kill { id }));
    assert!(sim.logged("did not become ready within 10s"));
    sim.reap_killed();
    assert_eq!(sim.state.slots[0].failures, 1);
    assert_eq!(sim.spawns(), 2, "the first restart is immediate");
}

#[test]
fn an_external_program_is_ready_once_it_stayed_up() {
    let mut rules = rules();
    rules.kind = Kind::External {
        ready_after: Duration::from_secs(1),
    };
    let mut sim = Sim::with(rules, 2);
    sim.send(Event::Start);
    sim.advance(Duration::from_millis(999));
    assert!(!sim.announced());
    sim.advance(Duration::from_millis(1));
    assert!(sim.announced());
    // No heartbeats expected from it, and it drains by signal.
    sim.advance(Duration::from_secs(60));
    assert!(!sim.actions.iter().any(|a| matches!(a, Action::Kill { .. })));
    sim.send(Event::Stop {
        why: "SIGTERM".to_owned(),
        reply: None,
    });
    assert!(sim.actions.iter().any(|a| matches!(
        a,
        Action::Drain {
            by: DrainBy::Signal,
            ..
        }
    )));
}

#[test]
fn a_missing_heartbeat_kills_and_replaces_the_worker() {
    let mut sim = Sim::serving(2);
    let hung = sim.current(1);
    sim.advance(Duration::from_secs(4));
    heartbeat(&mut sim, WorkerStats::default());
    // Slot 0 keeps beating; slot 1 (hung) already beat at 4 s, then stops.
    sim.advance(Duration::from_secs(4));
    let alive = sim.current(0);
    sim.send(Event::Heartbeat {
        id: alive,
        stats: WorkerStats::default(),
    });
    sim.advance(Duration::from_millis(1_500));
    assert!(sim.actions.contains(&Action::Kill { id: hung }));
    assert!(!sim.actions.contains(&Action::Kill { id: alive }));
    assert!(sim.logged("sent no heartbeat for 5s"));
    sim.reap_killed();
    assert_ne!(sim.current(1), hung, "replaced");
    // It had served 9.5 s, longer than --min-uptime: not a crash-loop failure.
    assert_eq!(sim.state.slots[1].failures, 0);
}

#[test]
fn exits_restart_at_once_then_back_off_then_give_up() {
    let mut sim = Sim::serving(2);
    // Five young exits in a row of slot 1: 0, 100, 200, 400 ms back-off, then given up.
    let expected = [Some(0u64), Some(100), Some(200), Some(400), None];
    for wait in expected {
        let id = sim.current(1);
        sim.exit(id);
        match wait {
            Some(0) => assert_eq!(sim.plan(1), Plan::Run),
            Some(ms) => {
                assert_eq!(
                    sim.plan(1),
                    Plan::BackOff {
                        until: sim.now + Duration::from_millis(ms)
                    }
                );
                sim.advance(Duration::from_millis(ms));
                assert_eq!(sim.plan(1), Plan::Run);
            }
            None => assert!(matches!(sim.plan(1), Plan::GivenUp { .. })),
        }
        sim.ready_all();
    }
    assert!(sim.logged("crash loop"));
    assert!(
        !sim.exited,
        "a served cluster never exits because of workers"
    );
    // A given-up slot parks nothing.
    assert_eq!(sim.state.routes()[1], Route::Away);
}

#[test]
fn a_stable_run_resets_the_crash_count() {
    let mut sim = Sim::serving(1);
    for _ in 0..3 {
        let id = sim.current(0);
        sim.exit(id);
        sim.advance(Duration::from_secs(1));
        sim.ready_all();
    }
    assert_eq!(sim.state.slots[0].failures, 3);
    run_for(&mut sim, Duration::from_secs(6));
    let id = sim.current(0);
    sim.exit(id);
    assert_eq!(
        sim.state.slots[0].failures, 0,
        "it had served past --min-uptime"
    );
    assert_eq!(sim.plan(0), Plan::Run, "restarted at once");
}

#[test]
fn a_given_up_slot_is_retried_on_a_capped_back_off() {
    let mut sim = Sim::serving(2);
    crash_loop(&mut sim, 1);
    let mut delays = Vec::new();
    for _ in 0..7 {
        let Plan::GivenUp { retry_at } = sim.plan(1) else {
            panic!("given up: {:?}", sim.plan(1));
        };
        delays.push(retry_at.duration_since(sim.now).as_secs());
        sim.now = retry_at;
        sim.send(Event::Timer);
        assert_eq!(sim.plan(1), Plan::Run, "retried");
        // One more young failure gives it up again, for longer.
        let id = sim.current(1);
        sim.exit(id);
    }
    assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
    // Once it serves again it stays.
    sim.now = match sim.plan(1) {
        Plan::GivenUp { retry_at } => retry_at,
        other => panic!("{other:?}"),
    };
    sim.send(Event::Timer);
    sim.ready_all();
    assert!(sim.state.slots[1].is_serving());
    assert!(matches!(sim.state.routes()[1], Route::Serve(_)));
}

#[test]
fn a_crash_loop_before_serving_is_a_fatal_error() {
    let mut sim = Sim::new(2);
    sim.send(Event::Start);
    for _ in 0..40 {
        if sim.exited {
            break;
        }
        for id in sim.starting() {
            sim.exit(id);
        }
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.exited);
    assert!(sim
        .actions
        .iter()
        .any(|a| matches!(a, Action::Exit(Err(_)))));
    assert!(!sim.announced());
}

#[test]
fn one_slot_in_a_crash_loop_at_start_still_announces() {
    let mut sim = Sim::new(2);
    sim.send(Event::Start);
    let first = sim.current(0);
    sim.send(Event::Ready { id: first });
    for _ in 0..40 {
        if matches!(sim.plan(1), Plan::GivenUp { .. }) {
            break;
        }
        if let Some(worker) = &sim.state.slots[1].current {
            let id = worker.id;
            sim.exit(id);
        }
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.announced());
    assert!(!sim.exited);
}

#[test]
fn spawn_errors_back_off_and_never_count_as_crashes() {
    let mut sim = Sim::serving(2);
    sim.fail_spawns = Some(SpawnError {
        message: "Too many open files (os error 24)".to_owned(),
        transient: true,
    });
    let id = sim.current(1);
    sim.exit(id);
    for _ in 0..20 {
        let Plan::BackOff { until } = sim.plan(1) else {
            panic!("backing off: {:?}", sim.plan(1));
        };
        sim.now = until;
        sim.send(Event::Timer);
    }
    assert_eq!(sim.state.slots[1].spawn_failures, 21);
    assert_eq!(sim.state.slots[1].failures, 1, "only the exit counted");
    assert!(sim.logged("not counted as a crash"));
    sim.fail_spawns = None;
    let Plan::BackOff { until } = sim.plan(1) else {
        panic!()
    };
    sim.now = until;
    sim.send(Event::Timer);
    sim.ready_all();
    assert!(sim.state.slots[1].is_serving());
    assert_eq!(sim.state.slots[1].spawn_failures, 0);
}

#[test]
fn a_hard_spawn_error_counts_towards_the_crash_loop() {
    let mut sim = Sim::new(1);
    sim.fail_spawns = Some(SpawnError {
        message: "No such file or directory (os error 2)".to_owned(),
        transient: false,
    });
    sim.send(Event::Start);
    for _ in 0..40 {
        if sim.exited {
            break;
        }
        sim.advance(Duration::from_secs(1));
    }
    assert!(
        sim.exited,
        "a program that cannot start at all is fatal at start-up"
    );
}

#[test]
fn drain_deadline_kills_stragglers_and_stop_exits_when_all_are_gone() {
    let mut sim = Sim::serving(2);
    sim.send(Event::Stop {
        why: "SIGTERM".to_owned(),
        reply: None,
    });
    let drains = sim
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Drain { backlog: true, .. }))
        .count();
    assert_eq!(drains, 2, "every worker takes its backlog before it drains");
    let first = sim.current(0);
    sim.send(Event::Exited {
        id: first,
        how: "exited with status 0".to_owned(),
    });
    assert!(!sim.exited);
    sim.advance(Duration::from_secs(30));
    let straggler = sim.current(1);
    assert!(sim.actions.contains(&Action::Kill { id: straggler }));
    sim.reap_killed();
    assert!(sim.actions.contains(&Action::Exit(Ok(()))));
    assert_eq!(sim.spawns(), 2, "nothing restarted while stopping");
}

/// At a stop, whoever accepts makes the sockets refuse new connections once
/// its queue is empty: corral workers take their backlog first and shut
/// their sockets themselves; the primary shuts them before anyone drains
/// when it accepts itself, or when the workers are external programs.
#[test]
fn a_stop_has_the_sockets_stop_listening_after_the_queues_are_taken() {
    let external = Kind::External {
        ready_after: Duration::from_millis(100),
    };
    // (kind, the primary accepts, the primary stops listening, drains take the backlog)
    let table = [
        (Kind::Corral, false, false, true),
        (Kind::Corral, true, true, true),
        (external, false, true, false),
        (external, true, true, false),
    ];
    for (kind, primary_accepts, stops_listening, backlog) in table {
        let case = format!("{kind:?}, primary accepts: {primary_accepts}");
        let mut rules = rules();
        rules.kind = kind;
        rules.primary_accepts = primary_accepts;
        let mut sim = Sim::with(rules, 2);
        sim.send(Event::Start);
        sim.ready_all();
        sim.advance(Duration::from_secs(1));
        let actions = sim.send(Event::Stop {
            why: "SIGTERM".to_owned(),
            reply: None,
        });
        let stop_listening = actions.iter().position(|a| *a == Action::StopListening);
        let drains: Vec<(usize, bool)> = actions
            .iter()
            .enumerate()
            .filter_map(|(at, a)| match a {
                Action::Drain { backlog, .. } => Some((at, *backlog)),
                _ => None,
            })
            .collect();
        assert_eq!(drains.len(), 2, "{case}: {actions:?}");
        assert!(
            drains.iter().all(|(_, b)| *b == backlog),
            "{case}: {actions:?}"
        );
        assert_eq!(
            stop_listening.is_some(),
            stops_listening,
            "{case}: {actions:?}"
        );
        if let Some(at) = stop_listening {
            assert!(at < drains[0].0, "{case}: before any drain");
        }
    }
}

#[test]
fn recycling_starts_a_replacement_before_draining_the_old_worker() {
    let mut rules = rules();
    rules.max_memory = Some(100 << 20);
    let mut sim = Sim::with(rules, 1);
    sim.send(Event::Start);
    sim.ready_all();
    let old = sim.current(0);
    let fat = WorkerStats {
        rss_bytes: 200 << 20,
        ..WorkerStats::default()
    };
    sim.send(Event::Heartbeat {
        id: old,
        stats: fat,
    });
    assert!(sim.logged("over the limit of 100 MiB"));
    assert_eq!(sim.state.slots[0].state(), SlotState::Replacing);
    assert!(!sim
        .actions
        .iter()
        .any(|a| matches!(a, Action::Drain { .. })));
    sim.ready_all();
    assert!(sim.actions.contains(&Action::Drain {
        id: old,
        by: DrainBy::Message,
        backlog: false
    }));
    assert_ne!(sim.current(0), old);
    // A request-count recycle of the new worker works the same way.
    let new = sim.current(0);
    sim.send(Event::RecycleRequested {
        id: new,
        reason: "served 1000 requests".to_owned(),
    });
    assert_eq!(sim.state.slots[0].state(), SlotState::Replacing);
}

#[test]
fn a_worker_that_cannot_take_connections_is_replaced() {
    let mut sim = Sim::serving(1);
    let stuck = sim.current(0);
    let blocked = WorkerStats {
        intake_blocked_ms: 4_000,
        ..WorkerStats::default()
    };
    sim.send(Event::Heartbeat {
        id: stuck,
        stats: blocked.clone(),
    });
    assert_eq!(sim.state.slots[0].state(), SlotState::Serving, "not yet");
    let blocked = WorkerStats {
        intake_blocked_ms: 5_000,
        ..blocked
    };
    sim.send(Event::Heartbeat {
        id: stuck,
        stats: blocked,
    });
    assert_eq!(sim.state.slots[0].state(), SlotState::Replacing);
    assert!(sim.logged("could not take connections"));
}

#[test]
fn a_broken_channel_kills_the_worker_and_it_is_replaced() {
    let mut sim = Sim::serving(1);
    let id = sim.current(0);
    sim.send(Event::ChannelBroken {
        id,
        reason: "bad frame".to_owned(),
    });
    assert!(sim.actions.contains(&Action::Kill { id }));
    sim.reap_killed();
    assert_ne!(sim.current(0), id);
}

#[test]
fn reload_moves_one_slot_at_a_time_behind_the_gate() {
    let mut sim = Sim::serving(3);
    sim.send(Event::Reload {
        reply: Some(ReplyId(7)),
    });
    // Exactly one slot is being replaced at any moment, in slot order.
    let mut order = Vec::new();
    for _ in 0..3 {
        let replacing: Vec<usize> = sim
            .state
            .slots
            .iter()
            .filter(|s| s.incoming.is_some())
            .map(|s| s.index)
            .collect();
        assert_eq!(replacing.len(), 1, "{replacing:?}");
        order.push(replacing[0]);
        sim.ready_all();
        // Not yet: the new worker must stay ready for the gate.
        sim.advance(Duration::from_millis(1_999));
        assert!(sim.state.slots.iter().all(|s| s.incoming.is_none()));
        sim.advance(Duration::from_millis(1));
    }
    assert_eq!(order, [0, 1, 2]);
    assert!((0..3).all(|slot| sim.current_build(slot) == 2));
    // The caller hears once the new workers outlived --min-uptime.
    assert!(sim.replies().is_empty());
    run_for(&mut sim, Duration::from_secs(5));
    assert_eq!(
        sim.state.last_reload,
        Some(LastReload {
            outcome: state::ReloadOutcome::Completed,
            generation: 2,
            reason: None
        })
    );
    assert_eq!(sim.replies(), [(ReplyId(7), Ok("generation 2".to_owned()))]);
    // Three old workers drained.
    sim.reap_drained();
    assert_eq!(sim.state.workers().count(), 3);
}

#[test]
fn a_build_that_dies_soon_after_ready_is_rolled_back() {
    let mut rules = rules();
    rules.reload_gate = Duration::ZERO;
    let mut sim = Sim::with(rules, 2);
    sim.send(Event::Start);
    sim.ready_all();
    run_for(&mut sim, Duration::from_secs(10));
    sim.send(Event::Reload {
        reply: Some(ReplyId(1)),
    });
    // With no gate both slots move at once, one after the other.
    sim.ready_all();
    sim.ready_all();
    assert!((0..2).all(|slot| sim.current_build(slot) == 2));
    assert!(
        sim.replies().is_empty(),
        "not before --min-uptime has passed"
    );
    sim.reap_drained();
    // 1.5 s later the new generation dies: still within --min-uptime.
    sim.advance(Duration::from_millis(1_500));
    let dying = sim.current(0);
    sim.exit(dying);
    assert!(
        sim.logged("rolling 1 slots back to generation 1"),
        "{:?}",
        sim.actions
    );
    // Slot 0 restarts on the old generation at once; slot 1 goes back via a replacement.
    assert_eq!(sim.current_build(0), 1);
    sim.ready_all();
    sim.ready_all();
    assert!((0..2).all(|slot| sim.current_build(slot) == 1));
    assert!(sim.logged("rolled back to generation 1"));
    assert_eq!(
        sim.state.last_reload.as_ref().map(|r| r.outcome),
        Some(state::ReloadOutcome::RolledBack)
    );
    assert!(!sim.exited);
    assert_eq!(
        sim.state.slots[0].failures, 0,
        "the build's fault, not the slot's"
    );
    assert!(sim.actions.contains(&Action::ForgetBuild { generation: 2 }));
    let replies = sim.replies();
    assert!(
        matches!(&replies[..], [(ReplyId(1), Err(e))] if e.contains("rolled back to generation 1")),
        "{replies:?}"
    );
}

#[test]
fn a_build_that_dies_during_the_gate_fails_the_reload_and_moves_back() {
    let mut sim = Sim::serving(2);
    run_for(&mut sim, Duration::from_secs(10));
    sim.send(Event::Reload {
        reply: Some(ReplyId(3)),
    });
    sim.ready_all();
    assert_eq!(sim.current_build(0), 2);
    sim.reap_drained();
    sim.advance(Duration::from_millis(1_500));
    let dying = sim.current(0);
    sim.exit(dying);
    // Slot 1 never moved; slot 0 restarts on generation 1.
    assert_eq!(sim.current_build(1), 1);
    assert_eq!(sim.state.slots[0].current.as_ref().unwrap().build, 1);
    assert!(sim.state.slots[1].incoming.is_none());
    let replies = sim.replies();
    assert_eq!(replies.len(), 1);
    assert!(replies[0].1.as_ref().unwrap_err().contains("reload failed"));
    assert_eq!(
        sim.state.last_reload.as_ref().map(|r| r.outcome),
        Some(state::ReloadOutcome::Failed)
    );
}

#[test]
fn a_build_that_exits_at_start_fails_the_reload_and_the_old_workers_serve() {
    let mut sim = Sim::serving(2);
    let old: Vec<WorkerId> = (0..2).map(|s| sim.current(s)).collect();
    sim.send(Event::Reload {
        reply: Some(ReplyId(9)),
    });
    let incoming = sim.state.slots[0].incoming.as_ref().unwrap().id;
    sim.exit(incoming);
    assert_eq!((0..2).map(|s| sim.current(s)).collect::<Vec<_>>(), old);
    assert!(sim.state.reload.is_none());
    assert!(sim.state.slots.iter().all(|s| s.build == 1));
    let last = sim.state.last_reload.clone().unwrap();
    assert_eq!(last.outcome, state::ReloadOutcome::Failed);
    assert_eq!(last.generation, 2);
    assert!(last.reason.unwrap().contains("before it was ready"));
    assert!(matches!(&sim.replies()[..], [(ReplyId(9), Err(_))]));
    // Later crashes restart the old generation, never the failed one.
    sim.exit(old[1]);
    assert_eq!(sim.state.slots[1].current.as_ref().unwrap().build, 1);
}

#[test]
fn restarts_run_the_slots_own_generation() {
    let mut rules = rules();
    rules.reload_gate = Duration::from_secs(60);
    let mut sim = Sim::with(rules, 2);
    sim.send(Event::Start);
    sim.ready_all();
    run_for(&mut sim, Duration::from_secs(10));
    sim.send(Event::Reload { reply: None });
    sim.ready_all();
    // Mid-reload: slot 0 runs 2, slot 1 still 1. A crash of slot 1 restarts 1.
    let id = sim.current(1);
    sim.exit(id);
    let restarted = sim
        .actions
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::Spawn { id, build } if id.slot == 1 => Some(*build),
            _ => None,
        })
        .unwrap();
    assert_eq!(restarted, 1);
}

#[test]
fn a_reload_is_the_way_to_retry_a_given_up_slot_too() {
    let mut sim = Sim::serving(2);
    crash_loop(&mut sim, 1);
    sim.send(Event::Reload { reply: None });
    sim.ready_all();
    sim.advance(Duration::from_secs(2));
    sim.ready_all();
    assert_eq!(sim.plan(1), Plan::Run);
    assert!(sim.state.slots[1].is_serving());
}

#[test]
fn an_unreadable_program_fails_the_reload_at_once() {
    let mut sim = Sim::serving(1);
    sim.fail_pins = Some("No such file or directory (os error 2)".to_owned());
    sim.send(Event::Reload {
        reply: Some(ReplyId(1)),
    });
    assert!(sim.state.reload.is_none());
    assert!(
        matches!(&sim.replies()[..], [(ReplyId(1), Err(e))] if e.contains("cannot read the program"))
    );
    assert_eq!(sim.spawns(), 1);
}

#[test]
fn scaling_adds_slots_at_the_top_and_retires_from_the_top() {
    let mut sim = Sim::serving(2);
    sim.send(Event::Scale {
        target: ScaleTarget::To(4),
        reply: Some(ReplyId(1)),
    });
    assert_eq!(sim.state.slots.len(), 4);
    assert!(sim.replies().is_empty(), "not before the new workers serve");
    sim.ready_all();
    assert_eq!(
        sim.replies(),
        [(ReplyId(1), Ok("4 serving workers".to_owned()))]
    );
    sim.send(Event::Scale {
        target: ScaleTarget::By(-3),
        reply: Some(ReplyId(2)),
    });
    // The three highest drain, accepting their queued connections first.
    let retired: Vec<usize> = sim
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Drain {
                id, backlog: true, ..
            } => Some(id.slot),
            _ => None,
        })
        .collect();
    assert_eq!(retired, [3, 2, 1]);
    assert_eq!(
        &sim.state.routes()[1..],
        [Route::Away, Route::Away, Route::Away]
    );
    assert_eq!(sim.replies().len(), 1, "waits for the drained workers");
    sim.reap_drained();
    assert_eq!(sim.state.slots.len(), 1);
    assert_eq!(
        sim.replies()[1],
        (ReplyId(2), Ok("1 serving workers".to_owned()))
    );
    // Never below one.
    sim.send(Event::Scale {
        target: ScaleTarget::By(-1),
        reply: None,
    });
    assert_eq!(sim.state.active_slots(), 1);
}

#[test]
fn routes_hold_a_restarting_slot_and_send_a_backing_off_one_away() {
    let mut sim = Sim::serving(2);
    let id = sim.current(1);
    sim.exit(id);
    // Restarted at once: its connections wait a few milliseconds for it.
    assert_eq!(sim.state.routes()[1], Route::Hold);
    sim.ready_all();
    let id = sim.current(1);
    sim.exit(id);
    // Second young failure: a back-off, so nothing parks there.
    assert!(matches!(sim.plan(1), Plan::BackOff { .. }));
    assert_eq!(sim.state.routes()[1], Route::Away);
    // A reload keeps every slot in the set.
    let mut sim = Sim::serving(2);
    sim.send(Event::Reload { reply: None });
    assert!(sim
        .state
        .routes()
        .iter()
        .all(|route| matches!(route, Route::Serve(_))));
}

#[test]
fn the_next_deadline_is_the_earliest_rule_due() {
    let mut sim = Sim::serving(1);
    let ready_at = sim.now;
    assert_eq!(
        sim.state.next_deadline(),
        Some(ready_at + Duration::from_secs(5)),
        "the heartbeat deadline"
    );
    let id = sim.current(0);
    sim.exit(id);
    sim.ready_all();
    let id = sim.current(0);
    sim.exit(id);
    assert_eq!(
        sim.state.next_deadline(),
        Some(sim.now + Duration::from_millis(100)),
        "the back-off"
    );
}

#[test]
fn a_second_sigint_kills_everything() {
    let mut sim = Sim::serving(2);
    for _ in 0..2 {
        sim.send(Event::Stop {
            why: "SIGINT".to_owned(),
            reply: None,
        });
    }
    let kills = sim
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Kill { .. }))
        .count();
    assert_eq!(kills, 2);
}

#[test]
fn events_for_unknown_workers_are_ignored() {
    let mut sim = Sim::serving(1);
    let ghost = WorkerId {
        slot: 0,
        serial: 99,
    };
    let before = sim.state.workers().count();
    for event in [
        Event::Ready { id: ghost },
        Event::Exited {
            id: ghost,
            how: "x".to_owned(),
        },
        Event::ChannelBroken {
            id: ghost,
            reason: "x".to_owned(),
        },
    ] {
        assert!(sim
            .send(event)
            .iter()
            .all(|a| !matches!(a, Action::Spawn { .. } | Action::Kill { .. })));
    }
    assert_eq!(sim.state.workers().count(), before);
    sim.at_ms(0);
}

/// `--drain-delay`: the workers hear the node drains at once and keep
/// serving (routes unchanged) until the delay is over or a second stop
/// request cuts it short; then today's graceful stop follows.
#[test]
fn drain_delay_holds_the_drain_back_and_a_second_stop_cuts_it_short() {
    // (drain delay, a second stop at, when the workers must be told to drain), in ms
    let table: [(u64, Option<u64>, u64); 4] = [
        (0, None, 0),
        (2000, None, 2000),
        (2000, Some(500), 500),
        (300, Some(1000), 300),
    ];
    for (delay, second, expected) in table {
        let mut rules = rules();
        rules.drain_delay = Duration::from_millis(delay);
        let mut sim = Sim::with(rules, 2);
        sim.send(Event::Start);
        sim.ready_all();
        let serving = sim.state.routes();
        let stop_at = sim.now;
        let first = sim.send(Event::Stop {
            why: "SIGTERM".to_owned(),
            reply: None,
        });
        let notified: Vec<WorkerId> = first
            .iter()
            .filter_map(|a| match a {
                Action::NotifyDraining { id } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(
            notified,
            vec![sim.current(0), sim.current(1)],
            "delay {delay}"
        );
        let mut drained_at = None;
        let mut elapsed = 0;
        while elapsed <= 3000 {
            let drains = sim
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Drain { .. }))
                .count();
            if drains > 0 {
                assert_eq!(drains, 2, "delay {delay}: every worker drains");
                drained_at.get_or_insert(elapsed);
            } else {
                assert_eq!(sim.state.routes(), serving, "delay {delay}: still serving");
                assert!(!sim.state.stopping);
                assert_eq!(
                    sim.state.next_deadline(),
                    Some(stop_at + Duration::from_millis(delay)),
                    "the executor wakes when the delay ends"
                );
            }
            elapsed += 100;
            sim.at_ms(elapsed);
            if second == Some(elapsed) {
                sim.send(Event::Stop {
                    why: "SIGTERM".to_owned(),
                    reply: None,
                });
            } else {
                sim.send(Event::Timer);
            }
        }
        assert_eq!(
            drained_at,
            Some(expected),
            "delay {delay}, second {second:?}"
        );
        assert_eq!(
            sim.logged("again during the drain delay: stopping now"),
            second.is_some_and(|at| at < delay),
            "delay {delay}, second {second:?}"
        );
        assert!(
            !sim.actions.iter().any(|a| matches!(a, Action::Kill { .. })),
            "a second SIGTERM during the delay drains, it does not kill"
        );
        sim.reap_drained();
        assert!(
            sim.exited,
            "delay {delay}: the primary exits once all drained"
        );
    }
}

#[test]
fn during_the_drain_delay_no_reload_or_scale_starts_and_a_restart_is_told_too() {
    let mut rules = rules();
    rules.drain_delay = Duration::from_secs(5);
    let mut sim = Sim::with(rules, 2);
    sim.send(Event::Start);
    sim.ready_all();
    sim.send(Event::Stop {
        why: "corral stop".to_owned(),
        reply: Some(ReplyId(1)),
    });
    sim.send(Event::Reload {
        reply: Some(ReplyId(2)),
    });
    sim.send(Event::Scale {
        target: ScaleTarget::By(1),
        reply: Some(ReplyId(3)),
    });
    assert_eq!(
        sim.replies(),
        vec![
            (ReplyId(1), Ok("stopping".to_owned())),
            (ReplyId(2), Err("the cluster is stopping".to_owned())),
            (ReplyId(3), Err("the cluster is stopping".to_owned())),
        ]
    );
    assert_eq!(sim.spawns(), 2);
    // A worker that crashes during the delay is replaced (the node still
    // serves), and its replacement hears the node is draining.
    sim.advance(Duration::from_secs(1));
    let crashed = sim.current(1);
    sim.exit(crashed);
    assert_eq!(sim.spawns(), 3);
    let replacement = sim.current(1);
    assert!(sim
        .actions
        .contains(&Action::NotifyDraining { id: replacement }));
    sim.ready_all();
    sim.advance(Duration::from_secs(4));
    assert!(sim.state.stopping);
    assert!(sim.actions.contains(&Action::Drain {
        id: replacement,
        by: DrainBy::Message,
        backlog: true
    }));
}

#[test]
fn an_external_program_is_not_told_but_its_sigterm_waits_for_the_delay() {
    let mut rules = rules();
    rules.kind = Kind::External {
        ready_after: Duration::from_secs(1),
    };
    rules.drain_delay = Duration::from_secs(2);
    let mut sim = Sim::with(rules, 1);
    sim.send(Event::Start);
    sim.advance(Duration::from_secs(1));
    assert!(sim.announced());
    sim.send(Event::Stop {
        why: "SIGTERM".to_owned(),
        reply: None,
    });
    sim.advance(Duration::from_millis(1999));
    let signalled = |sim: &Sim| {
        sim.actions.iter().any(|a| {
            matches!(
                a,
                Action::Drain {
                    by: DrainBy::Signal,
                    ..
                }
            )
        })
    };
    assert!(!signalled(&sim));
    sim.advance(Duration::from_millis(1));
    assert!(signalled(&sim));
    assert!(!sim
        .actions
        .iter()
        .any(|a| matches!(a, Action::NotifyDraining { .. })));
}
