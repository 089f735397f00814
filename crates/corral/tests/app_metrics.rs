//! Application metrics on a real cluster: each `hello` worker counts the
//! requests it answers on `/` in its own prometheus-client registry, and the
//! primary's `/metrics` serves them merged, one series per slot. The
//! exposition is read by Prometheus' own OpenMetrics parser (the Python
//! client's, which `.ci/run` installs), so a duplicate family, a missing
//! `# EOF` or a malformed line fails the test.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use corral_testkit::openmetrics;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::Cluster;

fn parse(exposition: &str) -> Vec<serde_json::Value> {
    let json = openmetrics::parse(exposition).unwrap_or_else(|complaint| {
        panic!("the OpenMetrics parser rejected /metrics: {complaint}\n{exposition}")
    });
    serde_json::from_str(&json).unwrap()
}

/// `hello_greetings_total` by slot, after checking the family is there once,
/// typed counter, with `slot` as its only label.
fn greetings(admin: SocketAddr) -> BTreeMap<usize, u64> {
    let (code, text) = support::get_once(admin, "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    let families = parse(&text);
    let ours: Vec<_> = families
        .iter()
        .filter(|family| family["name"] == "hello_greetings")
        .collect();
    assert_eq!(ours.len(), 1, "one hello_greetings family:\n{text}");
    assert_eq!(ours[0]["type"], "counter");
    assert!(
        families
            .iter()
            .any(|family| family["name"] == "corral_worker_requests"),
        "corral's own metrics are served too:\n{text}"
    );
    let mut by_slot = BTreeMap::new();
    for sample in ours[0]["samples"].as_array().unwrap() {
        assert_eq!(sample["name"], "hello_greetings_total", "{text}");
        let labels = sample["labels"].as_object().unwrap();
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            ["slot"],
            "only the slot label (no pid):\n{text}"
        );
        let slot: usize = labels["slot"].as_str().unwrap().parse().unwrap();
        let value: f64 = sample["value"].as_str().unwrap().parse().unwrap();
        assert!(
            by_slot.insert(slot, value as u64).is_none(),
            "slot {slot} twice:\n{text}"
        );
    }
    by_slot
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = support::get_once(admin, "/status").unwrap();
    serde_json::from_str(&body).unwrap()
}

fn worker_pid(admin: SocketAddr, slot: usize) -> Option<i32> {
    status(admin)["workers"]
        .as_array()?
        .iter()
        .find(|w| w["slot"] == slot && w["state"] == "ready")
        .and_then(|w| w["pid"].as_i64())
        .map(|pid| pid as i32)
}

/// Waits until `/metrics` shows exactly `expected`, or fails showing the last figures.
fn wait_for(admin: SocketAddr, expected: &BTreeMap<usize, u64>, what: &str) {
    let mut last = BTreeMap::new();
    let shown = support::wait_until(Duration::from_secs(15), || {
        last = greetings(admin);
        &last == expected
    });
    assert!(
        shown,
        "{what}: expected {expected:?}, /metrics shows {last:?}"
    );
}

#[test]
fn app_metrics_are_merged_per_slot_through_a_crash_a_reload_and_a_scale_down() {
    let test = "app_metrics_are_merged_per_slot_through_a_crash_a_reload_and_a_scale_down";
    if !openmetrics::parser_installed() {
        eprintln!("skipped: {test} (python3 with prometheus_client not installed)");
        return;
    }
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = cluster.admin_addr();

    // Each answer names the slot that counted it.
    let mut answered = BTreeMap::from([(0, 0), (1, 0)]);
    for _ in 0..60 {
        let (slot, _) = cluster.hello().unwrap();
        *answered.get_mut(&slot).unwrap() += 1;
    }
    assert!(
        answered.values().all(|&n| n > 0),
        "both slots served: {answered:?}"
    );
    wait_for(admin, &answered, "after 60 requests");
    assert_eq!(answered.values().sum::<u64>(), 60);

    // kill -9 slot 1's worker: its replacement's counts replace the slot's
    // series (the dead worker's are not added to them, nor kept beside them).
    let dead = worker_pid(admin, 1).expect("slot 1 serves");
    kill(Pid::from_raw(dead), Signal::SIGKILL).unwrap();
    let mut successor = None;
    assert!(
        support::wait_until(Duration::from_secs(15), || {
            successor = worker_pid(admin, 1).filter(|&pid| pid != dead);
            successor.is_some()
        }),
        "slot 1 was not restarted"
    );
    assert!(!support::process_alive(dead));
    assert_eq!(
        status(admin)["slots"][1]["worker"]["pid"],
        successor.unwrap()
    );
    answered.insert(1, 0);
    let mut sent = 0;
    while answered[&1] < 10 && sent < 400 {
        let (slot, pid) = cluster.hello().unwrap();
        if slot == 1 {
            assert_eq!(Some(pid), successor, "slot 1 is served by its successor");
        }
        *answered.get_mut(&slot).unwrap() += 1;
        sent += 1;
    }
    assert!(answered[&1] >= 10, "slot 1's successor never answered");
    wait_for(admin, &answered, "after the restart");

    // A rolling reload replaces both workers: each slot's series now count
    // what its new worker answered, while the old ones drained.
    let before: Vec<_> = (0..2).map(|slot| worker_pid(admin, slot)).collect();
    cluster.signal(Signal::SIGHUP);
    assert!(
        support::wait_until(Duration::from_secs(60), || {
            status(admin)["last_reload"]["outcome"] == "completed"
        }),
        "the reload did not complete: {}",
        status(admin)
    );
    for (slot, old) in before.iter().enumerate() {
        assert_ne!(&worker_pid(admin, slot), old, "slot {slot} reloaded");
    }
    answered = BTreeMap::from([(0, 0), (1, 0)]);
    for _ in 0..40 {
        let (slot, _) = cluster.hello().unwrap();
        *answered.get_mut(&slot).unwrap() += 1;
    }
    wait_for(admin, &answered, "after the reload");

    // One worker fewer: slot 1 goes away, and so do its series.
    cluster.signal(Signal::SIGTTOU);
    assert!(
        support::wait_until(Duration::from_secs(15), || {
            status(admin)["slots"].as_array().unwrap().len() == 1
        }),
        "slot 1 was not scaled away"
    );
    answered.remove(&1);
    wait_for(admin, &answered, "after scaling down to one worker");
    let (_, text) = support::get_once(admin, "/metrics").unwrap();
    assert!(
        !text
            .lines()
            .any(|line| line.starts_with("hello_") && line.contains("slot=\"1\"")),
        "{text}"
    );
}
