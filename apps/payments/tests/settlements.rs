//! `POST /v1/settlements` (sync and async), `GET /v1/settlements/{id}`,
//! job recovery and overload, over real TCP. Expected results are computed
//! here from the CSV text with an independent model of the rules.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use payments::{jobs, AppState, Heavy};
use serde_json::{json, Value};

/// What the service should answer, computed independently.
#[derive(Debug, Default)]
struct Expected {
    total: usize,
    accepted: usize,
    rejected: usize,
    totals: BTreeMap<String, BTreeMap<String, (u64, u128)>>,
    errors: Vec<(usize, Value, String)>,
}

fn known(m: &str) -> bool {
    matches!(m, "acme" | "globex" | "initech")
}

/// Model of the rules: classify each data line given the ids settled before.
fn expect(csv: &str, settled: &mut HashSet<String>) -> Expected {
    let mut e = Expected::default();
    let data = csv.split_once('\n').map(|(_, d)| d).unwrap_or("");
    let data = data.strip_suffix('\n').unwrap_or(data);
    if data.is_empty() && !csv.ends_with("\n\n") {
        return e;
    }
    let mut accepted_here = HashSet::new();
    for (i, raw) in data.split('\n').enumerate() {
        let line_no = i + 2;
        e.total += 1;
        let l = raw.strip_suffix('\r').unwrap_or(raw);
        let f: Vec<&str> = l.split(',').collect();
        let id = f
            .first()
            .filter(|s| !s.is_empty())
            .map(|s| json!(s))
            .unwrap_or(Value::Null);
        let reason = if f.len() != 5
            || f[0].is_empty()
            || f[1].is_empty()
            || f[2].is_empty()
            || f[2].starts_with('0')
            || !f[2].bytes().all(|b| b.is_ascii_digit())
            || f[2].parse::<i64>().is_err()
            || f[3].len() != 3
            || !f[3].bytes().all(|b| b.is_ascii_uppercase())
            || f[4].len() != 64
            || !f[4]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Some("malformed")
        } else if !known(f[1]) {
            Some("unknown_merchant")
        } else if sign(secret(f[1]), f[0], f[1], f[2], f[3]) != f[4] {
            Some("bad_signature")
        } else if accepted_here.contains(f[0]) {
            Some("duplicate")
        } else if settled.contains(f[0]) {
            Some("already_settled")
        } else {
            None
        };
        match reason {
            Some(r) => {
                e.rejected += 1;
                e.errors.push((line_no, id, r.to_string()));
            }
            None => {
                e.accepted += 1;
                accepted_here.insert(f[0].to_string());
                settled.insert(f[0].to_string());
                let t = e
                    .totals
                    .entry(f[1].to_string())
                    .or_default()
                    .entry(f[3].to_string())
                    .or_default();
                t.0 += 1;
                t.1 += f[2].parse::<u128>().expect("amount");
            }
        }
    }
    e
}

fn assert_matches(got: &Value, e: &Expected) {
    assert_eq!(got["total"], json!(e.total), "total in {got}");
    assert_eq!(got["accepted"], json!(e.accepted), "accepted");
    assert_eq!(got["rejected"], json!(e.rejected), "rejected");
    let mut totals = serde_json::Map::new();
    for (m, by_cur) in &e.totals {
        let mut inner = serde_json::Map::new();
        for (c, (count, amount)) in by_cur {
            let amount: Value = serde_json::from_str(&amount.to_string()).expect("number");
            inner.insert(c.clone(), json!({"count": count, "amount": amount}));
        }
        totals.insert(m.clone(), Value::Object(inner));
    }
    assert_eq!(got["totals"], Value::Object(totals), "totals");
    let errors: Vec<Value> = e
        .errors
        .iter()
        .take(10_000)
        .map(|(line, id, reason)| json!({"line": line, "id": id, "reason": reason}))
        .collect();
    assert_eq!(got["errors"], Value::Array(errors), "errors");
    assert_eq!(got["errors_truncated"], json!(e.errors.len() > 10_000));
}

