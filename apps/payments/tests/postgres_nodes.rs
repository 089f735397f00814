//! Two `payments` nodes (real binaries, on 127.0.0.1 and 127.0.0.2) on one
//! Postgres database (`CORRAL_TEST_POSTGRES`): what one node stores, the
//! other serves, and one idempotency key makes one payment across both.

mod cluster_support;

use std::process::Command;
use std::time::Duration;

use cluster_support::*;

fn node(host: &str, url: &str, dir: &std::path::Path) -> Cluster {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
    command
        .args([
            "--listen",
            &format!("{host}:0"),
            "--workers",
            "2",
            "--data-dir",
        ])
        .arg(dir)
        .args(["--database", url]);
    Cluster::start(command, Duration::from_secs(120))
}

#[tokio::test]
async fn a_payment_made_on_one_node_is_served_and_replayed_by_the_other() {
    let Ok(url) = std::env::var("CORRAL_TEST_POSTGRES") else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: a_payment_made_on_one_node_is_served_and_replayed_by_the_other (CORRAL_TEST_POSTGRES not set)"
        );
        return;
    };
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = node("127.0.0.1", &url, dir_a.path());
    let b = node("127.0.0.2", &url, dir_b.path());
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
