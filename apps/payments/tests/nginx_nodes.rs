//! Two `payments` nodes (real binaries on 127.0.0.2 and 127.0.0.3, standing
//! for two machines) on one Postgres (`CORRAL_TEST_POSTGRES`) and one Redis
//! (`CORRAL_TEST_REDIS`), behind Debian's nginx on 127.0.0.1, as a
//! deployment behind a load balancer runs: what one node stores the other
//! serves, one idempotency key makes one payment and one settlement id is
//! settled once however requests spread, events cross nodes, and a node
//! that stops or dies costs no request and no acknowledged payment.
//!
//! nginx names the node that answered each request (`X-Upstream`), so every
//! test proves which node did what.

mod cluster_support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_support::nginx::{self, Nginx};
use cluster_support::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// The tests of this file run one at a time: each runs two clusters, nginx
/// and bursts of requests on a shared Postgres, whose connection limit and
/// the machine's cores several at once would exhaust.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Node A, node B and nginx in front of them.
struct Deployment {
    // Dropped first: nginx, then the nodes.
    nginx: Nginx,
    a: Cluster,
    b: Cluster,
    client: reqwest::Client,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Deployment {
    /// The deployment, or `None` once `test` was reported skipped because
    /// nginx, Postgres or Redis is missing.
    fn start(test: &str) -> Option<Deployment> {
        let Some(program) = nginx::program() else {
            report_skipped(test, "nginx is not installed: apt-get install nginx");
            return None;
        };
        let postgres = env_or_skip(test, "CORRAL_TEST_POSTGRES")?;
        let redis = env_or_skip(test, "CORRAL_TEST_REDIS")?;
        let dirs = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let flags = ["--database", &postgres, "--broadcast", &redis];
        let a = start_on("127.0.0.2", dirs.0.path(), &flags);
        let b = start_on("127.0.0.3", dirs.1.path(), &flags);
        let nginx = Nginx::start(&program, &[a.addr, b.addr]);
        Some(Deployment {
            nginx,
            a,
            b,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            _dirs: dirs,
        })
    }

    /// `POST /v1/payments` through nginx.
    async fn pay(&self, key: &str, reference: &str) -> Reply {
        let body = format!(
            r#"{{"merchant_id":"acme","amount":4200,"currency":"EUR","reference":"{reference}"}}"#
        );
        let sent = self
            .client
            .post(self.nginx.url("/v1/payments"))
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await;
        Reply::read(sent).await
    }

    /// `GET path` through nginx.
    async fn get(&self, path: &str) -> Reply {
        Reply::read(self.client.get(self.nginx.url(path)).send().await).await
    }

    /// A fresh payment through nginx that node `node` created.
    async fn pay_on(&self, node: SocketAddr, reference: &str) -> Reply {
        for _ in 0..10 {
            let reply = self.pay(&fresh_key(), reference).await;
            assert_eq!(reply.status, 201, "{reply:?}");
            if reply.node() == Some(node) {
                return reply;
            }
        }
        panic!("nginx sent 10 payments in a row past {node}");
    }

    /// `GET path` through nginx until node `node` answers it.
    async fn get_on(&self, node: SocketAddr, path: &str) -> Reply {
        for _ in 0..10 {
            let reply = self.get(path).await;
            if reply.node() == Some(node) {
                return reply;
            }
        }
        panic!("nginx sent 10 requests in a row past {node}");
    }

    fn diagnostics(&self) -> String {
        format!(
            "A stderr:\n{}\nB stderr:\n{}\nnginx error.log:\n{}",
            self.a.stderr(),
            self.b.stderr(),
            self.nginx.error_log()
        )
    }
}

/// One answer through nginx (or the transport error in its place).
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    /// `X-Upstream`: the nodes nginx tried, in order (`A, B` when A failed
    /// and B answered).
    upstreams: String,
    replayed: bool,
    body: Vec<u8>,
    error: Option<String>,
}

