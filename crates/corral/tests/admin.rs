//! The primary's admin address on a real cluster: `/status`, `/metrics` and
//! the dashboard show what the workers report in their heartbeats.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::Cluster;

#[test]
fn admin_status_and_metrics_show_every_worker() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
        "--heartbeat-timeout",
        "1s",
    ]);
    let admin = cluster.admin_addr();
    for _ in 0..50 {
        cluster.hello().unwrap();
    }

    let status = support::wait_until(Duration::from_secs(10), || {
        let Ok((200, body)) = support::get_once(admin, "/status") else {
            return false;
        };
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let served: u64 = status["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|slot| {
                slot["worker"]["stats"]["requests_total"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        served >= 50
    });
    assert!(status, "the heartbeats never showed the 50 requests");

    let (_, body) = support::get_once(admin, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pids: BTreeSet<i32> = status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|slot| slot["worker"]["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids, cluster.worker_pids().into_iter().collect());
    assert_eq!(status["balance"], "reuseport");
    assert_eq!(status["slots"][0]["worker"]["state"], "ready");

    let (code, metrics) = support::get_once(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "corral_worker_requests_total{slot=\"0\"",
        "corral_worker_requests_total{slot=\"1\"",
        "corral_worker_event_loop_delay_seconds{",
        "corral_worker_resident_memory_bytes{",
        "corral_worker_pool_tasks_total{",
        "corral_slot_starts_total{slot=\"0\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let (code, page) = support::get_once(admin, "/").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("fetch('/status')"));
}

#[test]
fn admin_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (mut child, log) = support::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--admin",
        &addr,
    ]);
    let status = support::wait_child(&mut child.0, Duration::from_secs(20)).expect("exits");
    assert_ne!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        log.lock().unwrap().contains("already in use"),
        "{}",
        log.lock().unwrap()
    );
}
