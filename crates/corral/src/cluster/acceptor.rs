//! The primary's side of the accept-and-pass modes: accepting on each
//! address (after a PROXY protocol header if asked), handing connections to
//! the balancer, and sending each worker its connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::balancer::Balancer;
use crate::net::bind::no_longer_listening;
use crate::net::fd_passing::{
    ConnectionSender, PassedConnection, PassedHeader, ACK_POLL, MAX_BATCH,
};
use crate::net::proxy_protocol;

/// Connections taken off the accept queue before they are routed: one
/// balancer lock and one wake-up of each dispatcher per batch, while other
/// tasks still get their turn under a flood.
const ACCEPT_BATCH: usize = 64;

/// While connections keep coming, the acceptor looks for them at this pace
/// instead of being woken for each one.
const BUSY_POLL: Duration = Duration::from_millis(1);

/// Accepts on one address and hands every connection to the balancer,
/// reading its PROXY protocol header first when asked to.
///
/// The cost of passing is mostly wake-ups: woken by the event loop for every
/// new connection, the primary spent about 30 µs of CPU per connection and
/// new connections ran at 0.7x reuseport on a loaded two-core machine. So
/// the acceptor has two states, as a network driver does (NAPI). Idle, the
/// listener is registered with the event loop and the first connection
/// wakes it. Busy, the listener is taken out of the event loop (so
/// arrivals wake nothing) and the acceptor takes whatever queued every
/// [`BUSY_POLL`]; those go to each worker in one message. It goes back to
/// idle after a poll that finds nothing. A connection waits at most one
/// poll (about 1 ms, tokio's timer resolution) in the kernel's queue.
///
/// The std listener is used directly rather than tokio's: a connection that
/// only passes through would otherwise be registered with the event loop
/// and deregistered again (two `epoll_ctl` per connection).
pub(crate) async fn accept_and_pass(
    index: u16,
    listener: std::net::TcpListener,
    balancer: Arc<Mutex<Balancer>>,
    proxy_protocol: bool,
    // How long a client may take to send its PROXY header (--header-timeout).
    header_timeout: Duration,
) {
    if let Err(err) = listener.set_nonblocking(true) {
        tracing::error!("cannot accept on listen address {index}: {err}");
        return;
    }
    let mut listener = listener;
    let mut batch = Vec::with_capacity(ACCEPT_BATCH);
    loop {
        // Idle: wait to be told a connection is queued.
        // SAFETY: the AsyncFd owns the listener, which keeps its descriptor
        // open and unchanged until `into_inner` hands it back.
        listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
            Ok(registered) => {
                if let Err(err) = registered.readable().await {
                    tracing::error!("accept failed: {err}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                registered.into_inner()
            }
            Err(err) => {
                let (listener, err) = err.into_parts();
                tracing::error!("cannot wait for connections: {err}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                listener
            }
        };
        // Busy: take what queued, until a poll finds nothing.
        loop {
            let failed = accept_queued(&listener, &mut batch);
            if batch.is_empty() && failed.is_none() {
                break;
            }
            let full = batch.len() == ACCEPT_BATCH;
            if proxy_protocol {
                for (stream, peer) in batch.drain(..) {
                    read_header_then_route(&balancer, index, stream, peer, header_timeout);
                }
            } else {
                let mut balancer = Balancer::lock(&balancer);
                for (stream, client) in batch.drain(..) {
                    balancer.route(PassedConnection {
                        stream,
                        header: PassedHeader {
                            listener: index,
                            client,
                        },
                    });
                }
            }
            if let Some(err) = failed {
                // The socket was shut: the node is stopping.
                if no_longer_listening(&err) {
                    return;
                }
                tracing::error!("accept failed: {err}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else if full {
                // More are queued: let the dispatchers send these first.
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(BUSY_POLL).await;
            }
        }
    }
}

/// Accepts until the queue is empty or `batch` is full; the error that
/// stopped it, if one did (out of descriptors, say).
fn accept_queued(
    listener: &std::net::TcpListener,
    batch: &mut Vec<(std::net::TcpStream, std::net::SocketAddr)>,
) -> Option<std::io::Error> {
    while batch.len() < ACCEPT_BATCH {
        match listener.accept() {
            Ok(accepted) => batch.push(accepted),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return None,
            // One connection that died in the queue.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(err) => return Some(err),
        }
    }
    None
}

/// Reads the connection's PROXY protocol header on a task of its own (a
/// slow client must not hold up the others), then routes it.
fn read_header_then_route(
    balancer: &Arc<Mutex<Balancer>>,
    index: u16,
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    header_timeout: Duration,
) {
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream))
    {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!("dropping connection from {peer}: {err}");
            return;
        }
    };
    let balancer = balancer.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        match proxy_protocol::read_header(&mut stream, header_timeout).await {
            Ok(client) => route(&balancer, index, stream, client.unwrap_or(peer)),
            Err(err) => tracing::debug!("closing connection from {peer}: {err}"),
        }
    });
}