impl Reply {
    async fn read(sent: reqwest::Result<reqwest::Response>) -> Reply {
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Reply {
                    status: 0,
                    upstreams: String::new(),
                    replayed: false,
                    body: Vec::new(),
                    error: Some(format!("{e:?}")),
                }
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let upstreams = header("x-upstream");
        let replayed = header("idempotent-replayed") == "true";
        match response.bytes().await {
            Ok(body) => Reply {
                status,
                upstreams,
                replayed,
                body: body.to_vec(),
                error: None,
            },
            Err(e) => Reply {
                status,
                upstreams,
                replayed,
                body: Vec::new(),
                error: Some(format!("body: {e:?}")),
            },
        }
    }

    /// The node that gave the answer.
    fn node(&self) -> Option<SocketAddr> {
        self.upstreams.rsplit(", ").next()?.trim().parse().ok()
    }

    /// Whether nginx tried `node` for this request (answered or not).
    fn tried(&self, node: SocketAddr) -> bool {
        self.upstreams
            .split(", ")
            .any(|u| u.trim().parse() == Ok(node))
    }

    fn ok(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}) from {}: {:?}",
                self.upstreams,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().expect("payment id").to_owned()
    }
}

fn fresh_key() -> String {
    format!("nginx-{}", payments::domain::ids::random_token(16))
}

#[tokio::test]
async fn a_payment_created_through_node_a_is_fetched_through_node_b() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(d) = Deployment::start("a_payment_created_through_node_a_is_fetched_through_node_b")
    else {
        return;
    };
    let created = d.pay_on(d.a.addr, "made on A").await;
    let id = created.id();
    let fetched = d.get_on(d.b.addr, &format!("/v1/payments/{id}")).await;
    assert_eq!(fetched.status, 200, "{fetched:?}\n{}", d.diagnostics());
    assert_eq!(fetched.body, created.body);
}

#[tokio::test]
async fn sixty_four_racing_requests_with_one_key_over_both_nodes_make_one_payment() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(d) = Deployment::start(
        "sixty_four_racing_requests_with_one_key_over_both_nodes_make_one_payment",
    ) else {
        return;
    };
    let key = fresh_key();
    let started = Instant::now();
    let replies =
        futures_util::future::join_all((0..64).map(|_| d.pay(&key, "one key, 64 requests"))).await;
    let took = started.elapsed();
    for reply in &replies {
        assert_eq!(reply.status, 201, "{reply:?}\n{}", d.diagnostics());
    }
    let ids: HashSet<String> = replies.iter().map(Reply::id).collect();
    assert_eq!(ids.len(), 1, "several payments for one key: {ids:?}");
    let created: Vec<&Reply> = replies.iter().filter(|r| !r.replayed).collect();
    assert_eq!(created.len(), 1, "created more than once: {created:?}");
    assert!(
        replies.iter().all(|r| r.body == created[0].body),
        "a replay differs from the first answer"
    );
    let on = |node: SocketAddr| replies.iter().filter(|r| r.node() == Some(node)).count();
    let (on_a, on_b) = (on(d.a.addr), on(d.b.addr));
    assert!(
        on_a > 0 && on_b > 0 && on_a + on_b == 64,
        "not spread over both nodes: {on_a} on A, {on_b} on B"
    );
    eprintln!("64 requests in {took:?}: {on_a} answered by A, {on_b} by B, one payment");
}

