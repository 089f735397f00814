//! The real `payments` binary, clustered (a primary and two worker processes
//! sharing the port and one SQLite file), driven over HTTP. The single-process
//! tests cover each rule in detail; these check that the rules still hold when
//! requests land on different processes, and when every process dies.

mod cluster_support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cluster_support::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const PAYMENT: &str =
    r#"{"merchant_id":"acme","amount":1250,"currency":"EUR","reference":"order-1"}"#;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_payment(
    c: &reqwest::Client,
    cl: &Cluster,
    key: &str,
    body: &str,
) -> reqwest::Response {
    c.post(cl.url("/v1/payments"))
        .header("content-type", "application/json")
        .header("Idempotency-Key", key)
        .body(body.to_owned())
        .send()
        .await
        .expect("POST /v1/payments")
}

async fn post_csv(
    c: &reqwest::Client,
    cl: &Cluster,
    query: &str,
    csv: String,
) -> reqwest::Response {
    c.post(cl.url(&format!("/v1/settlements{query}")))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .expect("POST /v1/settlements")
}

/// Poll a batch until it is `done`. The bound is generous: after a crash the
/// job waits for its lease (15 s) to run out and for a sweeper tick.
async fn wait_done(c: &reqwest::Client, cl: &Cluster, location: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let resp = c.get(cl.url(location)).send().await.expect("GET batch");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        if body["status"] == "done" {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "batch {location} not done after {limit:?}: {body}\nstderr:\n{}",
            cl.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tiny_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(40, 20, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

#[tokio::test]
async fn every_status_code_over_the_cluster() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cl = start(dir.path(), &[]);
    assert!(
        cl.banner.contains("(2 workers, balance=reuseport)"),
        "{}",
        cl.banner
    );
    let c = client();

    // 200 /health, 201 created, 201 replayed byte for byte, 200 fetched.
    assert_eq!(c.get(cl.url("/health")).send().await.unwrap().status(), 200);
    let created = post_payment(&c, &cl, "smoke-1", PAYMENT).await;
    assert_eq!(created.status(), 201);
    let body = created.text().await.unwrap();
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let replay = post_payment(&c, &cl, "smoke-1", PAYMENT).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), body);
    let got = c
        .get(cl.url(&format!("/v1/payments/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), body);

    // 404, 400 (no key), 409 (key reused with another body), 413, 422.
    let missing = c.get(cl.url("/v1/payments/pay_nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let no_key = c
        .post(cl.url("/v1/payments"))
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 400);
    let other = PAYMENT.replace("1250", "1251");
    assert_eq!(post_payment(&c, &cl, "smoke-1", &other).await.status(), 409);
    // An oversize body is refused from its announced length, before it is
    // read, and the connection closed: a client still sending it may see
    // the reset instead, so only the headers are sent here.
    let addr = cl.addr;
    let refused = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(
            s,
            "POST /v1/payments HTTP/1.1\r\nHost: {addr}\r\nIdempotency-Key: smoke-2\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            1024 * 1024 + 1
        )
        .expect("send headers");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer, then close");
        answer
    })
    .await
    .expect("raw client");
    assert!(refused.starts_with("HTTP/1.1 413"), "{refused}");
    let bad_amount = PAYMENT.replace("1250", "12.5");
    let invalid = post_payment(&c, &cl, "smoke-3", &bad_amount).await;
    assert_eq!(invalid.status(), 422);
    assert_eq!(
        invalid.json::<Value>().await.unwrap()["error"]["field"],
        "amount"
    );

    // Settlements: 200 sync, 415 wrong type, 202 async then done.
    let csv = format!(
        "{CSV_HEADER}\n{}\n",
        signed_line("smoke-s1", "globex", 700, "USD")
    );
    assert_eq!(post_csv(&c, &cl, "", csv).await.status(), 200);
    let json_typed = c
        .post(cl.url("/v1/settlements"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(json_typed.status(), 415);
    let csv = format!(
        "{CSV_HEADER}\n{}\n",
        signed_line("smoke-s2", "acme", 300, "EUR")
    );
    let accepted = post_csv(&c, &cl, "?async=true", csv).await;
    assert_eq!(accepted.status(), 202);
    let location = accepted.headers()["location"].to_str().unwrap().to_owned();
    let done = wait_done(&c, &cl, &location, Duration::from_secs(60)).await;
    assert_eq!(done["accepted"], 1);

    // Thumbnails: 200 JPEG, 415 not an image.
    let thumb = c
        .post(cl.url("/v1/documents/thumbnail"))
        .body(tiny_png())
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.status(), 200);
    assert_eq!(thumb.headers()["content-type"], "image/jpeg");
    assert!(thumb.bytes().await.unwrap().starts_with(&[0xFF, 0xD8]));
    let not_image = c
        .post(cl.url("/v1/documents/thumbnail"))
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(not_image.status(), 415);
}

#[test]
fn idempotency_race_across_workers_yields_one_payment() {
    const RACERS: usize = 64;
    let dir = tempfile::tempdir().expect("temp dir");
    let cl = start(dir.path(), &[]);
    let addr = cl.addr;
    let key = "race-key-1";
    let body = r#"{"merchant_id":"globex","amount":4200,"currency":"USD","reference":"race"}"#;

    // Each racer opens its own connection, learns which worker serves it,
    // then all send the same request at once.
    let barrier = Arc::new(Barrier::new(RACERS));
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr).expect("connect");
                let slot = conn.slot();
                barrier.wait();
                let answer = conn
                    .request(
                        "POST",
                        "/v1/payments",
                        &[
                            ("Content-Type", "application/json"),
                            ("Idempotency-Key", key),
                        ],
                        body.as_bytes(),
                    )
                    .expect("POST");
                (slot, answer)
            })
        })
        .collect();
    let results: Vec<(u64, Answer)> = racers.into_iter().map(|t| t.join().unwrap()).collect();

    let slots: HashSet<u64> = results.iter().map(|(slot, _)| *slot).collect();
    assert_eq!(
        slots,
        HashSet::from([0, 1]),
        "the racers' connections did not spread over both workers"
    );
    let first = &results[0].1;
    assert_eq!(
        first.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );
    for (slot, answer) in &results {
        assert_eq!(answer.status, first.status, "worker {slot}");
        assert_eq!(answer.body, first.body, "worker {slot}: bodies differ");
    }
    let replayed = results
        .iter()
        .filter(|(_, a)| a.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(
        replayed,
        RACERS - 1,
        "exactly one request creates the payment"
    );
    let id = first.json()["id"].as_str().expect("id").to_owned();

    let mut conn = Conn::open(addr).expect("connect");
    let fetched = conn
        .request("GET", &format!("/v1/payments/{id}"), &[], b"")
        .expect("GET");
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, first.body);
}

