//! Real clusters of the `hello` example: real processes, sockets and signals.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{Cluster, KeepAliveClient};

#[test]
fn cluster_every_worker_serves_the_one_port() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let mut slots = BTreeMap::new();
    for _ in 0..200 {
        let (slot, pid) = cluster.hello().expect("GET /");
        slots.insert(slot, pid);
    }
    assert_eq!(
        slots.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "{slots:?}"
    );
    let pids: BTreeSet<i32> = slots.values().copied().collect();
    assert_eq!(pids.len(), 2);
    assert_eq!(
        cluster.worker_pids().into_iter().collect::<BTreeSet<_>>(),
        pids,
        "the answering pids are the primary's workers"
    );
}

#[test]
fn cluster_several_listen_addresses_are_all_served() {
    let (mut child, _log) = support::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
    ]);
    let stdout = child.0.stdout.take().unwrap();
    let lines: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .take(2)
        .map(|line| line.unwrap())
        .collect();
    let addrs: Vec<std::net::SocketAddr> = lines
        .iter()
        .map(|line| support::listening_addr(line).unwrap())
        .collect();
    assert_ne!(addrs[0], addrs[1]);
    for addr in &addrs {
        let (status, body) = support::get_once(*addr, "/").unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("hello from worker"), "{body}");
    }
}