#[tokio::test]
async fn a_websocket_subscriber_on_node_b_hears_a_capture_on_node_a_within_a_second() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(d) = Deployment::start(
        "a_websocket_subscriber_on_node_b_hears_a_capture_on_node_a_within_a_second",
    ) else {
        return;
    };
    // Subscribe through nginx (its upgrade headers) until B holds the socket.
    let mut subscriber = None;
    for _ in 0..10 {
        let conn = Conn::open(d.nginx.addr).expect("connect to nginx");
        let (stream, headers) = conn.websocket("/v1/events");
        let upstream = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-upstream"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        if upstream.parse() == Ok(d.b.addr) {
            subscriber = Some(stream);
            break;
        }
    }
    let mut events = subscriber.expect("nginx never upgraded a socket on B");
    // The `payment.captured` event of payment `id`, others skipped (other
    // tests' nodes may publish on the same Redis), within `limit`.
    let mut captured = |id: &str, limit: Duration| -> Option<(Value, Duration)> {
        let started = Instant::now();
        loop {
            let left = limit.checked_sub(started.elapsed())?;
            events
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            let Ok(frame) = try_read_text_frame(&mut events) else {
                return None;
            };
            let event: Value = serde_json::from_str(&frame).expect("event JSON");
            if event["type"] == "payment.captured" && event["id"] == id {
                return Some((event, started.elapsed()));
            }
        }
    };
    // Once the nodes hear each other on Redis (the first crossing is allowed
    // the time of a subscription to come up)...
    let first = d.pay_on(d.a.addr, "warm-up on A").await;
    assert!(
        captured(&first.id(), Duration::from_secs(30)).is_some(),
        "B's subscriber never heard A's payment\n{}",
        d.diagnostics()
    );
    // ...a capture on A reaches the subscriber on B within a second of the
    // request being sent.
    let sent = Instant::now();
    let second = d.pay_on(d.a.addr, "timed on A").await;
    let answered = sent.elapsed();
    let id = second.id();
    let (event, _) = captured(&id, Duration::from_secs(1).saturating_sub(answered))
        .unwrap_or_else(|| {
            panic!(
                "no payment.captured for {id} on B within 1 s of its request (answered after {answered:?})"
            )
        });
    let heard = sent.elapsed();
    let mut expected = second.json();
    expected["type"] = Value::from("payment.captured");
    assert_eq!(event, expected);
    eprintln!("captured on A, answered after {answered:?}, heard on B after {heard:?}");
}

#[tokio::test]
async fn one_settlement_batch_posted_to_both_nodes_at_once_settles_each_id_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(d) =
        Deployment::start("one_settlement_batch_posted_to_both_nodes_at_once_settles_each_id_once")
    else {
        return;
    };
    let lines = 5_000;
    let args = payments::gen::GenArgs {
        lines,
        merchants: None,
        seed: 11,
        bad_every: 0,
        id_prefix: format!("race-{}", payments::domain::ids::random_token(10)),
    };
    let csv = payments::gen::generate_batch(&payments::Merchants::demo(), &args);
    let ids: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), lines);
    let post = || async {
        let started = Instant::now();
        let reply = Reply::read(
            d.client
                .post(d.nginx.url("/v1/settlements"))
                .header("content-type", "text/csv")
                .body(csv.clone())
                .send()
                .await,
        )
        .await;
        (started, Instant::now(), reply)
    };
    let ((start_1, end_1, first), (start_2, end_2, second)) = tokio::join!(post(), post());
    for reply in [&first, &second] {
        assert_eq!(reply.status, 200, "{reply:?}\n{}", d.diagnostics());
    }
    // nginx sent one to each node, and they were in flight together.
    let nodes: HashSet<Option<SocketAddr>> = [first.node(), second.node()].into();
    assert_eq!(nodes, [Some(d.a.addr), Some(d.b.addr)].into());
    assert!(
        start_1 < end_2 && start_2 < end_1,
        "the two posts did not overlap"
    );
    // Every id: accepted by exactly one of them, `already_settled` in the
    // other's answer.
    let rejected = |reply: &Reply| -> HashMap<String, String> {
        let result = reply.json();
        assert_eq!(result["errors_truncated"], false);
        result["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().expect("id").to_owned(),
                    e["reason"].as_str().expect("reason").to_owned(),
                )
            })
            .collect()
    };
    let (rejected_1, rejected_2) = (rejected(&first), rejected(&second));
    for id in &ids {
        match (rejected_1.get(id), rejected_2.get(id)) {
            (None, Some(reason)) | (Some(reason), None) => {
                assert_eq!(reason, "already_settled", "{id}")
            }
            (None, None) => panic!("{id} settled by both batches"),
            (Some(a), Some(b)) => panic!("{id} settled by neither: {a}, {b}"),
        }
    }
    let accepted = |reply: &Reply| reply.json()["accepted"].as_u64().expect("accepted");
    assert_eq!(accepted(&first) + accepted(&second), lines as u64);
    eprintln!(
        "{lines} ids: {} settled through {}, {} through {}",
        accepted(&first),
        first.upstreams,
        accepted(&second),
        second.upstreams
    );
}

