//! The primary's side of the accept-and-pass modes: accepting on each
//! address (after a PROXY protocol header if asked), handing connections to
//! the balancer, and sending each worker its connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::balancer::Balancer;
use crate::net::fd_passing::{ConnectionSender, PassedConnection, PassedHeader};
use crate::net::proxy_protocol;

/// How long a client may take to send its PROXY protocol header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts on one address and hands every connection to the balancer,
/// reading its PROXY protocol header first when asked to.
pub(crate) async fn accept_and_pass(
    index: u16,
    listener: tokio::net::TcpListener,
    balancer: Arc<Mutex<Balancer>>,
    proxy_protocol: bool,
) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            Err(err) => {
                tracing::error!("accept failed: {err}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !proxy_protocol {
            route(&balancer, index, stream, peer);
            continue;
        }
        let balancer = balancer.clone();
        tokio::spawn(async move {
            match proxy_protocol::read_header(&mut stream, PROXY_HEADER_TIMEOUT).await {
                Ok(client) => route(&balancer, index, stream, client.unwrap_or(peer)),
                Err(err) => tracing::debug!("closing connection from {peer}: {err}"),
            }
        });
    }
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

/// Sends one worker its connections; if the worker is gone, gives them back
/// to the balancer so they reach another worker (or wait for the slot's
/// replacement) instead of being lost.
pub(crate) async fn dispatch(
    slot: usize,
    generation: u64,
    sender: ConnectionSender,
    mut connections: mpsc::UnboundedReceiver<PassedConnection>,
    balancer: Arc<Mutex<Balancer>>,
) {
    while let Some(connection) = connections.recv().await {
        if let Err((err, connection)) = sender.send(connection).await {
            tracing::debug!("slot {slot}: cannot pass a connection ({err}); rerouting");
            connections.close();
            let mut balancer = Balancer::lock(&balancer);
            balancer.requeue(slot, generation, connection);
            while let Ok(connection) = connections.try_recv() {
                balancer.requeue(slot, generation, connection);
            }
            return;
        }
    }
}