#[test]
fn cluster_killed_worker_is_replaced_and_later_requests_succeed() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let mut by_slot = BTreeMap::new();
    while by_slot.len() < 2 {
        let (slot, pid) = cluster.hello().unwrap();
        by_slot.insert(slot, pid);
    }
    let victim = by_slot[&0];

    // A client keeps sending while the worker dies.
    let stop = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(AtomicBool::new(false));
    let failures_after_kill = Arc::new(Mutex::new(Vec::new()));
    let served_after_kill = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, after_kill, failures, served) = (
            stop.clone(),
            after_kill.clone(),
            failures_after_kill.clone(),
            served_after_kill.clone(),
        );
        let addr = cluster.addr;
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let started_after_kill = after_kill.load(Ordering::SeqCst);
                let result = support::get_once(addr, "/");
                if started_after_kill {
                    match result {
                        Ok((200, _)) => {
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(support::wait_until(Duration::from_secs(10), || {
        !support::process_alive(victim)
    }));
    after_kill.store(true, Ordering::SeqCst);

    let refilled = support::wait_until(
        Duration::from_secs(20),
        || matches!(cluster.hello(), Ok((0, pid)) if pid != victim),
    );
    assert!(
        refilled,
        "slot 0 was not refilled; log:\n{}",
        cluster.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();

    let failures = failures_after_kill.lock().unwrap();
    assert!(
        failures.is_empty(),
        "requests failed after the kill: {failures:?}"
    );
    assert!(served_after_kill.load(Ordering::SeqCst) > 0);
    assert_eq!(cluster.worker_pids().len(), 2);
}

#[test]
fn cluster_sighup_reloads_every_worker_with_zero_failed_requests() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let before: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    assert_eq!(before.len(), 2);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered_by = Arc::new(Mutex::new(BTreeSet::<i32>::new()));
    let served = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for keep_alive in [false, false, true, true] {
        let (stop, failures, answered_by, served) = (
            stop.clone(),
            failures.clone(),
            answered_by.clone(),
            served.clone(),
        );
        let addr = cluster.addr;
        clients.push(std::thread::spawn(move || {
            let mut client = KeepAliveClient::new(addr);
            while !stop.load(Ordering::SeqCst) {
                let result = if keep_alive {
                    client.get("/")
                } else {
                    support::get_once(addr, "/")
                };
                match result.and_then(|(status, body)| support::parse_hello(status, &body)) {
                    Ok((_, pid)) => {
                        answered_by.lock().unwrap().insert(pid);
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => failures
                        .lock()
                        .unwrap()
                        .push(format!("keep_alive={keep_alive}: {err}")),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    cluster.signal(Signal::SIGHUP);
    let replaced = support::wait_until(Duration::from_secs(30), || {
        let now: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
        now.len() == 2 && now.is_disjoint(&before)
    });
    assert!(
        replaced,
        "workers were not all replaced; log:\n{}",
        cluster.stderr()
    );
    // Keep sending while the old workers finish draining.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let after: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    let answered_by = answered_by.lock().unwrap();
    assert!(
        answered_by.is_superset(&after),
        "new workers served: {answered_by:?} vs {after:?}"
    );
    assert!(served.load(Ordering::SeqCst) > 100);
}

#[test]
fn cluster_sigterm_finishes_in_flight_requests_and_leaves_no_process() {
    let mut cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let addr = cluster.addr;
    // Connect and send first, so every request is queued before the signal...
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(
                &mut stream,
                format!("GET /block?ms=1500 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            stream
        })
        .collect();
    // ...and wait until the workers have accepted all of them (the listening
    // sockets' accept queues are empty), so they are in flight, not queued.
    assert!(support::wait_until(
        Duration::from_secs(10),
        || support::accept_queue_len(addr.port()) == 0
    ));
    let in_flight: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut response = String::new();
                std::io::Read::read_to_string(&mut stream, &mut response)?;
                support::parse_response(&response)
            })
        })
        .collect();
    cluster.signal(Signal::SIGTERM);
    for request in in_flight {
        let (status, body) = request
            .join()
            .unwrap()
            .expect("in-flight request completes");
        assert_eq!(status, 200);
        assert!(
            body.contains("blocked the event loop for 1500 ms"),
            "{body}"
        );
    }
    let status = cluster.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", cluster.stderr());
    let pgid = cluster.pid();
    assert!(
        support::wait_until(Duration::from_secs(5), || support::group_members(pgid)
            .is_empty()),
        "processes left behind: {:?}",
        support::group_members(pgid)
    );
}

/// How one connection attempt during a stop ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attempt {
    Answered,
    Refused,
    /// Connected and sent its request, then reset or closed unanswered.
    Lost,
}

fn attempt(addr: std::net::SocketAddr) -> Attempt {
    use std::io::{Read, Write};
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(stream) => stream,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => return Attempt::Refused,
        Err(_) => return Attempt::Lost,
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    match stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_string(&mut response))
    {
        Ok(_) if response.starts_with("HTTP/1.1 200") => Attempt::Answered,
        _ => Attempt::Lost,
    }
}

/// A stopping node stops listening before its workers stop accepting: a
/// client connecting during the drain is refused (and can go elsewhere), and
/// is never left in a queue that no one accepts, to be reset when the
/// primary exits after it sent its request.
#[test]
fn cluster_sigterm_refuses_new_connections_instead_of_resetting_them() {
    for balance in ["reuseport", "round-robin"] {
        let mut cluster = Cluster::start(&[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            balance,
        ]);
        let addr = cluster.addr;
        // Requests that keep the drain, and so the primary, alive for a while.
        let blocked: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    support::get_once(addr, "/block?ms=1000").map(|(status, _)| status)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let stopping = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let during_stop = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (stopping, done, during_stop) =
                    (stopping.clone(), done.clone(), during_stop.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let started_during_stop = stopping.load(Ordering::SeqCst);
                        let outcome = attempt(addr);
                        if started_during_stop {
                            during_stop.lock().unwrap().push(outcome);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        stopping.store(true, Ordering::SeqCst);
        cluster.signal(Signal::SIGTERM);
        let status = cluster.wait_exit(Duration::from_secs(30));
        done.store(true, Ordering::SeqCst);
        for client in clients {
            client.join().unwrap();
        }
        for request in blocked {
            assert_eq!(request.join().unwrap().expect("in-flight request"), 200);
        }
        assert_eq!(status.code(), Some(0), "log:\n{}", cluster.stderr());
        let outcomes = during_stop.lock().unwrap().clone();
        let count = |kind| outcomes.iter().filter(|o| **o == kind).count();
        // The clients really connected throughout the drain.
        assert!(count(Attempt::Refused) >= 10, "{balance}: {outcomes:?}");
        assert_eq!(count(Attempt::Lost), 0, "{balance}: {outcomes:?}");
    }
}

#[test]
fn cluster_hung_worker_is_caught_by_the_heartbeat_and_replaced() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--heartbeat-timeout",
        "1s",
    ]);
    let (_, hung) = cluster.hello().unwrap();
    let addr = cluster.addr;
    let blocker = std::thread::spawn(move || support::get_once(addr, "/block?ms=20000"));
    let replaced = support::wait_until(
        Duration::from_secs(15),
        || matches!(cluster.hello(), Ok((0, pid)) if pid != hung),
    );
    assert!(
        replaced,
        "the hung worker was not replaced; log:\n{}",
        cluster.stderr()
    );
    assert!(!support::process_alive(hung));
    assert!(
        cluster.stderr().contains("sent no heartbeat"),
        "{}",
        cluster.stderr()
    );
    // The blocked request died with its worker.
    assert!(blocker.join().unwrap().is_err());
}

#[test]
fn cluster_garbage_on_a_worker_channel_is_survived() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--fault",
        "ipc-garbage",
    ]);
    assert!(
        support::wait_until(Duration::from_secs(10), || cluster
            .stderr()
            .contains("broke its IPC channel")),
        "log:\n{}",
        cluster.stderr()
    );
    // Slot 0 is refilled and both slots answer; the primary is still there.
    let mut slots = BTreeSet::new();
    assert!(support::wait_until(Duration::from_secs(10), || {
        if let Ok((slot, _)) = cluster.hello() {
            slots.insert(slot);
        }
        slots.len() == 2
    }));
    assert!(support::process_alive(cluster.pid()));
    assert!(cluster.stderr().contains("slot 0: started worker"));
}

