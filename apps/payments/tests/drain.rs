//! The drain sequence a load balancer or Kubernetes Service relies on, on
//! the real clustered binary: on `SIGTERM` with `--drain-delay`, `/health`
//! turns 503 at once on every worker while they still accept new connections
//! and serve every other route; the primary exits 0 once the delay and the
//! graceful stop are over. Without the flag, the stop is what it always was.

mod cluster_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_support::*;
use nix::sys::signal::Signal;

const PAYMENT: &[u8] =
    br#"{"merchant_id":"acme","amount":700,"currency":"EUR","reference":"drain"}"#;

/// A keep-alive connection on each worker slot, found by asking `/health`.
fn one_connection_per_slot(cluster: &Cluster) -> BTreeMap<u64, Conn> {
    let mut by_slot = BTreeMap::new();
    for _ in 0..200 {
        let mut conn = Conn::open(cluster.addr).expect("connect");
        let slot = conn.slot();
        by_slot.entry(slot).or_insert(conn);
        if by_slot.len() == 2 {
            return by_slot;
        }
    }
    panic!("200 connections all landed on slots {:?}", by_slot.keys());
}

fn health(conn: &mut Conn) -> Answer {
    conn.request("GET", "/health", &[], b"")
        .expect("GET /health")
}

#[test]
fn sigterm_with_a_drain_delay_fails_readiness_at_once_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = start(
        dir.path(),
        &["--drain-delay", "2s", "--admin", "127.0.0.1:0"],
    );
    let admin = cluster.admin_addr();
    let mut conns = one_connection_per_slot(&cluster);
    for conn in conns.values_mut() {
        assert_eq!(health(conn).status, 200);
    }

    cluster.signal(Signal::SIGTERM);
    let sigterm = Instant::now();
    // Readiness on every worker turns 503 well within the probe's period.
    for (slot, conn) in &mut conns {
        loop {
            let answer = health(conn);
            if answer.status == 503 {
                let body = answer.json();
                assert_eq!(body["status"], "draining", "{body}");
                assert_eq!(body["worker"].as_u64(), Some(*slot), "{body}");
                break;
            }
            assert_eq!(answer.status, 200);
            assert!(
                sigterm.elapsed() < Duration::from_secs(1),
                "slot {slot}: /health still 200 {:?} after SIGTERM",
                sigterm.elapsed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let turned = sigterm.elapsed();
    eprintln!("/health answered 503 on both workers {turned:?} after SIGTERM");
    assert!(
        turned < Duration::from_millis(500),
        "readiness took {turned:?} to fail"
    );

    // The primary's status says the node is stopping, and for how long yet
    // the workers serve.
    let status = Conn::open(admin)
        .expect("connect to the admin address")
        .request("GET", "/status", &[], b"")
        .expect("GET /status")
        .json();
    assert_eq!(status["stopping"], true, "{status}");
    let left = status["drain_delay_left_s"]
        .as_f64()
        .expect("drain delay left");
    assert!(left > 0.0 && left <= 2.0, "{status}");

    // During the delay new connections are still accepted and served.
    let mut served = 0;
    let mut key = 0;
    while sigterm.elapsed() < Duration::from_millis(1500) {
        let mut fresh = Conn::open(cluster.addr).expect("a new connection during the delay");
        assert_eq!(health(&mut fresh).status, 503);
        key += 1;
        let idempotency = format!("drain-{key}");
        let created = fresh
            .request(
                "POST",
                "/v1/payments",
                &[
                    ("content-type", "application/json"),
                    ("Idempotency-Key", &idempotency),
                ],
                PAYMENT,
            )
            .expect("POST during the delay");
        assert_eq!(created.status, 201, "{:?}", created.json());
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 10, "only {served} payments during the delay");
    drop(conns);

    let status = cluster.wait_exit(Duration::from_secs(60));
    let took = sigterm.elapsed();
    let stderr = cluster.stderr();
    assert!(status.success(), "{status:?}; stderr:\n{stderr}");
    assert!(
        took >= Duration::from_secs(2),
        "exited {took:?} after SIGTERM"
    );
    assert!(stderr.contains("the node is draining"), "{stderr}");
    assert!(stderr.contains("drain delay of 2s over"), "{stderr}");
    eprintln!("primary exited 0 {took:?} after SIGTERM");
}

#[test]
fn a_second_sigterm_during_the_drain_delay_stops_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = start(dir.path(), &["--drain-delay", "60s"]);
    let mut conn = Conn::open(cluster.addr).expect("connect");
    cluster.signal(Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(5), || health(&mut conn).status == 503),
        "no 503 after SIGTERM"
    );
    drop(conn);
    let second = Instant::now();
    cluster.signal(Signal::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(30));
    let stderr = cluster.stderr();
    assert!(status.success(), "{status:?}; stderr:\n{stderr}");
    assert!(
        second.elapsed() < Duration::from_secs(20),
        "the second SIGTERM did not cut the 60 s delay short"
    );
    assert!(
        stderr.contains("SIGTERM again during the drain delay: stopping now"),
        "{stderr}"
    );
}

#[test]
fn without_a_drain_delay_sigterm_stops_as_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = start(dir.path(), &[]);
    let addr = cluster.addr;
    let mut conn = Conn::open(addr).expect("connect");
    assert_eq!(health(&mut conn).status, 200);
    drop(conn);
    let sigterm = Instant::now();
    cluster.signal(Signal::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(60));
    let took = sigterm.elapsed();
    let stderr = cluster.stderr();
    assert!(status.success(), "{status:?}; stderr:\n{stderr}");
    assert!(!stderr.contains("--drain-delay"), "{stderr}");
    assert!(
        stderr.contains("SIGTERM: stopping; draining 2 workers"),
        "{stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "an idle cluster took {took:?} to stop"
    );
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "still accepting after the primary exited"
    );
}
