//! Nothing lost in a dying worker: in the accept-and-pass modes the primary
//! keeps each connection until the worker acknowledges it, so connections
//! still queued for a worker that is killed reach another worker (or the
//! slot's replacement) instead of dying with it. Real clusters, real kills.

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