/// What the test expects of one settlement line, decided when it is written.
enum Want {
    Accept {
        merchant: &'static str,
        currency: &'static str,
        amount: u64,
    },
    Reject {
        id: Option<String>,
        reason: &'static str,
    },
}

/// A batch under construction with its expected result.
#[derive(Default)]
struct Batch {
    lines: Vec<String>,
    wants: Vec<Want>,
}

impl Batch {
    fn valid(&mut self, id: &str, merchant: &'static str, amount: u64, currency: &'static str) {
        self.lines.push(signed_line(id, merchant, amount, currency));
        self.wants.push(Want::Accept {
            merchant,
            currency,
            amount,
        });
    }

    fn reject(&mut self, line: String, id: Option<&str>, reason: &'static str) {
        self.lines.push(line);
        self.wants.push(Want::Reject {
            id: id.map(str::to_owned),
            reason,
        });
    }

    fn csv(&self) -> String {
        format!("{CSV_HEADER}\n{}\n", self.lines.join("\n"))
    }

    /// The result the service must answer, computed from the wants.
    fn expected(&self) -> Value {
        let mut totals: BTreeMap<&str, BTreeMap<&str, (u64, u64)>> = BTreeMap::new();
        let mut errors = Vec::new();
        for (i, want) in self.wants.iter().enumerate() {
            match want {
                Want::Accept {
                    merchant,
                    currency,
                    amount,
                } => {
                    let t = totals
                        .entry(merchant)
                        .or_default()
                        .entry(currency)
                        .or_default();
                    t.0 += 1;
                    t.1 += amount;
                }
                // Line 1 is the header.
                Want::Reject { id, reason } => {
                    errors.push(json!({"line": i + 2, "id": id, "reason": reason}))
                }
            }
        }
        let totals: BTreeMap<&str, BTreeMap<&str, Value>> = totals
            .into_iter()
            .map(|(m, by_cur)| {
                let by_cur = by_cur
                    .into_iter()
                    .map(|(c, (count, amount))| (c, json!({"count": count, "amount": amount})))
                    .collect();
                (m, by_cur)
            })
            .collect();
        json!({
            "total": self.wants.len(),
            "accepted": self.wants.len() - errors.len(),
            "rejected": errors.len(),
            "totals": totals,
            "errors": errors,
            "errors_truncated": false,
        })
    }
}