async fn post_csv(s: &Server, query: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    s.client
        .post(s.url(&format!("/v1/settlements{query}")))
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .expect("request")
}

/// A batch exercising every rule, with a final newline.
fn mixed_batch() -> String {
    let big = "9223372036854775807";
    let bad_sig = |id: &str, m: &str, a: &str, c: &str| {
        let sig = sign(secret(m), id, m, "1", c);
        format!("{id},{m},{a},{c},{sig}")
    };
    let upper = line("u1", "acme", "5", "EUR")
        .to_uppercase()
        .replace("U1,ACME", "u1,acme");
    let lines = vec![
        line("a1", "acme", "100", "EUR"),
        line("a2", "globex", "250", "USD"),
        format!(
            "a3,acme,0100,EUR,{}",
            sign(secret("acme"), "a3", "acme", "0100", "EUR")
        ),
        String::new(),
        line("a4", "nobody", "5", "EUR"),
        bad_sig("a5", "acme", "7", "EUR"),
        line("a1", "acme", "100", "EUR"),
        bad_sig("a6", "acme", "8", "EUR"),
        line("a6", "acme", "8", "EUR"),
        "a7,acme,5,EUR".to_string(),
        format!("{}\r", line("a8", "initech", "999", "GBP")),
        upper,
        line("a10", "nobody", "5", "eur"),
        line("a9", "acme", big, "EUR"),
        "a11,acme,-5,EUR,".to_string() + &"0".repeat(64),
        line("a12", "acme", "5", "EUR") + ",extra",
        ",acme,5,EUR,".to_string() + &"0".repeat(64),
    ];
    format!("{HEADER}\n{}\n", lines.join("\n"))
}

#[tokio::test]
async fn mixed_batch_then_resubmission() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let mut settled = HashSet::new();
    let csv = mixed_batch();

    let e = expect(&csv, &mut settled);
    assert_eq!(e.accepted, 5, "model sanity: {e:?}");
    let resp = post_csv(&s, "", csv.clone()).await;
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.expect("json");
    assert!(got["batch_id"].as_str().is_some_and(|b| !b.is_empty()));
    assert_matches(&got, &e);

    // Fetch the synchronous batch by id.
    let id = got["batch_id"].as_str().expect("id");
    let fetched: Value = s.get_json(&format!("/v1/settlements/{id}")).await;
    assert_eq!(fetched["status"], "done");
    assert_eq!(fetched["processed"], json!(e.total));
    assert_matches(&fetched, &e);

    // Again: nothing is settled twice.
    let e2 = expect(&csv, &mut settled);
    assert_eq!(e2.accepted, 0);
    let again: Value = post_csv(&s, "", csv).await.json().await.expect("json");
    assert_matches(&again, &e2);
    assert_eq!(s.state.store().settled_count().expect("count"), 5);
}

