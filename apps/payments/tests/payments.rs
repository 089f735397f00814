//! `POST /v1/payments`, `GET /v1/payments/{id}` and `/health` over real TCP.

mod common;

use common::*;
use serde_json::{json, Value};

const BODY: &str = r#"{"merchant_id":"acme","amount":1250,"currency":"EUR","reference":"order-1"}"#;

async fn post(s: &Server, key: Option<&str>, body: impl Into<reqwest::Body>) -> reqwest::Response {
    let mut req = s
        .client
        .post(s.url("/v1/payments"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.expect("request")
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json error body");
    (status, body["error"].clone())
}

#[tokio::test]
async fn health_reports_slot() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 3).await;
    let resp = s.client.get(s.url("/health")).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"status": "ok", "worker": 3}));
}

#[tokio::test]
async fn create_then_get() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let resp = post(&s, Some("k-create"), BODY).await;
    assert_eq!(resp.status(), 201);
    let text = resp.text().await.expect("text");
    let p: Value = serde_json::from_str(&text).expect("json");
    let id = p["id"].as_str().expect("id");
    assert!(id.starts_with("pay_"));
    assert_eq!(p["merchant_id"], "acme");
    assert_eq!(p["amount"], 1250);
    assert_eq!(p["currency"], "EUR");
    assert_eq!(p["reference"], "order-1");
    assert_eq!(p["status"], "captured");
    let created = p["created_at"].as_str().expect("created_at");
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    assert!(created.ends_with('Z'));

    let got = s
        .client
        .get(s.url(&format!("/v1/payments/{id}")))
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.expect("text"), text);

    let (status, err) = error_of(
        s.client
            .get(s.url("/v1/payments/pay_nope"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "not_found");
    assert_eq!(err["field"], Value::Null);
}

#[tokio::test]
async fn idempotency_key_rules() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    for key in [None, Some("")] {
        let (status, err) = error_of(post(&s, key, BODY).await).await;
        assert_eq!(status, 400);
        assert_eq!(err["code"], "missing_idempotency_key");
        assert_eq!(err["field"], Value::Null);
    }
    let long = "k".repeat(256);
    assert_eq!(post(&s, Some(&long), BODY).await.status(), 400);
    assert_eq!(post(&s, Some(&"k".repeat(255)), BODY).await.status(), 201);
    assert_eq!(post(&s, Some("has space"), BODY).await.status(), 400);
}

#[tokio::test]
async fn validation_errors_are_422_with_field() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"merchant_id":"acme","amount":100.0,"currency":"EUR","reference":"r"}),
            "amount",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":0,"currency":"EUR","reference":"r"}),
            "amount",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":-5,"currency":"EUR","reference":"r"}),
            "amount",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":"5","currency":"EUR","reference":"r"}),
            "amount",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","currency":"EUR","reference":"r"}),
            "amount",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":5,"currency":"eur","reference":"r"}),
            "currency",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":5,"currency":"EURO","reference":"r"}),
            "currency",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":5,"currency":"EUR"}),
            "reference",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":5,"currency":"EUR","reference":"r".repeat(256)}),
            "reference",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"acme","amount":5,"currency":"EUR","reference":7}),
            "reference",
            "invalid_field",
        ),
        (
            json!({"amount":5,"currency":"EUR","reference":"r"}),
            "merchant_id",
            "invalid_field",
        ),
        (
            json!({"merchant_id":"nobody","amount":5,"currency":"EUR","reference":"r"}),
            "merchant_id",
            "unknown_merchant",
        ),
    ];
    for (i, (body, field, code)) in cases.into_iter().enumerate() {
        let (status, err) =
            error_of(post(&s, Some(&format!("v{i}")), body.to_string()).await).await;
        assert_eq!(status, 422, "case {i}: {body}");
        assert_eq!(err["field"], field, "case {i}");
        assert_eq!(err["code"], code, "case {i}");
    }
    // Largest amount, unknown fields ignored.
    let ok = r#"{"merchant_id":"acme","amount":9223372036854775807,"currency":"EUR","reference":"r","extra":[1]}"#;
    assert_eq!(post(&s, Some("max"), ok).await.status(), 201);
    let too_big =
        r#"{"merchant_id":"acme","amount":9223372036854775808,"currency":"EUR","reference":"r"}"#;
    assert_eq!(post(&s, Some("too-big"), too_big).await.status(), 422);
    // Not an object.
    let (status, err) = error_of(post(&s, Some("arr"), "[1,2]").await).await;
    assert_eq!(status, 422);
    assert_eq!(err["field"], Value::Null);
    // Malformed JSON.
    let (status, err) = error_of(post(&s, Some("bad"), "{\"merchant_id\":").await).await;
    assert_eq!(status, 400);
    assert_eq!(err["code"], "malformed_json");
}