fn route(
    balancer: &Mutex<Balancer>,
    listener: u16,
    stream: tokio::net::TcpStream,
    client: std::net::SocketAddr,
) {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!("dropping connection from {client}: {err}");
            return;
        }
    };
    let connection = PassedConnection {
        stream,
        header: PassedHeader { listener, client },
    };
    Balancer::lock(balancer).route(connection);
}

/// Sends one worker its connections and keeps each until the worker
/// acknowledges it. When the worker is gone (its end of the pair closed, or
/// a send failed), every connection it never acknowledged, and every one
/// still waiting here, goes back to the balancer: to another worker, or (for
/// sticky) to the slot's replacement. Ends once the balancer stops sending
/// to this worker and the worker has acknowledged everything, or is gone.
pub(crate) async fn dispatch(
    slot: usize,
    generation: u64,
    mut sender: ConnectionSender,
    mut connections: mpsc::UnboundedReceiver<PassedConnection>,
    balancer: Arc<Mutex<Balancer>>,
) {
    let mut open = true;
    let mut refused = Vec::new();
    // Acknowledgements are read on this beat, not as they arrive: see ACK_POLL.
    let mut beat = tokio::time::interval(ACK_POLL);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'dispatching: loop {
        tokio::select! {
            biased;
            next = connections.recv(), if open => match next {
                Some(first) => {
                    // Whatever else is already queued for this worker goes
                    // in the same message.
                    let mut connection = vec![first];
                    while connection.len() < MAX_BATCH {
                        match connections.try_recv() {
                            Ok(next) => connection.push(next),
                            Err(_) => break,
                        }
                    }
                    loop {
                    match sender.send_batch(connection).await {
                        Ok(()) => break,
                        Err((err, back)) if worker_gone(&err) => {
                            tracing::debug!("slot {slot}: cannot pass a connection ({err}); rerouting");
                            refused = back;
                            // Its last acknowledgements may still be queued
                            // here: read them all, up to the end, so nothing
                            // it took is passed twice.
                            while let Ok(true) = sender.acknowledged().await {}
                            break 'dispatching;
                        }
                        Err((err, back)) => {
                            // The worker is still there (too many descriptors
                            // in flight, no memory): try again shortly.
                            tracing::debug!("slot {slot}: cannot pass a connection yet ({err})");
                            connection = back;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    }
                }
                None => {
                    open = false;
                    if let Err(err) = sender.finish() {
                        tracing::debug!("slot {slot}: cannot end the connection stream: {err}");
                    }
                    if sender.unacknowledged() == 0 {
                        return;
                    }
                }
            },
            _ = beat.tick(), if sender.unacknowledged() > 0 => match sender.read_acknowledgements() {
                Ok(true) if !open && sender.unacknowledged() == 0 => return,
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => {
                    tracing::debug!("slot {slot}: cannot read acknowledgements ({err}); rerouting");
                    break;
                }
            },
        }
    }
    connections.close();
    let unacknowledged = sender.into_unacknowledged();
    if !unacknowledged.is_empty() || !refused.is_empty() {
        tracing::info!(
            "slot {slot}: passing on {} connections the worker never took",
            unacknowledged.len() + refused.len()
        );
    }
    let mut balancer = Balancer::lock(&balancer);
    for connection in unacknowledged.into_iter().chain(refused) {
        balancer.requeue(slot, generation, connection);
    }
    while let Ok(connection) = connections.try_recv() {
        balancer.requeue(slot, generation, connection);
    }
}

/// True for the errors that mean the worker's end of the pair is closed.
fn worker_gone(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Balance;
    use crate::net::fd_passing::{pair, testing, ConnectionReceiver};
    use std::os::fd::OwnedFd;

    struct Client {
        stream: std::net::TcpStream,
        header: PassedHeader,
    }

    fn connect(listener: &std::net::TcpListener) -> (Client, PassedConnection) {
        let (stream, connection) = testing::connection(listener, 0);
        let header = connection.header;
        (Client { stream, header }, connection)
    }

    /// What a worker killed with connections queued leaves: the descriptors
    /// of one message (a batch) taken off its end without acknowledging,
    /// then its end closed. How many descriptors it held.
    fn die_holding_a_message(worker: OwnedFd) -> usize {
        let taken = testing::take_without_ack(&worker);
        assert!(!taken.is_empty());
        drop(worker);
        taken.len()
    }

    async fn next(
        connections: &mut mpsc::UnboundedReceiver<PassedConnection>,
    ) -> Option<PassedConnection> {
        tokio::time::timeout(Duration::from_secs(5), connections.recv())
            .await
            .ok()
            .flatten()
    }

    fn still_open(client: &mut Client, connection: &mut PassedConnection) {
        assert_eq!(connection.header, client.header);
        testing::ping(&mut client.stream, &mut connection.stream);
    }

    /// Slot 0's worker takes two connections properly, then dies with three
    /// more passed but never acknowledged: those three, and only those,
    /// reach the other worker, still open.
    #[tokio::test]
    async fn a_dying_workers_unacknowledged_connections_go_to_another_worker() {
        let balancer = Arc::new(Mutex::new(Balancer::new(Balance::RoundRobin, 2)));
        let (other_tx, mut other) = mpsc::unbounded_channel();
        Balancer::lock(&balancer).worker_ready(1, 0, other_tx);

        let (primary, worker) = pair().unwrap();
        let (to_slot_0, slot_0) = mpsc::unbounded_channel();
        let sender = ConnectionSender::new(primary).unwrap();
        let dispatcher = tokio::spawn(dispatch(0, 0, sender, slot_0, balancer.clone()));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (client, connection) = connect(&listener);
            clients.push(client);
            to_slot_0.send(connection).unwrap();
        }
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let mut kept = Vec::new();
        while kept.len() < 2 {
            kept.extend(receiver.recv_batch(2 - kept.len()).await.unwrap());
        }
        // Let the acknowledgement be read before the rest arrive.
        tokio::time::sleep(ACK_POLL * 5).await;
        for _ in 0..3 {
            let (client, connection) = connect(&listener);
            clients.push(client);
            to_slot_0.send(connection).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let worker = receiver.into_socket();
        assert!(die_holding_a_message(worker) >= 1);

        for client in clients.iter_mut().skip(2) {
            let mut connection = next(&mut other).await.expect("a connection came back");
            still_open(client, &mut connection);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), other.recv())
                .await
                .is_err(),
            "an acknowledged connection was passed twice"
        );
        dispatcher.await.unwrap();
        assert_eq!(kept.len(), 2);
    }

    /// In sticky mode the connections a dying worker never took wait for the
    /// slot's replacement, and the replacement gets them all.
    #[tokio::test]
    async fn sticky_connections_wait_for_the_slots_replacement() {
        let balancer = Arc::new(Mutex::new(Balancer::new(Balance::Sticky, 2)));
        let (primary, worker) = pair().unwrap();
        let (to_slot_0, slot_0) = mpsc::unbounded_channel();
        Balancer::lock(&balancer).worker_ready(0, 0, to_slot_0.clone());
        let sender = ConnectionSender::new(primary).unwrap();
        let dispatcher = tokio::spawn(dispatch(0, 0, sender, slot_0, balancer.clone()));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (client, connection) = connect(&listener);
            clients.push(client);
            to_slot_0.send(connection).unwrap();
        }
        drop(to_slot_0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(die_holding_a_message(worker) >= 1);
        dispatcher.await.unwrap();

        let (replacement_tx, mut replacement) = mpsc::unbounded_channel();
        Balancer::lock(&balancer).worker_ready(0, 1, replacement_tx);
        for client in &mut clients {
            let mut connection = next(&mut replacement).await.expect("a connection waited");
            still_open(client, &mut connection);
        }
    }

    /// A worker that drains normally acknowledges what it took and the
    /// dispatcher ends without passing anything twice.
    #[tokio::test]
    async fn a_drained_worker_keeps_what_it_acknowledged() {
        let balancer = Arc::new(Mutex::new(Balancer::new(Balance::RoundRobin, 2)));
        let (other_tx, mut other) = mpsc::unbounded_channel();
        Balancer::lock(&balancer).worker_ready(1, 0, other_tx);
        let (primary, worker) = pair().unwrap();
        let (to_slot_0, slot_0) = mpsc::unbounded_channel();
        let sender = ConnectionSender::new(primary).unwrap();
        let dispatcher = tokio::spawn(dispatch(0, 0, sender, slot_0, balancer.clone()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (client, connection) = connect(&listener);
            clients.push(client);
            to_slot_0.send(connection).unwrap();
        }
        drop(to_slot_0);
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let mut taken = Vec::new();
        loop {
            let batch = receiver.recv_batch(64).await.unwrap();
            if batch.is_empty() {
                break;
            }
            taken.extend(batch);
        }
        assert_eq!(taken.len(), 3);
        tokio::time::timeout(Duration::from_secs(5), dispatcher)
            .await
            .expect("the dispatcher ends once everything is acknowledged")
            .unwrap();
        drop(receiver);
        assert!(other.try_recv().is_err());
    }
}
