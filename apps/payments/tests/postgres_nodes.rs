//! Two `payments` nodes (real binaries, on 127.0.0.1 and 127.0.0.2) on one
//! Postgres database (`CORRAL_TEST_POSTGRES`): what one node stores, the
//! other serves, and one idempotency key makes one payment across both.

mod cluster_support;

use std::time::Duration;

use cluster_support::*;

#[tokio::test]
async fn a_payment_made_on_one_node_is_served_and_replayed_by_the_other() {
    let Some(url) = env_or_skip(
        "a_payment_made_on_one_node_is_served_and_replayed_by_the_other",
        "CORRAL_TEST_POSTGRES",
    ) else {
        return;
    };
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = start_on("127.0.0.1", dir_a.path(), &["--database", &url]);
    let b = start_on("127.0.0.2", dir_b.path(), &["--database", &url]);
    let c = reqwest::Client::new();
    let key = format!("nodes-{}", payments::domain::ids::random_token(12));
    let body = r#"{"merchant_id":"acme","amount":4200,"currency":"EUR","reference":"two nodes"}"#;
    let created = c
        .post(a.url("/v1/payments"))
        .header("idempotency-key", &key)
        .body(body)
        .send()
        .await
        .expect("create on A");
    assert_eq!(created.status(), 201);
    let first = created.bytes().await.expect("body");
    let payment: serde_json::Value = serde_json::from_slice(&first).expect("json");
    let id = payment["id"].as_str().expect("id");

    let fetched = c
        .get(b.url(&format!("/v1/payments/{id}")))
        .send()
        .await
        .expect("get on B");
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.expect("body"), first);

    let replayed = c
        .post(b.url("/v1/payments"))
        .header("idempotency-key", &key)
        .body(body)
        .send()
        .await
        .expect("replay on B");
    assert_eq!(replayed.status(), 201);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.bytes().await.expect("body"), first);
    // Nothing went to SQLite.
    assert!(!dir_a.path().join("payments.sqlite3").exists());
}

#[tokio::test]
async fn an_async_batch_accepted_by_a_node_killed_at_once_is_finished_by_the_other() {
    let Some(url) = env_or_skip(
        "an_async_batch_accepted_by_a_node_killed_at_once_is_finished_by_the_other",
        "CORRAL_TEST_POSTGRES",
    ) else {
        return;
    };
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut a = start_on("127.0.0.1", dir_a.path(), &["--database", &url]);
    let b = start_on("127.0.0.2", dir_b.path(), &["--database", &url]);
    let lines = 100_000;
    let args = payments::gen::GenArgs {
        lines,
        merchants: None,
        seed: 7,
        bad_every: 0,
        id_prefix: format!("takeover-{}", payments::domain::ids::random_token(10)),
    };
    let csv = payments::gen::generate_batch(&payments::Merchants::demo(), &args);
    let c = reqwest::Client::new();
    let accepted = c
        .post(a.url("/v1/settlements?async=true"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .expect("post on A");
    assert_eq!(accepted.status(), 202);
    let location = accepted.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    // A dies with the batch in hand (every process of it, at once).
    a.kill_all();
    let status = |v: &serde_json::Value| v["status"].as_str().unwrap_or("").to_owned();
    let first: serde_json::Value = c
        .get(b.url(&location))
        .send()
        .await
        .expect("get on B")
        .json()
        .await
        .expect("json");
    assert_eq!(status(&first), "processing", "A finished before it died");
    // B's sweeper claims it once A's lease (15 s) has run out.
    let started = std::time::Instant::now();
    let done = loop {
        let v: serde_json::Value = c
            .get(b.url(&location))
            .send()
            .await
            .expect("get on B")
            .json()
            .await
            .expect("json");
        if status(&v) == "done" {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not finished: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(done["accepted"], lines);
    assert_eq!(done["rejected"], 0);
}
