//! Accept-and-pass balancing on real clusters: round-robin, sticky sessions
//! (also behind a PROXY protocol load balancer) and workers dying with
//! connections in hand.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::Cluster;

fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// The `(slot, pid)` that answers `GET /` for a connection from `source`.
fn hello_from(cluster: &Cluster, source: Ipv4Addr) -> std::io::Result<(usize, i32)> {
    let stream = support::connect_from(source, cluster.addr)?;
    let (status, body) = support::request_on(stream, cluster.addr, "/", b"")?;
    support::parse_hello(status, &body)
}

#[test]
fn balance_round_robin_spreads_new_connections_evenly() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "round-robin",
    ]);
    let mut per_slot = BTreeMap::new();
    for _ in 0..400 {
        let (slot, _) = cluster.hello().expect("GET /");
        *per_slot.entry(slot).or_insert(0) += 1;
    }
    assert_eq!(per_slot.len(), 2, "{per_slot:?}");
    for count in per_slot.values() {
        assert!((180..=220).contains(count), "uneven: {per_slot:?}");
    }
}

#[test]
fn balance_least_connections_serves_from_every_worker() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "least-conn",
    ]);
    let slots: BTreeSet<usize> = (0..100).map(|_| cluster.hello().unwrap().0).collect();
    assert_eq!(slots.len(), 2);
}

#[test]
fn balance_sticky_keeps_each_client_on_its_slot_across_a_restart() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "sticky",
    ]);
    let clients: Vec<Ipv4Addr> = (2..42).map(client_ip).collect();
    let mut mapping = BTreeMap::new();
    for &client in &clients {
        let slots: BTreeSet<usize> = (0..5)
            .map(|_| hello_from(&cluster, client).unwrap().0)
            .collect();
        assert_eq!(slots.len(), 1, "client {client} saw slots {slots:?}");
        mapping.insert(client, *slots.iter().next().unwrap());
    }
    let used: BTreeSet<usize> = mapping.values().copied().collect();
    assert!(used.len() > 1, "every client went to one slot: {mapping:?}");

    // Kill the worker of slot 0; once its replacement serves, nothing moved.
    let slot0_client = *mapping.iter().find(|(_, &slot)| slot == 0).unwrap().0;
    let (_, victim) = hello_from(&cluster, slot0_client).unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    // Once the primary has seen the exit (a dying process's descriptors may
    // outlive its zombie state by a moment), ...
    let exit_line = format!("worker pid {victim} was killed by SIGKILL");
    assert!(support::wait_until(Duration::from_secs(10), || {
        cluster.stderr().contains(&exit_line)
    }));
    // ... a request sent now waits for the replacement rather than moving.
    let (slot, pid) = hello_from(&cluster, slot0_client).unwrap();
    assert_eq!(slot, 0);
    assert_ne!(pid, victim);
    for &client in &clients {
        let (slot, _) = hello_from(&cluster, client).unwrap();
        assert_eq!(
            slot, mapping[&client],
            "client {client} moved after the restart"
        );
    }
}

fn proxy_v1(client: Ipv4Addr) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 40000 80\r\n").into_bytes()
}

fn proxy_v2(client: Ipv4Addr) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&client.octets());
    header.extend_from_slice(&[10, 0, 0, 1, 0x9c, 0x40, 0, 80]);
    header
}

fn hello_via_proxy(addr: SocketAddr, header: &[u8]) -> std::io::Result<(usize, i32)> {
    let stream = std::net::TcpStream::connect(addr)?;
    let (status, body) = support::request_on(stream, addr, "/", header)?;
    support::parse_hello(status, &body)
}

#[test]
fn balance_sticky_follows_the_proxy_protocol_address() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "sticky",
        "--proxy-protocol",
    ]);
    // Every connection really comes from 127.0.0.1; only the header differs.
    let mut used = BTreeSet::new();
    for n in 1..=20u8 {
        let client = Ipv4Addr::new(203, 0, 113, n);
        let v1: BTreeSet<usize> = (0..3)
            .map(|_| hello_via_proxy(cluster.addr, &proxy_v1(client)).unwrap().0)
            .collect();
        let v2: BTreeSet<usize> = (0..3)
            .map(|_| hello_via_proxy(cluster.addr, &proxy_v2(client)).unwrap().0)
            .collect();
        assert_eq!(v1.len(), 1, "{client} over v1 saw {v1:?}");
        assert_eq!(v1, v2, "{client}: v1 and v2 headers disagree");
        used.extend(v1);
    }
    assert_eq!(
        used.len(),
        2,
        "the header address did not drive the mapping"
    );
}

#[test]
fn balance_malformed_proxy_header_closes_only_that_connection() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "sticky",
        "--proxy-protocol",
    ]);
    for garbage in [
        &b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let stream = std::net::TcpStream::connect(cluster.addr).unwrap();
        let result = support::request_on(stream, cluster.addr, "/", garbage);
        assert!(
            result.is_err(),
            "a malformed header got an answer: {result:?}"
        );
    }
    let (slot, _) =
        hello_via_proxy(cluster.addr, &proxy_v1(Ipv4Addr::new(198, 51, 100, 1))).unwrap();
    assert!(slot < 2);
    assert!(support::process_alive(cluster.pid()));
}

#[test]
fn balance_worker_dying_with_passed_connections_does_not_hurt_the_primary() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--balance",
        "round-robin",
    ]);
    let (_, victim) = cluster.hello().unwrap();
    let addr = cluster.addr;
    // Block the only worker's event loop, then pass it connections it cannot accept.
    let blocker = std::thread::spawn(move || support::get_once(addr, "/block?ms=3000"));
    std::thread::sleep(Duration::from_millis(300));
    let stranded: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || support::get_once(addr, "/")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let _ = blocker.join();
    for request in stranded {
        // Lost with the worker, or served by its replacement: either way no hang.
        let _ = request.join();
    }
    let replaced = support::wait_until(
        Duration::from_secs(20),
        || matches!(cluster.hello(), Ok((0, pid)) if pid != victim),
    );
    assert!(replaced, "log:\n{}", cluster.stderr());
    assert!(support::process_alive(cluster.pid()));
    assert!(
        !cluster.stderr().contains("panicked"),
        "{}",
        cluster.stderr()
    );
}

#[test]
fn balance_sighup_in_round_robin_mode_drops_nothing() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "round-robin",
    ]);
    let before: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = cluster.addr;
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut served = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match support::get_once(addr, "/") {
                    Ok((200, _)) => served += 1,
                    other => failures.push(format!("{other:?}")),
                }
            }
            (served, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.signal(Signal::SIGHUP);
    assert!(support::wait_until(Duration::from_secs(30), || {
        let now: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
        now.len() == 2 && now.is_disjoint(&before)
    }));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (served, failures) = client.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(served > 50);
}
