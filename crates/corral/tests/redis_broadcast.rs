//! Cross-node broadcast against a real `redis-server`: two independent
//! broadcast instances ("nodes") on one server, as two primaries would run.
//!
//! They need `CORRAL_TEST_REDIS=redis://HOST:PORT` (set by `.ci/run`); without
//! it each test says by name that it was skipped. The tests that break the
//! connection start a `redis-server` of their own on a free loopback port, so
//! killing its clients or the server itself disturbs no other test.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral::broadcast::{self, BroadcastConfig, BroadcastPublisher, Delivered, Deliveries};
use corral_testkit::ChildGroup;

/// The shared server's URL, or `None` after saying the test is skipped.
fn shared_redis(test: &str) -> Option<String> {
    match std::env::var("CORRAL_TEST_REDIS") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of passing tests, and a skip must always show.
            let _ = writeln!(
                std::io::stderr().lock(),
                "skipped: {test} (CORRAL_TEST_REDIS not set)"
            );
            None
        }
    }
}

/// A channel no other test (or earlier run) uses.
fn fresh_channel(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("corral-test:{test}:{}:{nanos}", std::process::id())
}

/// A node with short timings, so the tests run in seconds.
fn node(url: &str, channel: &str) -> BroadcastConfig {
    // The broadcast's log lines (outages, gaps) show with `--nocapture`.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    BroadcastConfig::redis(url)
        .unwrap()
        .channel(channel)
        .heartbeat(Duration::from_millis(100))
        .timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
}

async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next(deliveries: &mut Deliveries) -> Delivered {
    tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the broadcast is running")
}

async fn both_subscribed(a: &BroadcastPublisher, b: &BroadcastPublisher) {
    eventually("both nodes are subscribed", Duration::from_secs(10), || {
        a.stats().connected && b.stats().connected
    })
    .await;
}

fn json(slot: usize, n: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "slot": slot, "n": n })).unwrap()
}

fn decode(message: &Delivered) -> (u64, u64) {
    let value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    (
        value["slot"].as_u64().unwrap(),
        value["n"].as_u64().unwrap(),
    )
}

/// A `redis-server` of the test's own, killed with its process group.
struct PrivateRedis {
    port: u16,
    server: Option<ChildGroup>,
}