#[tokio::test]
async fn check_order_413_400_400_422_409() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    // 413 beats a missing key. It is decided from the announced length
    // and the connection closed unread, so a client still sending 1 MiB
    // may see the reset first: only the headers are sent.
    let addr = s.base.trim_start_matches("http://").to_owned();
    let refused = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).expect("connect");
        write!(
            c,
            "POST /v1/payments HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
            1024 * 1024 + 1
        )
        .expect("send headers");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("answer, then close");
        answer
    })
    .await
    .expect("raw client");
    assert!(refused.starts_with("HTTP/1.1 413"), "{refused}");
    // Exactly 1 MiB is not too large (it is malformed JSON).
    let mut exact = BODY.as_bytes().to_vec();
    exact.resize(1024 * 1024, b' ');
    assert_eq!(post(&s, Some("exact"), exact).await.status(), 201);
    // Missing key beats malformed JSON.
    let (status, err) = error_of(post(&s, None, "{").await).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("missing_idempotency_key"))
    );
    // Malformed JSON beats everything after.
    assert_eq!(post(&s, Some("k1"), "{").await.status(), 400);
    // Use k1 for a real payment; an invalid body with k1 is 422, not 409.
    assert_eq!(post(&s, Some("k1"), BODY).await.status(), 201);
    let invalid = r#"{"merchant_id":"acme","amount":0,"currency":"EUR","reference":"order-1"}"#;
    assert_eq!(post(&s, Some("k1"), invalid).await.status(), 422);
    // A valid different body with k1 is 409.
    let other = r#"{"merchant_id":"acme","amount":99,"currency":"EUR","reference":"order-1"}"#;
    let (status, err) = error_of(post(&s, Some("k1"), other).await).await;
    assert_eq!(status, 409);
    assert_eq!(err["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn body_over_limit_with_chunked_encoding_is_413() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    // A streamed body has no Content-Length: the limit is enforced while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..17).map(|_| Ok(vec![b' '; 64 * 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    assert_eq!(post(&s, Some("stream"), body).await.status(), 413);
}

#[tokio::test]
async fn replay_returns_first_answer_byte_for_byte() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let first = post(&s, Some("replay"), BODY).await;
    assert_eq!(first.status(), 201);
    let first = first.text().await.expect("text");
    // Same fields, other order and spacing, plus an ignored field.
    let same = r#"{ "reference" : "order-1", "currency":"EUR", "amount": 1250, "merchant_id":"acme", "note": 1 }"#;
    let again = post(&s, Some("replay"), same).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.text().await.expect("text"), first);
    assert_eq!(s.state.store().payment_count().expect("count"), 1);
}

#[tokio::test]
async fn failed_validation_does_not_burn_the_key() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let invalid = r#"{"merchant_id":"acme","amount":0,"currency":"EUR","reference":"r"}"#;
    assert_eq!(post(&s, Some("reuse"), invalid).await.status(), 422);
    assert_eq!(post(&s, Some("reuse"), BODY).await.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_with_one_key_make_one_payment() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let s = std::sync::Arc::new(s);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let r = post(&s, Some("race"), BODY).await;
                (r.status().as_u16(), r.text().await.expect("text"))
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 201);
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.state.store().payment_count().expect("count"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_across_two_processes_sharing_the_database() {
    // Two states over one data dir: separate SQLite connections, as two
    // worker processes have.
    let dir = data_dir();
    let a = std::sync::Arc::new(serve(config(dir.path()), 0).await);
    let b = std::sync::Arc::new(serve(config(dir.path()), 1).await);
    for round in 0..5 {
        let key = format!("cross-{round}");
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let key = key.clone();
                tokio::spawn(async move {
                    let r = post(&s, Some(&key), BODY).await;
                    (r.status().as_u16(), r.text().await.expect("text"))
                })
            })
            .collect();
        let mut bodies = Vec::new();
        for t in tasks {
            let (status, body) = t.await.expect("task");
            assert_eq!(status, 201, "{body}");
            bodies.push(body);
        }
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    }
    assert_eq!(a.state.store().payment_count().expect("count"), 5);
}

#[test]
fn store_level_race_on_separate_connections() {
    use payments::Store as _;
    let dir = data_dir();
    let req = payments::domain::payment::NewPayment {
        merchant_id: "acme".into(),
        amount: 5,
        currency: "EUR".into(),
        reference: "r".into(),
    };
    let open = || {
        payments::SqliteStore::open(
            dir.path(),
            payments::Synchronous::Normal,
            std::time::Duration::from_secs(30),
        )
        .expect("open")
    };
    let stores = [open(), open()];
    let barrier = std::sync::Barrier::new(8);
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = &stores[i % 2];
                let req = &req;
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    store.create_payment("thread-race", req).expect("create")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    use payments::store::CreateOutcome;
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, CreateOutcome::Created(..)))
        .count();
    assert_eq!(created, 1);
    let first = outcomes
        .iter()
        .find_map(|o| match o {
            CreateOutcome::Created(_, body) => Some(body.clone()),
            _ => None,
        })
        .expect("one created");
    for o in &outcomes {
        match o {
            CreateOutcome::Created(_, body) => assert_eq!(body, &first),
            CreateOutcome::Replayed(body) => assert_eq!(body, &first),
            CreateOutcome::Conflict => panic!("same body must not conflict"),
        }
    }
}

#[tokio::test]
async fn captured_payments_are_published() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let mut rx = s.state.events().subscribe();
    let resp = post(&s, Some("evt"), BODY).await;
    let p: Value = resp.json().await.expect("json");
    let event = rx.recv().await.expect("event");
    assert_eq!(event.kind, "payment.captured");
    assert_eq!(event.data["id"], p["id"]);
}

#[tokio::test]
async fn unknown_route_is_json_404() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let (status, err) = error_of(s.client.get(s.url("/nope")).send().await.expect("get")).await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "not_found");
}