/// A reply and when it came.
#[derive(Debug)]
struct Timed {
    answered: Instant,
    reply: Reply,
}

/// Clients posting payments through nginx, each with a fresh key, until
/// stopped; every reply kept with the time it came.
struct Load {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Timed>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(d: &Deployment, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, replies) = (stop.clone(), replies.clone());
                let (client, url) = (d.client.clone(), d.nginx.url("/v1/payments"));
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let sent = client
                            .post(&url)
                            .header("idempotency-key", fresh_key())
                            .body(r#"{"merchant_id":"acme","amount":100,"currency":"EUR","reference":"load"}"#)
                            .send()
                            .await;
                        let reply = Reply::read(sent).await;
                        replies.lock().unwrap().push(Timed {
                            answered: Instant::now(),
                            reply,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            replies,
            tasks,
        }
    }

    /// Replies so far answered by `node`, after `since` if given.
    fn answered_by(&self, node: SocketAddr, since: Option<Instant>) -> usize {
        self.replies
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.reply.node() == Some(node) && since.is_none_or(|s| t.answered > s))
            .count()
    }

    /// Waits until both nodes answered `each` requests (at most 60 s).
    async fn until_both_served(&self, d: &Deployment, each: usize) {
        let started = Instant::now();
        while self.answered_by(d.a.addr, None) < each || self.answered_by(d.b.addr, None) < each {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "load not served by both nodes\n{}",
                d.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<Timed> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("load client");
        }
        Arc::try_unwrap(self.replies)
            .expect("clients done")
            .into_inner()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_node_a_under_load_fails_no_request_while_nginx_moves_to_node_b() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut d) = Deployment::start(
        "sigterm_to_node_a_under_load_fails_no_request_while_nginx_moves_to_node_b",
    ) else {
        return;
    };
    let (a_addr, b_addr) = (d.a.addr, d.b.addr);
    let a_pid = d.a.pid();
    let load = Load::start(&d, 8);
    load.until_both_served(&d, 20).await;
    let termed = Instant::now();
    d.a.signal(Signal::SIGTERM);
    // The load goes on while A drains (an exited primary is a zombie until
    // reaped, which counts as gone).
    while process_alive(a_pid) {
        assert!(
            termed.elapsed() < Duration::from_secs(60),
            "A still running 60 s after SIGTERM\n{}",
            d.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let exited = Instant::now();
    let status = d.a.wait_exit(Duration::from_secs(5));
    // B alone for a while after A is gone.
    let before = load.answered_by(b_addr, Some(exited));
    let started = Instant::now();
    while load.answered_by(b_addr, Some(exited)) < before + 100 {
        assert!(started.elapsed() < Duration::from_secs(60), "B stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replies = load.finish().await;

    assert!(status.success(), "A exited with {status}\n{}", d.a.stderr());
    assert!(
        group_members(a_pid).is_empty(),
        "A left processes behind: {:?}",
        group_members(a_pid)
    );
    let failed: Vec<&Reply> = replies
        .iter()
        .map(|t| &t.reply)
        .filter(|r| !r.ok())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}\nA stderr:\n{}\nnginx error.log:\n{}",
        failed.len(),
        replies.len(),
        &failed[..failed.len().min(5)],
        d.a.stderr(),
        d.nginx.error_log()
    );
    let count = |f: &dyn Fn(&Timed) -> bool| replies.iter().filter(|t| f(t)).count();
    let a_before = count(&|t| t.reply.node() == Some(a_addr) && t.answered < termed);
    let a_draining = count(&|t| t.reply.node() == Some(a_addr) && t.answered >= termed);
    // Answers leave A before its primary exits.
    let a_after = count(&|t| t.reply.node() == Some(a_addr) && t.answered > exited);
    let b_after = count(&|t| t.reply.node() == Some(b_addr) && t.answered > exited);
    assert!(a_before > 0 && b_after >= 100, "{a_before} {b_after}");
    assert_eq!(a_after, 0, "A answered after its primary exited");
    // Every payment acknowledged is there.
    for t in &replies {
        let fetched = d.get(&format!("/v1/payments/{}", t.reply.id())).await;
        assert_eq!(fetched.status, 200, "{fetched:?}");
        assert_eq!(fetched.body, t.reply.body);
    }
    // nginx hides from the clients what it retried; say how many A dropped
    // after they were sent to it (reset, not refused).
    let moved = count(&|t| t.reply.tried(a_addr) && t.reply.node() == Some(b_addr));
    let dropped = d
        .nginx
        .error_log()
        .lines()
        .filter(|l| l.contains("reset by peer") && l.contains("reading response header"))
        .count();
    eprintln!(
        "{} requests, none failed: A answered {a_before} before SIGTERM and {a_draining} while \
         draining, exited 0 {:?} after it; B answered {b_after} after; nginx moved {moved} from A \
         to B, {dropped} of them reset by A after being sent",
        replies.len(),
        exited - termed,
    );
    // A stopping node stops listening before its workers stop accepting, so
    // nginx finds the port refused (safe to retry) rather than a queue that
    // is reset after the request was sent (8 such resets per stop before).
    assert_eq!(dropped, 0, "A reset requests nginx had sent it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_node_a_s_process_group_loses_no_acknowledged_payment() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut d) =
        Deployment::start("kill_9_of_node_a_s_process_group_loses_no_acknowledged_payment")
    else {
        return;
    };
    let (a_addr, b_addr) = (d.a.addr, d.b.addr);
    let a_pid = d.a.pid();
    let load = Load::start(&d, 8);
    load.until_both_served(&d, 20).await;
    // The primary and every worker at once, mid-request.
    d.a.kill_all();
    let killed = Instant::now();
    assert!(group_members(a_pid).is_empty());
    let started = Instant::now();
    while load.answered_by(b_addr, Some(killed)) < 100 {
        assert!(started.elapsed() < Duration::from_secs(60), "B stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replies = load.finish().await;

    let acknowledged: Vec<&Reply> = replies
        .iter()
        .map(|t| &t.reply)
        .filter(|r| r.ok())
        .collect();
    let failed = replies.len() - acknowledged.len();
    let by_a = acknowledged
        .iter()
        .filter(|r| r.node() == Some(a_addr))
        .count();
    let moved = acknowledged
        .iter()
        .filter(|r| r.tried(a_addr) && r.node() == Some(b_addr))
        .count();
    assert!(by_a > 0, "A acknowledged nothing before it was killed");
    for reply in &acknowledged {
        let fetched = d.get(&format!("/v1/payments/{}", reply.id())).await;
        assert_eq!(
            fetched.status, 200,
            "acknowledged by {} but lost: {reply:?}",
            reply.upstreams
        );
        assert_eq!(fetched.node(), Some(b_addr), "{fetched:?}");
        assert_eq!(fetched.body, reply.body);
    }
    eprintln!(
        "{} requests: {} acknowledged ({by_a} by A before the kill, {moved} moved from A to B) \
         and every one fetched through B; {failed} failed",
        replies.len(),
        acknowledged.len()
    );
}