#[test]
fn cluster_crash_loop_is_retried_with_back_off_then_reported() {
    let (mut child, log) = support::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--fault",
        "crash-on-start",
    ]);
    let status = support::wait_child(&mut child.0, Duration::from_secs(30))
        .expect("the primary gives up instead of restarting forever");
    assert_eq!(status.code(), Some(1));
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert!(log.matches("started worker").count() >= 3, "{log}");
    assert!(log.contains("restarting it in"), "no back-off: {log}");
    assert!(log.contains("crash loop"), "{log}");
}

#[test]
fn cluster_worker_that_never_becomes_ready_is_killed_and_reported() {
    let (mut child, log) = support::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--ready-timeout",
        "300ms",
        "--fault",
        "never-ready",
    ]);
    let status = support::wait_child(&mut child.0, Duration::from_secs(60))
        .expect("the primary gives up instead of waiting forever");
    assert_ne!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert!(log.contains("did not become ready within 300ms"), "{log}");
    assert!(log.contains("crash loop"), "{log}");
}

#[test]
fn cluster_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (mut child, log) = support::spawn(&["--listen", &addr, "--workers", "2"]);
    let status = support::wait_child(&mut child.0, Duration::from_secs(20)).expect("exits");
    assert_ne!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert!(log.contains("already in use"), "{log}");
}

#[test]
fn cluster_unknown_flag_is_a_usage_error() {
    let (mut child, log) = support::spawn(&["--listen", "127.0.0.1:0", "--no-such-flag"]);
    let status = support::wait_child(&mut child.0, Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(2));
    std::thread::sleep(Duration::from_millis(100));
    assert!(log.lock().unwrap().contains("--no-such-flag"));
}