#[tokio::test]
async fn header_body_and_type_rules() {
    let dir = data_dir();
    let mut cfg = config(dir.path());
    cfg.max_settlement_bytes = 4096;
    let s = serve(cfg, 0).await;
    for only_header in [
        HEADER.to_string(),
        format!("{HEADER}\n"),
        format!("{HEADER}\r\n"),
    ] {
        let resp = post_csv(&s, "", only_header).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(
            (v["total"].clone(), v["accepted"].clone()),
            (json!(0), json!(0))
        );
    }
    for bad in [
        "",
        "\n",
        "id,merchant_id,amount,currency\n",
        "ID,MERCHANT_ID,AMOUNT,CURRENCY,SIGNATURE\n",
    ] {
        let resp = post_csv(&s, "", bad).await;
        assert_eq!(resp.status(), 400, "{bad:?}");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["code"], "bad_csv_header");
        // Also before a 202.
        assert_eq!(post_csv(&s, "?async=true", bad).await.status(), 400);
    }
    // Content types.
    let body = format!("{HEADER}\n{}\n", line("t1", "acme", "1", "EUR"));
    let with_type = |t: Option<&'static str>| {
        let mut r = s.client.post(s.url("/v1/settlements")).body(body.clone());
        if let Some(t) = t {
            r = r.header("content-type", t);
        }
        r.send()
    };
    assert_eq!(
        with_type(Some("application/json"))
            .await
            .expect("send")
            .status(),
        415
    );
    assert_eq!(
        with_type(Some("text/csv; charset=utf-8"))
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        with_type(Some("application/csv"))
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(with_type(None).await.expect("send").status(), 200);
    // Size limit: exactly the limit is fine, one more byte is 413 (sync and async).
    let mut exact = format!("{HEADER}\n").into_bytes();
    exact.resize(4096, b'x');
    assert_eq!(post_csv(&s, "", exact.clone()).await.status(), 200);
    exact.push(b'x');
    assert_eq!(post_csv(&s, "", exact.clone()).await.status(), 413);
    assert_eq!(post_csv(&s, "?async=true", exact).await.status(), 413);
    // Unknown batch.
    let resp = s
        .client
        .get(s.url("/v1/settlements/stl_nope"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batch_across_many_chunks() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let args = payments::gen::GenArgs {
        lines: 30_000,
        merchants: None,
        seed: 7,
        bad_every: 7,
        id_prefix: "big".into(),
    };
    let csv = payments::gen::generate_batch(&payments::Merchants::demo(), &args);
    assert!(csv.len() > 4 * payments::settlement::CHUNK_BYTES);
    let e = expect(&csv, &mut HashSet::new());
    assert_eq!(e.rejected, 30_000 / 7);
    let got: Value = post_csv(&s, "", csv).await.json().await.expect("json");
    assert_matches(&got, &e);
}

#[tokio::test]
async fn errors_are_capped_at_ten_thousand() {
    let dir = data_dir();
    let s = serve(config(dir.path()), 0).await;
    let mut csv = format!("{HEADER}\n");
    for i in 0..10_005 {
        csv.push_str(&format!("bad{i}\n"));
    }
    csv.push_str(&line("ok1", "acme", "3", "EUR"));
    let e = expect(&csv, &mut HashSet::new());
    let got: Value = post_csv(&s, "", csv).await.json().await.expect("json");
    assert_eq!(got["errors"].as_array().map(Vec::len), Some(10_000));
    assert_eq!(got["errors_truncated"], true);
    assert_eq!(got["rejected"], 10_005);
    assert_eq!(got["accepted"], 1);
    assert_eq!(got["total"], 10_006);
    assert_matches(&got, &e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_batches_settle_each_id_once() {
    let dir = data_dir();
    let a = std::sync::Arc::new(serve(config(dir.path()), 0).await);
    let b = std::sync::Arc::new(serve(config(dir.path()), 1).await);
    // Eight batches over 0..400 in overlapping windows, sent at once to two
    // "processes".
    let batches: Vec<String> = (0..8)
        .map(|k| {
            let lines: Vec<String> = (k * 40..k * 40 + 100)
                .map(|i| line(&format!("r{i}"), "globex", &(i + 1).to_string(), "USD"))
                .collect();
            format!("{HEADER}\n{}\n", lines.join("\n"))
        })
        .collect();
    let tasks: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(k, csv)| {
            let s = if k % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let v: Value = post_csv(&s, "", csv).await.json().await.expect("json");
                v
            })
        })
        .collect();
    let mut accepted = 0;
    let mut amount = 0u64;
    for t in tasks {
        let v = t.await.expect("task");
        accepted += v["accepted"].as_u64().expect("accepted");
        amount += v["totals"]["globex"]["USD"]["amount"].as_u64().unwrap_or(0);
        assert_eq!(v["total"], 100);
        assert_eq!(
            v["rejected"].as_u64().expect("r") + v["accepted"].as_u64().expect("a"),
            100
        );
    }
    let unique = 7 * 40 + 100;
    assert_eq!(accepted, unique as u64);
    assert_eq!(amount, (1..=unique as u64).sum::<u64>());
    assert_eq!(
        a.state.store().settled_count().expect("count"),
        unique as u64
    );
}

/// Poll a batch until it is done (bounded; completion does not depend on timing).
async fn wait_done(s: &Server, location: &str) -> Value {
    for _ in 0..3000 {
        let v: Value = s.get_json(location).await;
        if v["status"] == "done" {
            return v;
        }
        assert_eq!(v["status"], "processing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("batch {location} did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_batch_is_processing_then_done() {
    let dir = data_dir();
    let heavy = Heavy::new(1, 4).expect("pool");
    let s = serve_with_heavy(config(dir.path()), heavy.clone()).await;
    // Hold the only pool thread so the job stays queued.
    let release = block_one(&heavy).await;
    let mut events = s.state.events().subscribe();
    let csv = mixed_batch();
    let resp = post_csv(&s, "?async=true", csv.clone()).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    let body: Value = resp.json().await.expect("json");
    let batch_id = body["batch_id"].as_str().expect("batch id").to_string();
    assert_eq!(location, format!("/v1/settlements/{batch_id}"));

    let e = expect(&csv, &mut HashSet::new());
    let pending: Value = s.get_json(&location).await;
    assert_eq!(pending["status"], "processing");
    assert_eq!(pending["processed"], 0);
    assert_eq!(pending["total"], json!(e.total));
    assert_eq!(pending["batch_id"], json!(batch_id));

    // A second process sees the same state.
    let other = serve(config(dir.path()), 1).await;
    let seen: Value = other.get_json(&location).await;
    assert_eq!(seen["status"], "processing");

    release.release().await;
    let done = wait_done(&s, &location).await;
    assert_eq!(done["processed"], json!(e.total));
    assert_matches(&done, &e);
    let seen: Value = other.get_json(&location).await;
    assert_eq!(seen, done);

    // Progress, then completion, were published (the event may trail the
    // commit, so wait for it rather than peek).
    let mut kinds = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("completion event")
            .expect("event");
        kinds.push(ev.kind.clone());
        if ev.kind == "settlement.completed" {
            assert_eq!(ev.data["batch_id"], json!(batch_id));
            break;
        }
    }
    assert!(
        kinds.contains(&"settlement.progress".to_string()),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_turns_heavy_requests_away_only() {
    let dir = data_dir();
    let heavy = Heavy::new(1, 0).expect("pool");
    let s = serve_with_heavy(config(dir.path()), heavy.clone()).await;
    let release = block_one(&heavy).await;
    let csv = format!("{HEADER}\n{}\n", line("o1", "acme", "1", "EUR"));
    for query in ["", "?async=true"] {
        let resp = post_csv(&s, query, csv.clone()).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["code"], "overloaded");
    }
    let png = tiny_png();
    let resp = s
        .client
        .post(s.url("/v1/documents/thumbnail"))
        .body(png)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    // Light endpoints keep working.
    assert_eq!(
        s.client
            .get(s.url("/health"))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    let pay = s
        .client
        .post(s.url("/v1/payments"))
        .header("Idempotency-Key", "during-overload")
        .body(r#"{"merchant_id":"acme","amount":1,"currency":"EUR","reference":"r"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(pay.status(), 201);
    // Nothing was stored for the refused async batch.
    assert_eq!(s.state.store().settled_count().expect("count"), 0);
    release.release().await;
    assert_eq!(post_csv(&s, "", csv).await.status(), 200);
}

fn tiny_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

#[tokio::test]
async fn stored_job_is_recovered_by_a_fresh_state() {
    let dir = data_dir();
    let csv = mixed_batch();
    let e = expect(&csv, &mut HashSet::new());
    {
        // A process stored the job and died: its lease has run out.
        let dead = AppState::new(config(dir.path()), 0).expect("state");
        dead.store()
            .enqueue_batch(
                "stl_orphan",
                csv.as_bytes(),
                e.total as u64,
                "dead-process",
                0,
            )
            .expect("enqueue");
        // One leased to a live process is left alone.
        dead.store()
            .enqueue_batch(
                "stl_leased",
                csv.as_bytes(),
                e.total as u64,
                "live-process",
                i64::MAX,
            )
            .expect("enqueue");
    }
    let fresh = AppState::new(config(dir.path()), 1).expect("state");
    assert_eq!(jobs::recover(&fresh).await.expect("recover"), 1);
    let s = serve_state(fresh).await;
    let done: Value = s.get_json("/v1/settlements/stl_orphan").await;
    assert_eq!(done["status"], "done");
    assert_matches(&done, &e);
    let leased: Value = s.get_json("/v1/settlements/stl_leased").await;
    assert_eq!(leased["status"], "processing");
    // Nothing left to claim; the recovered job is not run twice.
    assert_eq!(jobs::recover(&s.state).await.expect("recover"), 0);
}

#[test]
fn a_former_owner_cannot_commit_after_losing_the_lease() {
    use payments::Store as _;
    let dir = data_dir();
    let store = payments::SqliteStore::open(
        dir.path(),
        payments::Synchronous::Full,
        Duration::from_secs(30),
    )
    .expect("open");
    let csv = mixed_batch();
    store
        .enqueue_batch("stl_x", csv.as_bytes(), 17, "old", 0)
        .expect("enqueue");
    assert_eq!(
        store.claim_expired("new", i64::MAX).expect("claim"),
        vec!["stl_x".to_string()]
    );
    let merchants = payments::Merchants::demo();
    let data = payments::settlement::split_header(csv.as_bytes()).expect("header");
    let lines = payments::settlement::check_all(data, &merchants, |_| {});
    assert!(store
        .settle("stl_x", &lines, Some("old"))
        .expect("settle")
        .is_none());
    assert_eq!(store.settled_count().expect("count"), 0);
    let r = store
        .settle("stl_x", &lines, Some("new"))
        .expect("settle")
        .expect("ours");
    assert_eq!(r.accepted, 5);
    // Done jobs cannot be committed again, by anyone.
    assert!(store
        .settle("stl_x", &lines, Some("new"))
        .expect("settle")
        .is_none());
    assert_eq!(store.settled_count().expect("count"), 5);
}

#[test]
fn async_batch_survives_killing_every_process() {
    let dir = data_dir();
    let mut cfg = config(dir.path());
    cfg.lease = Duration::from_millis(300);
    let csv = mixed_batch();
    let e = expect(&csv, &mut HashSet::new());

    // Process A accepts the batch (202) but is killed before its job runs.
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let heavy_a = Heavy::new(1, 4).expect("pool");
    let (location, release) = rt_a.block_on(async {
        let s = serve_with_heavy(cfg.clone(), heavy_a.clone()).await;
        let release = block_one(&heavy_a).await;
        let resp = post_csv(&s, "?async=true", csv.clone()).await;
        assert_eq!(resp.status(), 202);
        let location = resp.headers()["location"]
            .to_str()
            .expect("loc")
            .to_string();
        std::mem::forget(s); // dies with its runtime below
        (location, release)
    });
    rt_a.shutdown_background();

    // The cluster restarts: process B claims the job once A's lease is out.
    let rt_b = tokio::runtime::Runtime::new().expect("runtime");
    rt_b.block_on(async {
        let s = serve(cfg, 1).await;
        let mut claimed = 0;
        for _ in 0..300 {
            claimed = jobs::recover(&s.state).await.expect("recover");
            if claimed > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(claimed, 1);
        let done: Value = s.get_json(&location).await;
        assert_eq!(done["status"], "done");
        assert_matches(&done, &e);
    });
    drop(release);
}