impl PrivateRedis {
    fn start() -> Self {
        // The server is restarted on this port, so no one else may take it.
        let port = corral_testkit::free_port();
        let mut redis = PrivateRedis { port, server: None };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits for it to answer.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("these tests start a redis-server of their own: install it (apt-get install redis-server)");
        self.server = Some(ChildGroup(child));
        let start = Instant::now();
        loop {
            let client = redis::Client::open(self.url()).unwrap();
            if let Ok(mut connection) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server outright (SIGKILL): its clients see their connections die.
    fn kill(&mut self) {
        drop(self.server.take());
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: its connections stay
    /// open but nothing answers, like a hung host or a dead network path.
    fn signal(&self, signal: nix::sys::signal::Signal) {
        let server = self.server.as_ref().expect("the server runs");
        let pid = nix::unistd::Pid::from_raw(server.0.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Closes every pub/sub connection on the server, as a failover or a
    /// `CLIENT KILL` by an operator would.
    fn kill_subscriptions(&self) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_connection().unwrap();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut connection)
            .unwrap()
    }
}

#[tokio::test]
async fn messages_from_one_node_reach_the_other_in_order_and_once() {
    let Some(url) = shared_redis("messages_from_one_node_reach_the_other_in_order_and_once") else {
        return;
    };
    let channel = fresh_channel("order");
    let (a, mut a_deliveries) = broadcast::start(&node(&url, &channel)).unwrap();
    let (b, mut b_deliveries) = broadcast::start(&node(&url, &channel)).unwrap();
    both_subscribed(&a, &b).await;

    const SLOTS: usize = 4;
    const PER_SLOT: u64 = 500;
    for n in 0..PER_SLOT {
        for slot in 0..SLOTS {
            a.publish(slot, json(slot, n));
        }
        // Let the publishing task run now and then, as the supervisor's loop would.
        if n % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }

    let mut expected = [0u64; SLOTS];
    for _ in 0..SLOTS as u64 * PER_SLOT {
        let message = next(&mut b_deliveries).await;
        assert!(!message.local);
        assert_eq!(&message.from_node, a.node());
        let (slot, n) = decode(&message);
        assert_eq!(slot as usize, message.from_slot);
        assert_eq!(n, expected[slot as usize], "slot {slot} out of order");
        expected[slot as usize] += 1;
    }
    assert_eq!(expected, [PER_SLOT; SLOTS]);

    // A delivered its own messages locally at once, and skips their copies
    // coming back from Redis.
    for i in 0..SLOTS as u64 * PER_SLOT {
        let message = a_deliveries
            .try_recv()
            .expect("A's own message, delivered locally");
        assert!(message.local);
        assert_eq!(decode(&message), ((i % SLOTS as u64), i / SLOTS as u64));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a_deliveries.try_recv().is_none(),
        "A got its own message twice"
    );
    assert!(b_deliveries.try_recv().is_none(), "B got a message twice");

    let (a_stats, b_stats) = (a.stats(), b.stats());
    assert_eq!(a_stats.published_total, SLOTS as u64 * PER_SLOT);
    assert_eq!(a_stats.local_total, SLOTS as u64 * PER_SLOT);
    assert_eq!(b_stats.received_total, SLOTS as u64 * PER_SLOT);
    assert_eq!((b_stats.gaps_total, b_stats.missed_total), (0, 0));
    assert_eq!(b_stats.senders, 1);
    assert_eq!(b_stats.backend, "redis");
}

#[tokio::test]
async fn a_node_on_another_channel_hears_nothing() {
    let Some(url) = shared_redis("a_node_on_another_channel_hears_nothing") else {
        return;
    };
    let (a, _a_deliveries) = broadcast::start(&node(&url, &fresh_channel("one"))).unwrap();
    let (b, mut b_deliveries) = broadcast::start(&node(&url, &fresh_channel("two"))).unwrap();
    both_subscribed(&a, &b).await;
    a.publish(0, json(0, 1));
    eventually("A published", Duration::from_secs(5), || {
        a.stats().published_total == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b_deliveries.try_recv().is_none());
    assert_eq!(b.stats().senders, 0);
}

#[tokio::test]
async fn messages_dropped_by_a_full_sending_queue_are_counted_as_missed_on_the_other_node() {
    let Some(url) = shared_redis(
        "messages_dropped_by_a_full_sending_queue_are_counted_as_missed_on_the_other_node",
    ) else {
        return;
    };
    let channel = fresh_channel("full");
    let (a, _a_deliveries) = broadcast::start(&node(&url, &channel).queue_limits(8, 0)).unwrap();
    let (b, mut b_deliveries) = broadcast::start(&node(&url, &channel)).unwrap();
    both_subscribed(&a, &b).await;

    // A burst with no await in between: the sending task cannot drain the
    // queue, so all but 8 are refused at once and the caller never waits.
    for n in 0..100 {
        a.publish(0, json(0, n));
    }
    assert_eq!(a.stats().dropped_outgoing_total, 92);
    a_followed_by_one_more_reaches_b(&a, &mut b_deliveries, 8, 100).await;

    let stats = b.stats();
    assert_eq!(stats.received_total, 9);
    assert_eq!(stats.gaps_total, 1);
    assert_eq!(stats.missed_total, 92);
}

/// B receives the `kept` first messages n = 0.. of a burst, then a message
/// `n = last` published after it.
async fn a_followed_by_one_more_reaches_b(
    a: &BroadcastPublisher,
    b_deliveries: &mut Deliveries,
    kept: u64,
    last: u64,
) {
    for n in 0..kept {
        assert_eq!(decode(&next(b_deliveries).await), (0, n));
    }
    a.publish(0, json(0, last));
    assert_eq!(decode(&next(b_deliveries).await), (0, last));
}

#[tokio::test]
async fn a_killed_subscription_reconnects_and_what_it_missed_is_counted() {
    if shared_redis("a_killed_subscription_reconnects_and_what_it_missed_is_counted").is_none() {
        return;
    }
    let redis = PrivateRedis::start();
    let channel = fresh_channel("kill");
    let (a, _a_deliveries) = broadcast::start(&node(&redis.url(), &channel)).unwrap();
    // B waits at least 2 s before it resubscribes, so what A publishes right
    // after the kill is surely missed.
    let slow = node(&redis.url(), &channel)
        .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(3));
    let (b, mut b_deliveries) = broadcast::start(&slow).unwrap();
    both_subscribed(&a, &b).await;
    for n in 0..5 {
        a.publish(0, json(0, n));
    }
    for n in 0..5 {
        assert_eq!(decode(&next(&mut b_deliveries).await), (0, n));
    }

    let killed = redis.kill_subscriptions();
    assert_eq!(killed, 2, "both nodes' subscriptions were killed");
    let killed_at = Instant::now();
    for n in 5..15 {
        a.publish(0, json(0, n));
    }
    eventually(
        "A published the 10 messages",
        Duration::from_secs(5),
        || a.stats().published_total == 15,
    )
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(2) && b.stats().reconnects_total == 0,
        "B resubscribed before A's messages went out; the scenario did not happen"
    );

    eventually("B resubscribed", Duration::from_secs(10), || {
        b.stats().reconnects_total == 1 && b.stats().connected
    })
    .await;
    a.publish(0, json(0, 15));
    assert_eq!(decode(&next(&mut b_deliveries).await), (0, 15));

    let stats = b.stats();
    assert_eq!(stats.gaps_total, 1);
    assert_eq!(stats.missed_total, 10);
    assert_eq!(stats.received_total, 6);
    assert!(stats.down_ms_total >= 1_500, "{stats:?}");
    assert_eq!(
        a.stats().reconnects_total,
        1,
        "A's subscription came back too"
    );
}

#[tokio::test]
async fn after_a_server_restart_both_nodes_reconnect_and_every_message_is_delivered_or_counted() {
    if shared_redis(
        "after_a_server_restart_both_nodes_reconnect_and_every_message_is_delivered_or_counted",
    )
    .is_none()
    {
        return;
    }
    let mut redis = PrivateRedis::start();
    let channel = fresh_channel("restart");
    let (a, _a_deliveries) = broadcast::start(&node(&redis.url(), &channel)).unwrap();
    let (b, mut b_deliveries) = broadcast::start(&node(&redis.url(), &channel)).unwrap();
    both_subscribed(&a, &b).await;
    a.publish(0, json(0, 0));
    assert_eq!(decode(&next(&mut b_deliveries).await), (0, 0));

    redis.kill();
    eventually(
        "both nodes saw the server go",
        Duration::from_secs(5),
        || !a.stats().connected && !b.stats().connected,
    )
    .await;
    // Published while the server is down: A retries them with back-off.
    for n in 1..4 {
        a.publish(0, json(0, n));
    }
    eventually("A's publishing failed", Duration::from_secs(5), || {
        a.stats().publish_errors_total > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart();
    eventually("both nodes resubscribed", Duration::from_secs(10), || {
        let (a, b) = (a.stats(), b.stats());
        a.reconnects_total == 1 && b.reconnects_total == 1 && a.connected && b.connected
    })
    .await;
    a.publish(0, json(0, 4));
    // In order: whichever of 1..=3 B got (its resubscription may have come
    // after A's retries), then 4.
    let mut seen = vec![];
    loop {
        let (_, n) = decode(&next(&mut b_deliveries).await);
        seen.push(n);
        if n == 4 {
            break;
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );

    let (a_stats, b_stats) = (a.stats(), b.stats());
    assert_eq!(
        a_stats.published_total, 5,
        "A's retries went out: {a_stats:?}"
    );
    // Nothing is lost silently: every message A published is either
    // delivered to B or counted as missed by B.
    assert_eq!(
        b_stats.received_total + b_stats.missed_total,
        5,
        "{b_stats:?}"
    );
    assert!(b_stats.down_ms_total >= 500, "{b_stats:?}");
}

#[tokio::test]
async fn a_frozen_server_is_noticed_by_the_ping_probe_and_the_subscription_comes_back() {
    if shared_redis("a_frozen_server_is_noticed_by_the_ping_probe_and_the_subscription_comes_back")
        .is_none()
    {
        return;
    }
    use nix::sys::signal::Signal;
    let redis = PrivateRedis::start();
    let channel = fresh_channel("frozen");
    let (a, _a_deliveries) = broadcast::start(&node(&redis.url(), &channel)).unwrap();
    let (b, mut b_deliveries) = broadcast::start(&node(&redis.url(), &channel)).unwrap();
    both_subscribed(&a, &b).await;

    // No connection closes: only an unanswered PING can tell.
    redis.signal(Signal::SIGSTOP);
    let frozen_at = Instant::now();
    eventually("B noticed the silence", Duration::from_secs(5), || {
        !b.stats().connected
    })
    .await;
    assert!(frozen_at.elapsed() >= Duration::from_millis(400));
    redis.signal(Signal::SIGCONT);

    eventually("both nodes resubscribed", Duration::from_secs(10), || {
        let (a, b) = (a.stats(), b.stats());
        a.reconnects_total >= 1 && b.reconnects_total >= 1 && a.connected && b.connected
    })
    .await;
    a.publish(2, json(2, 7));
    let message = next(&mut b_deliveries).await;
    assert_eq!((message.from_slot, decode(&message)), (2, (2, 7)));
}