#[test]
fn cluster_worker_messages_reach_the_primary_handler_in_order() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    for n in 0..20 {
        let (status, body) = cluster.get(&format!("/notify?text=ping-{n}")).unwrap();
        assert_eq!((status, body.as_str()), (200, "sent\n"));
    }
    assert!(support::wait_until(Duration::from_secs(10), || cluster
        .stdout()
        .iter()
        .filter(|line| line.contains("says \"ping-"))
        .count()
        == 20));
    // Ordered per sender: each worker's pings arrive in increasing order.
    let mut per_worker: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for line in cluster.stdout() {
        let Some((who, said)) = line.split_once(" says ") else {
            continue;
        };
        let n = said
            .trim_matches('"')
            .trim_start_matches("ping-")
            .parse()
            .unwrap();
        per_worker.entry(who.to_owned()).or_default().push(n);
    }
    assert_eq!(per_worker.values().map(Vec::len).sum::<usize>(), 20);
    for (who, numbers) in &per_worker {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "{who}: {numbers:?}"
        );
    }
}

#[test]
fn cluster_worker_is_recycled_after_max_requests() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--max-requests",
        "20",
    ]);
    let (_, first) = cluster.hello().unwrap();
    let mut failures = 0;
    let recycled = support::wait_until(Duration::from_secs(20), || match cluster.hello() {
        Ok((_, pid)) => pid != first,
        Err(_) => {
            failures += 1;
            false
        }
    });
    assert!(recycled, "log:\n{}", cluster.stderr());
    assert_eq!(failures, 0, "requests failed while recycling");
    assert!(cluster.stderr().contains("served"), "{}", cluster.stderr());
}

#[test]
fn cluster_sighup_runs_the_new_binary_on_disk() {
    // Deploy the way people do: the program lives at a path, a new build is
    // renamed over it, and SIGHUP rolls the workers onto it.
    let dir = std::env::temp_dir().join(format!("corral-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = dir.join("service");
    std::fs::copy(support::hello_binary(), &program).unwrap();
    let mut cluster =
        support::Cluster::start_program(&program, &["--listen", "127.0.0.1:0", "--workers", "2"]);
    assert!(cluster.get("/").unwrap().1.starts_with("hello from worker"));

    let staged = dir.join("service.new");
    std::fs::copy(support::example_binary("chat"), &staged).unwrap();
    std::fs::rename(&staged, &program).unwrap();
    cluster.signal(Signal::SIGHUP);
    let upgraded = support::wait_until(Duration::from_secs(30), || {
        (0..10).all(|_| matches!(cluster.get("/"), Ok((200, body)) if body.contains("corral chat")))
    });
    assert!(upgraded, "log:\n{}", cluster.stderr());
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cluster_a_slot_in_a_crash_loop_stops_taking_connections() {
    for balance in ["reuseport", "sticky"] {
        let (mut child, log) = support::spawn(&[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            balance,
            "--fault",
            "crash-slot-1",
        ]);
        assert!(
            support::wait_until(Duration::from_secs(30), || log
                .lock()
                .unwrap()
                .contains("crash loop")),
            "{}",
            log.lock().unwrap()
        );
        // The primary goes on with slot 0, and new connections from many
        // clients all reach it instead of queueing for slot 1.
        let addr = support::first_listening_addr(&mut child.0);
        for n in 2..42u8 {
            let stream =
                support::connect_from(std::net::Ipv4Addr::new(127, 0, 0, n), addr).unwrap();
            let (status, body) = support::request_on(stream, addr, "/", b"").unwrap();
            assert_eq!(
                support::parse_hello(status, &body).unwrap().0,
                0,
                "{balance}"
            );
        }
    }
}

#[test]
fn cluster_support_reads_accept_queues() {
    // The SIGTERM test relies on this probe; check it sees a queued connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert_eq!(support::accept_queue_len(port), 0);
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    assert!(support::wait_until(
        Duration::from_secs(5),
        || support::accept_queue_len(port) == 1
    ));
    let _ = listener.accept().unwrap();
    assert_eq!(support::accept_queue_len(port), 0);
}
