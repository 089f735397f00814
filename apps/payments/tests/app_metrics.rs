//! The service's own metrics on the clustered binary: payments created,
//! settlement lines by result and settlement verify time, counted by each
//! worker and served merged by the primary's `/metrics` (`--admin`), read
//! with Prometheus' own OpenMetrics parser.

mod cluster_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cluster_support::*;
use corral_testkit::openmetrics;
use serde_json::Value;

/// Each `payments_*` sample summed over slots, keyed by sample name and
/// its labels other than `slot` (which every sample must carry).
fn payments_samples(admin: SocketAddr) -> BTreeMap<String, f64> {
    let mut conn = Conn::open(admin).unwrap();
    let answer = conn.request("GET", "/metrics", &[], b"").unwrap();
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body).unwrap();
    let json = openmetrics::parse(&text)
        .unwrap_or_else(|complaint| panic!("the parser rejected /metrics: {complaint}\n{text}"));
    let families: Vec<Value> = serde_json::from_str(&json).unwrap();
    let mut sums = BTreeMap::new();
    for family in families
        .iter()
        .filter(|f| f["name"].as_str().unwrap().starts_with("payments_"))
    {
        for sample in family["samples"].as_array().unwrap() {
            let mut labels = sample["labels"].as_object().unwrap().clone();
            assert!(labels.remove("slot").is_some(), "no slot label: {sample}");
            let key = format!(
                "{}{}",
                sample["name"].as_str().unwrap(),
                Value::from(labels)
            );
            let value: f64 = sample["value"].as_str().unwrap().parse().unwrap();
            *sums.entry(key).or_default() += value;
        }
    }
    sums
}

#[test]
fn payments_metrics_are_served_merged_by_the_primary() {
    let test = "payments_metrics_are_served_merged_by_the_primary";
    if !openmetrics::parser_installed() {
        eprintln!("skipped: {test} (python3 with prometheus_client not installed)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = cluster.admin_addr();

    // Five payments, each on its own connection (so both workers take
    // some), and one replay, which creates nothing.
    for key in ["m-1", "m-2", "m-3", "m-4", "m-5", "m-5"] {
        let body = format!(
            r#"{{"merchant_id":"acme","amount":1250,"currency":"EUR","reference":"{key}"}}"#
        );
        let answer = Conn::open(cluster.addr)
            .unwrap()
            .request(
                "POST",
                "/v1/payments",
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", key),
                ],
                body.as_bytes(),
            )
            .unwrap();
        assert_eq!(
            answer.status,
            201,
            "{:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    // A settlement batch of three good lines and one whose amount was changed
    // after signing.
    let tampered = signed_line("s-4", "acme", 100, "EUR").replacen(",100,", ",101,", 1);
    let csv = format!(
        "{CSV_HEADER}\n{}\n{}\n{}\n{tampered}\n",
        signed_line("s-1", "acme", 100, "EUR"),
        signed_line("s-2", "globex", 200, "USD"),
        signed_line("s-3", "acme", 300, "EUR"),
    );
    let answer = Conn::open(cluster.addr)
        .unwrap()
        .request(
            "POST",
            "/v1/settlements",
            &[("content-type", "text/csv")],
            csv.as_bytes(),
        )
        .unwrap();
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    let result = answer.json();
    assert_eq!(
        (&result["accepted"], &result["rejected"]),
        (&3.into(), &1.into()),
        "{result}"
    );

    let expected = [
        ("payments_created_total{}", 5.0),
        ("payments_settlement_lines_total{\"result\":\"valid\"}", 3.0),
        (
            "payments_settlement_lines_total{\"result\":\"rejected\"}",
            1.0,
        ),
        ("payments_settlement_verify_seconds_count{}", 1.0),
    ];
    let mut last = BTreeMap::new();
    let shown = wait_until(Duration::from_secs(15), || {
        last = payments_samples(admin);
        expected
            .iter()
            .all(|(name, value)| last.get(*name) == Some(value))
    });
    assert!(shown, "expected {expected:?} in /metrics, got {last:#?}");
    assert!(last["payments_settlement_verify_seconds_sum{}"] > 0.0);
    assert!(last.contains_key("payments_settlement_verify_seconds_bucket{\"le\":\"+Inf\"}"));
}