fn assert_result(got: &Value, want: &Value) {
    for field in [
        "total",
        "accepted",
        "rejected",
        "totals",
        "errors",
        "errors_truncated",
    ] {
        assert_eq!(got[field], want[field], "field {field} of {got}");
    }
}

/// A line signed over a different amount than the one written.
fn tampered(id: &str, merchant: &str, amount: u64, currency: &str) -> String {
    let sig = sign(
        secret(merchant),
        id,
        merchant,
        &(amount + 1).to_string(),
        currency,
    );
    format!("{id},{merchant},{amount},{currency},{sig}")
}

#[tokio::test]
async fn settlement_batches_across_workers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cl = start(dir.path(), &[]);

    let merchants = ["acme", "globex", "initech"];
    let currencies = ["EUR", "USD", "GBP"];
    let mut first = Batch::default();
    for i in 0..60u64 {
        let id = format!("b1-{i}");
        let m = merchants[i as usize % 3];
        let cur = currencies[(i as usize / 3) % 3];
        match i % 10 {
            3 => first.reject(tampered(&id, m, 100 + i, cur), Some(&id), "bad_signature"),
            5 => first.reject(
                signed_line(&id, "umbrella", 100 + i, cur),
                Some(&id),
                "unknown_merchant",
            ),
            7 => first.reject(
                format!("{id},{m},{},{cur}", 100 + i),
                Some(&id),
                "malformed",
            ),
            _ => first.valid(&id, m, 100 + i, cur),
        }
    }
    // More malformed shapes: leading zero, lower-case currency, a blank line,
    // no id at all.
    let sig = sign(secret("acme"), "b1-z", "acme", "0100", "EUR");
    first.reject(
        format!("b1-z,acme,0100,EUR,{sig}"),
        Some("b1-z"),
        "malformed",
    );
    first.reject(
        signed_line("b1-l", "acme", 5, "eur"),
        Some("b1-l"),
        "malformed",
    );
    first.reject(String::new(), None, "malformed");
    first.reject(signed_line("", "acme", 5, "EUR"), None, "malformed");
    // Duplicates of accepted lines, and a rejected line that must not block
    // a later valid one with the same id.
    first.reject(
        signed_line("b1-0", "acme", 100, "EUR"),
        Some("b1-0"),
        "duplicate",
    );
    first.reject(
        signed_line("b1-1", "globex", 101, "EUR"),
        Some("b1-1"),
        "duplicate",
    );
    first.valid("b1-3", "acme", 103, "EUR");

    let c = client();
    let resp = post_csv(&c, &cl, "", first.csv()).await;
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    let want = first.expected();
    assert_eq!(want["accepted"], 43, "test model sanity");
    assert_result(&got, &want);

    // A second batch on a fresh connection (likely another worker):
    // resubmitted lines are already settled, new ones are accepted.
    let mut second = Batch::default();
    for i in [0u64, 1, 2, 4] {
        let id = format!("b1-{i}");
        let (m, cur) = (merchants[i as usize % 3], currencies[(i as usize / 3) % 3]);
        second.reject(
            signed_line(&id, m, 100 + i, cur),
            Some(&id),
            "already_settled",
        );
    }
    second.valid("b1-5", "globex", 105, "USD"); // rejected in the first batch
    second.valid("b2-1", "initech", 9_000, "GBP");
    second.reject(
        tampered("b2-2", "acme", 1, "EUR"),
        Some("b2-2"),
        "bad_signature",
    );
    let c2 = client();
    let got: Value = post_csv(&c2, &cl, "", second.csv())
        .await
        .json()
        .await
        .unwrap();
    assert_result(&got, &second.expected());

    // Both batches can be fetched by id from any worker.
    let id = got["batch_id"].as_str().expect("batch id");
    let fetched: Value = client()
        .get(cl.url(&format!("/v1/settlements/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["status"], "done");
    assert_result(&fetched, &second.expected());
}

#[tokio::test]
async fn acknowledged_work_survives_kill_9_of_every_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cl = start(dir.path(), &[]);
    let c = client();

    // Acknowledged payments: each 201 body is what must come back.
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let key = format!("durable-{i}");
        let body = format!(
            r#"{{"merchant_id":"initech","amount":{},"currency":"GBP","reference":"r{i}"}}"#,
            1000 + i
        );
        let resp = post_payment(&c, &cl, &key, &body).await;
        assert_eq!(resp.status(), 201);
        let text = resp.text().await.unwrap();
        let id = serde_json::from_str::<Value>(&text).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        acknowledged.push((key, body, id, text));
    }

    // An acknowledged async batch, big enough that the kill below usually
    // lands while it is still being checked (the test holds either way).
    let mut batch = Batch::default();
    for i in 0..20_000u64 {
        let id = format!("dur-{i}");
        let m = ["acme", "globex", "initech"][i as usize % 3];
        if i % 97 == 0 {
            batch.reject(tampered(&id, m, 1 + i, "EUR"), Some(&id), "bad_signature");
        } else {
            batch.valid(&id, m, 1 + i, "EUR");
        }
    }
    let resp = post_csv(&c, &cl, "?async=true", batch.csv()).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    drop(c);

    // kill -9 the primary and every worker at once.
    let workers = cl.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    cl.kill_all();
    drop(cl);

    let cl = start(dir.path(), &[]);
    let c = client();
    for (key, body, id, text) in &acknowledged {
        let got = c
            .get(cl.url(&format!("/v1/payments/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200, "payment {id} lost");
        assert_eq!(&got.text().await.unwrap(), text);
        // The idempotency key survived too: no second payment.
        let replay = post_payment(&c, &cl, key, body).await;
        assert_eq!(replay.status(), 201);
        assert_eq!(&replay.text().await.unwrap(), text);
    }
    let done = wait_done(&c, &cl, &location, Duration::from_secs(120)).await;
    assert_result(&done, &batch.expected());
    assert_eq!(done["processed"], 20_000);
}

#[test]
fn sigterm_stops_every_process_with_status_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cl = start(dir.path(), &[]);
    let workers = cl.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let mut conn = Conn::open(cl.addr).expect("connect");
    conn.slot();

    cl.signal(Signal::SIGTERM);
    let status = cl.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}; stderr:\n{}", cl.stderr());
    let pgid = cl.pid();
    assert!(
        wait_until(Duration::from_secs(30), || group_members(pgid).is_empty()),
        "left running after SIGTERM: {:?}",
        group_members(pgid)
    );
}

#[test]
fn events_from_one_worker_reach_a_subscriber_on_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = start(dir.path(), &[]);
    // Keep-alive connections remember their worker: find one on each.
    let mut subscriber = Conn::open(cluster.addr).expect("connect");
    let subscriber_slot = subscriber.slot();
    let mut publisher = None;
    for _ in 0..200 {
        let mut conn = Conn::open(cluster.addr).expect("connect");
        if conn.slot() != subscriber_slot {
            publisher = Some(conn);
            break;
        }
    }
    let mut publisher = publisher.expect("a connection on the other worker");
    let mut events = subscriber.upgrade_to_websocket("/v1/events");

    let answer = publisher
        .request(
            "POST",
            "/v1/payments",
            &[
                ("Idempotency-Key", "cross-worker-event"),
                ("Content-Type", "application/json"),
            ],
            br#"{"merchant_id":"acme","amount":4200,"currency":"EUR","reference":"ws"}"#,
        )
        .expect("POST /v1/payments");
    assert_eq!(answer.status, 201);
    let payment = answer.json();

    let event: Value = serde_json::from_str(&read_text_frame(&mut events)).expect("event json");
    assert_eq!(event["type"], "payment.captured");
    assert_eq!(event["id"], payment["id"]);
    assert_eq!(event["amount"], 4200);
}
