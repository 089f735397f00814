//! The WebSocket chat example on real clusters: sockets on different workers
//! talk through the cluster-wide broadcast, whether one machine's sockets
//! are spread by the default balancing or clients are pinned by address
//! (sticky).

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::Cluster;
use tokio_tungstenite::tungstenite::Message;

/// The slot answering `/whoami` for connections from `source`.
fn slot_of(cluster: &Cluster, source: Ipv4Addr) -> usize {
    let stream = support::connect_from(source, cluster.addr).unwrap();
    let (status, body) = support::request_on(stream, cluster.addr, "/whoami", b"").unwrap();
    support::parse_hello(status, &body).unwrap().0
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A chat socket from `source`, and the welcome naming the worker holding it.
async fn open_chat(cluster: &Cluster, source: Ipv4Addr) -> (Socket, serde_json::Value) {
    let stream = support::connect_from(source, cluster.addr).unwrap();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let url = format!("ws://{}/ws", cluster.addr);
    let (mut socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let welcome = next_line(&mut socket).await;
    assert_eq!(welcome["welcome"], true, "{welcome}");
    (socket, welcome)
}

async fn next_line(socket: &mut Socket) -> serde_json::Value {
    let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("a chat line within 10 s")
        .expect("the socket is open")
        .expect("a valid frame");
    match message {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("unexpected frame {other:?}"),
    }
}

#[tokio::test]
async fn chat_clients_on_different_workers_hear_each_other() {
    let cluster = Cluster::start_example(
        "chat",
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            "sticky",
        ],
    );
    // Find two loopback addresses that sticky balancing puts on different workers.
    let alice_ip = Ipv4Addr::new(127, 0, 0, 2);
    let alice_slot = slot_of(&cluster, alice_ip);
    let (bob_ip, bob_slot) = (3..60u8)
        .map(|n| Ipv4Addr::new(127, 0, 0, n))
        .map(|ip| (ip, slot_of(&cluster, ip)))
        .find(|&(_, slot)| slot != alice_slot)
        .expect("some address maps to the other worker");

    let (mut alice, alice_welcome) = open_chat(&cluster, alice_ip).await;
    let (mut bob, bob_welcome) = open_chat(&cluster, bob_ip).await;
    assert_eq!(alice_welcome["slot"], alice_slot);
    assert_eq!(bob_welcome["slot"], bob_slot);

    alice.send(Message::text("hi bob")).await.unwrap();
    let heard_by_bob = next_line(&mut bob).await;
    assert_eq!(heard_by_bob["text"], "hi bob");
    assert_eq!(heard_by_bob["slot"], alice_slot);
    let echoed_to_alice = next_line(&mut alice).await;
    assert_eq!(echoed_to_alice, heard_by_bob);

    bob.send(Message::text("hello alice")).await.unwrap();
    let heard_by_alice = next_line(&mut alice).await;
    assert_eq!(heard_by_alice["text"], "hello alice");
    assert_eq!(heard_by_alice["slot"], bob_slot);
}

/// From one machine (every socket from 127.0.0.1, as one browser's tabs
/// are), the chat's default balancing spreads the sockets over the workers,
/// and a message sent on the socket held by worker 0 reaches the one held
/// by worker 1: it crossed from one process to the other. (Under
/// `--balance sticky` both sockets land on one worker: checked by hand.)
#[tokio::test]
async fn sockets_from_one_address_land_on_different_workers_and_hear_each_other() {
    let cluster = Cluster::start_example("chat", &["--listen", "127.0.0.1:0", "--workers", "2"]);
    assert!(
        cluster.banner.contains("balance=least-conn"),
        "{}",
        cluster.banner
    );
    let workers: Vec<u64> = cluster
        .worker_pids()
        .into_iter()
        .map(|pid| pid as u64)
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let me = Ipv4Addr::LOCALHOST;
    let (first, first_welcome) = open_chat(&cluster, me).await;
    let (second, second_welcome) = open_chat(&cluster, me).await;
    let pid = |welcome: &serde_json::Value| welcome["pid"].as_u64().expect("a pid");
    assert_ne!(
        pid(&first_welcome),
        pid(&second_welcome),
        "both sockets on one process: {first_welcome} {second_welcome}"
    );
    for welcome in [&first_welcome, &second_welcome] {
        assert!(
            workers.contains(&pid(welcome)),
            "{welcome} is no worker of {workers:?}"
        );
    }
    let (mut on_worker_0, zero, mut on_worker_1, one) = if first_welcome["slot"] == 0 {
        (first, first_welcome, second, second_welcome)
    } else {
        (second, second_welcome, first, first_welcome)
    };
    assert_eq!(
        (zero["slot"].as_u64(), one["slot"].as_u64()),
        (Some(0), Some(1))
    );

    on_worker_0
        .send(Message::text("across processes"))
        .await
        .unwrap();
    let heard = next_line(&mut on_worker_1).await;
    assert_eq!(heard["text"], "across processes");
    assert_eq!(heard["slot"], 0, "{heard}");
    assert_eq!(
        heard["pid"], zero["pid"],
        "sent by worker 0's process: {heard}"
    );
    assert_ne!(heard["pid"], one["pid"]);

    on_worker_1.send(Message::text("and back")).await.unwrap();
    loop {
        // Worker 0's socket hears its own line first, then worker 1's.
        let line = next_line(&mut on_worker_0).await;
        if line["text"] == "and back" {
            assert_eq!(line["pid"], one["pid"], "{line}");
            break;
        }
        assert_eq!(line["text"], "across processes", "{line}");
    }
}
