//! Nothing lost in a dying worker, nothing parked on an empty slot, on real
//! clusters with real kills:
//! - in the accept-and-pass modes the primary keeps each connection until the
//!   worker acknowledges it, so connections still queued for a worker that is
//!   killed reach another worker (or the slot's replacement);
//! - in the reuseport modes the kernel steers new connections to the slots
//!   that serve, and sticky without PROXY protocol leaves the primary out of
//!   the data path.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::Cluster;

/// What the primary logs when it passes on connections a dead worker never
/// took: the proof that the scenario happened.
const REPASSED: &str = "connections the worker never took";

fn proxy_v1(client: Ipv4Addr) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 40000 80\r\n").into_bytes()
}

/// `GET path` on a new connection, behind a PROXY header naming `client` if given.
fn request(
    addr: SocketAddr,
    path: &str,
    client: Option<Ipv4Addr>,
) -> std::io::Result<(usize, i32)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let preamble = client.map(proxy_v1).unwrap_or_default();
    let (status, body) = support::request_on(stream, addr, path, &preamble)?;
    support::parse_hello(status, &body)
}

/// Blocks the event loop of every worker the `blockers` requests reach,
/// queues `stranded` requests behind them, kills `victim(pids)` and checks
/// that every stranded request is still answered.
fn stranded_requests_survive_a_kill(
    args: &[&str],
    blockers: usize,
    stranded: usize,
    client: Option<Ipv4Addr>,
) {
    let cluster = Cluster::start(args);
    let addr = cluster.addr;
    let (victim_slot, victim) = request(addr, "/", client).unwrap();
    let blocking: Vec<_> = (0..blockers)
        .map(|_| std::thread::spawn(move || request(addr, "/block?ms=2500", client)))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let waiting: Vec<_> = (0..stranded)
        .map(|_| std::thread::spawn(move || request(addr, "/", client)))
        .collect();
    // Let the primary pass them into the blocked workers' queues.
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    for blocker in blocking {
        // The victim's own in-flight request dies with it; that is expected.
        let _ = blocker.join();
    }
    let answers: Vec<_> = waiting.into_iter().map(|t| t.join().unwrap()).collect();
    for answer in &answers {
        let (_, pid) = answer
            .as_ref()
            .unwrap_or_else(|err| panic!("a stranded request failed: {err}\n{}", cluster.stderr()));
        assert_ne!(*pid, victim, "answered by the killed worker");
    }
    assert!(
        support::wait_until(Duration::from_secs(5), || cluster
            .stderr()
            .contains(REPASSED)),
        "no connection was queued at the killed worker; log:\n{}",
        cluster.stderr()
    );
    if client.is_some() {
        // Sticky: the clients waited for their own slot's replacement.
        for answer in answers {
            assert_eq!(answer.unwrap().0, victim_slot);
        }
    }
}

#[test]
fn handoff_round_robin_kill_loses_no_queued_connection() {
    stranded_requests_survive_a_kill(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            "round-robin",
        ],
        2,
        6,
        None,
    );
}

#[test]
fn handoff_least_conn_kill_loses_no_queued_connection() {
    stranded_requests_survive_a_kill(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--balance",
            "least-conn",
        ],
        1,
        4,
        None,
    );
}

#[test]
fn handoff_sticky_proxy_kill_keeps_clients_for_the_replacement() {
    stranded_requests_survive_a_kill(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            "sticky",
            "--proxy-protocol",
        ],
        1,
        4,
        Some(Ipv4Addr::new(192, 0, 2, 77)),
    );
}

/// The server side of every ESTABLISHED TCP connection on `port`, as socket
/// inodes (0 for one still in an accept queue).
fn established_on(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) && fields[3] == "01" {
                inodes.push(fields[9].parse().unwrap());
            }
        }
    }
    inodes
}

/// The listening sockets on `port`, as inodes.
fn listening_on(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) && fields[3] == "0A" {
                inodes.push(fields[9].parse().unwrap());
            }
        }
    }
    inodes
}

/// The socket inodes process `pid` holds.
fn sockets_of(pid: i32) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

fn hello_from(cluster: &Cluster, source: Ipv4Addr) -> std::io::Result<(usize, i32)> {
    let stream = support::connect_from(source, cluster.addr)?;
    let (status, body) = support::request_on(stream, cluster.addr, "/", b"")?;
    support::parse_hello(status, &body)
}

