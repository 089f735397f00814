//! The WebSocket chat example on a real sticky cluster: two clients pinned to
//! different workers talk through the cluster-wide broadcast.

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

async fn open_chat(
    cluster: &Cluster,
    source: Ipv4Addr,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = support::connect_from(source, cluster.addr).unwrap();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let url = format!("ws://{}/ws", cluster.addr);
    let (socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    socket
}

async fn next_line(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> serde_json::Value {
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
    let cluster = Cluster::start_example("chat", &["--listen", "127.0.0.1:0", "--workers", "2"]);
    // Find two loopback addresses that sticky balancing puts on different workers.
    let alice_ip = Ipv4Addr::new(127, 0, 0, 2);
    let alice_slot = slot_of(&cluster, alice_ip);
    let (bob_ip, bob_slot) = (3..60u8)
        .map(|n| Ipv4Addr::new(127, 0, 0, n))
        .map(|ip| (ip, slot_of(&cluster, ip)))
        .find(|&(_, slot)| slot != alice_slot)
        .expect("some address maps to the other worker");

    let mut alice = open_chat(&cluster, alice_ip).await;
    let mut bob = open_chat(&cluster, bob_ip).await;

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