/// Sticky without PROXY protocol is steered by the kernel: the workers
/// accept from their own sockets, the primary holds no client connection,
/// and every client keeps its slot across connections and across a kill.
#[test]
fn steering_sticky_keeps_the_primary_out_of_the_data_path() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "sticky",
    ]);
    let port = cluster.addr.port();
    let clients: Vec<Ipv4Addr> = (0..40).map(|n| Ipv4Addr::new(127, 0, 1, 10 + n)).collect();
    let mut slot_of = Vec::new();
    for &client in &clients {
        let (slot, _) = hello_from(&cluster, client).unwrap();
        for _ in 0..4 {
            assert_eq!(hello_from(&cluster, client).unwrap().0, slot, "{client}");
        }
        slot_of.push(slot);
    }
    assert!(slot_of.contains(&0) && slot_of.contains(&1), "{slot_of:?}");

    // Hold connections open and see who owns them.
    let held: Vec<_> = clients
        .iter()
        .map(|&client| support::connect_from(client, cluster.addr).unwrap())
        .collect();
    let workers = cluster.worker_pids();
    assert_eq!(workers.len(), 2);
    let primary_sockets = sockets_of(cluster.pid());
    assert!(
        support::wait_until(Duration::from_secs(5), || {
            let established = established_on(port);
            established.len() >= held.len()
                && established
                    .iter()
                    .all(|inode| worker_sockets_now(&workers).contains(inode))
        }),
        "connections not all held by workers: {:?}",
        established_on(port)
    );
    for inode in established_on(port) {
        assert!(
            !primary_sockets.contains(&inode),
            "the primary holds a client connection"
        );
    }
    // Each worker accepts from a listening socket of its own.
    let listening = listening_on(port);
    for &pid in &workers {
        assert!(
            sockets_of(pid)
                .iter()
                .any(|inode| listening.contains(inode)),
            "worker {pid} has no listening socket: connections are passed, not steered"
        );
    }
    drop(held);

    // A kill -9: the slot's clients wait for its replacement, the others stay.
    let on_slot_0 = clients[slot_of.iter().position(|&slot| slot == 0).unwrap()];
    let (_, victim) = hello_from(&cluster, on_slot_0).unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    for (&client, &slot) in clients.iter().zip(&slot_of) {
        let (now, pid) = hello_from(&cluster, client).unwrap();
        assert_eq!(now, slot, "{client} moved after the kill");
        assert_ne!(pid, victim);
    }
}

fn worker_sockets_now(workers: &[i32]) -> Vec<u64> {
    workers.iter().flat_map(|&pid| sockets_of(pid)).collect()
}

/// Reuseport with a slot in a crash loop: new connections go only to the
/// live slot, none waits in the crashing slot's queue.
#[test]
fn steering_reuseport_crash_looping_slot_parks_nothing() {
    let (_child, log) = support::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "reuseport",
        "--fault",
        "crash-slot-1",
        "--admin",
        "127.0.0.1:0",
    ]);
    // The port is on the admin status before every slot serves.
    let admin: SocketAddr = {
        assert!(support::wait_until(Duration::from_secs(30), || log
            .lock()
            .unwrap()
            .contains("admin: http://")));
        let text = log.lock().unwrap().clone();
        let rest = &text[text.find("admin: http://").unwrap() + "admin: http://".len()..];
        rest[..rest.find('/').unwrap()].parse().unwrap()
    };
    let mut addr = None;
    assert!(support::wait_until(Duration::from_secs(30), || {
        let Ok((200, body)) = support::get_once(admin, "/status") else {
            return false;
        };
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        addr = status["listen"][0].as_str().and_then(|a| a.parse().ok());
        addr.is_some_and(|addr| request(addr, "/", None).is_ok())
    }));
    let addr: SocketAddr = addr.unwrap();
    // The scenario: slot 1 is in its crash loop (given up, retried later).
    assert!(
        support::wait_until(Duration::from_secs(30), || log
            .lock()
            .unwrap()
            .contains("crash loop")),
        "slot 1 never reached its crash loop:\n{}",
        log.lock().unwrap()
    );
    for n in 0..200u32 {
        let source = Ipv4Addr::new(127, 0, 2, (n % 200 + 1) as u8);
        let started = std::time::Instant::now();
        let stream = support::connect_from(source, addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let answer = support::request_on(stream, addr, "/", b"")
            .and_then(|(status, body)| support::parse_hello(status, &body));
        let elapsed = started.elapsed();
        let (slot, _) = answer.unwrap_or_else(|err| {
            panic!(
                "connection {n} not answered: {err}\n{}",
                log.lock().unwrap()
            )
        });
        assert_eq!(slot, 0);
        assert!(
            elapsed < Duration::from_secs(1),
            "connection {n} took {elapsed:?}"
        );
    }
    let (_, body) = support::get_once(admin, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_ne!(
        status["slots"][1]["state"], "serving",
        "slot 1 was serving after all: {status}"
    );
}
