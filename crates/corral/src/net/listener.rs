//! The worker's view of its sockets: a stream of accepted connections that
//! stops (without closing anything) when the worker drains.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerCounters;
use crate::net::bind::{no_longer_listening, stop_listening_on};
use crate::net::fd_passing::PassedConnection;

/// Accepted connections from every socket this worker serves, or passed to it
/// by the primary in the accept-and-pass modes (the worker cannot tell which).
///
/// Implements [`axum::serve::Listener`], so it plugs straight into
/// `axum::serve`. When the primary asks the worker to drain, `accept` stops
/// yielding: new connections stay queued in the kernel for the other workers
/// (or for this slot's replacement) instead of being refused.
///
/// ```no_run
/// use axum::serve::Listener as _;
///
/// corral::Cluster::builder().listen("127.0.0.1:8080").run(|worker| async move {
///     let mut listener = worker.listener();
///     loop {
///         let (connection, peer) = listener.accept().await;
///         println!("connection from {peer}");
///         drop(connection);
///     }
///     #[allow(unreachable_code)]
///     Ok::<(), std::io::Error>(())
/// })
/// # .unwrap();
/// ```
pub struct Listener {
    sockets: Vec<TcpListener>,
    passed: PassedQueue,
    passed_pending: Arc<AtomicUsize>,
    next: usize,
    drain: Arc<Drain>,
    counters: Arc<WorkerCounters>,
    /// Accepts failed in a row (out of descriptors, memory).
    accept_failures: u32,
}

/// How far a worker's drain has got: set by the primary's messages, read
/// by the listener and the drain sequence.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    /// Cancelled when the worker drains: the listener stops accepting.
    pub started: CancellationToken,
    /// The slot, or the whole node, goes away: while draining, still accept
    /// what is already queued on the socket, since no replacement will.
    pub take_backlog: AtomicBool,
    /// The node goes away: readiness fails, and once the backlog is taken
    /// the sockets stop listening.
    pub node: AtomicBool,
    /// The listener found its queue empty after the drain began.
    pub backlog_taken: AtomicBool,
    /// A socket came from systemd socket activation: systemd keeps it, and
    /// queues on it, for the next start, so it must go on listening.
    pub keep_listening: bool,
}

/// Connections the primary passed to this worker (accept-and-pass modes).
pub(crate) type PassedQueue = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<PassedConnection>>>;

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub(crate) fn new(
        sockets: Vec<TcpListener>,
        passed: PassedQueue,
        passed_pending: Arc<AtomicUsize>,
        drain: Arc<Drain>,
        counters: Arc<WorkerCounters>,
    ) -> Self {
        Listener {
            sockets,
            passed,
            passed_pending,
            next: 0,
            drain,
            counters,
            accept_failures: 0,
        }
    }

    /// Polls every socket, starting after the one that yielded last, so a busy
    /// address cannot starve the others. A socket that no longer listens
    /// (the primary stopped it: the node is stopping) is let go.
    fn poll_accept_any(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let mut offset = 0;
        while offset < self.sockets.len() {
            let index = (self.next + offset) % self.sockets.len();
            match self.sockets[index].poll_accept(cx) {
                Poll::Ready(Err(err)) if no_longer_listening(&err) => {
                    tracing::debug!("a listening socket was shut: the node is stopping");
                    self.sockets.remove(index);
                }
                Poll::Ready(result) => {
                    self.next = (index + 1) % self.sockets.len();
                    return Poll::Ready(result);
                }
                Poll::Pending => offset += 1,
            }
        }
        Poll::Pending
    }

    /// Stops every socket listening, in every process that holds it. Only
    /// when the node stops: in the shared layout the other workers accept
    /// from the same socket.
    fn stop_listening(&mut self) {
        for socket in self.sockets.drain(..) {
            stop_listening_on(&socket);
        }
    }

    async fn accept_connection(&mut self) -> (Connection, SocketAddr) {
        loop {
            let drain = self.drain.clone();
            let passed = self.passed.clone();
            // Passed connections are taken even while draining: the primary
            // stopped sending before the drain, so these few were already on
            // their way and would otherwise be reset.
            let result = tokio::select! {
                Some(connection) = next_passed(passed) => {
                    self.passed_pending.fetch_sub(1, Ordering::SeqCst);
                    into_tokio(connection)
                }
                result = async {
                    let accepted = tokio::select! {
                        biased;
                        _ = drain.started.cancelled() => None,
                        result = poll_fn(|cx| self.poll_accept_any(cx)) => Some(result),
                    };
                    match accepted {
                        Some(result) => result,
                        None if drain.take_backlog.load(Ordering::SeqCst) => {
                            let queued = poll_fn(|cx| {
                                Poll::Ready(match self.poll_accept_any(cx) {
                                    Poll::Ready(result) => Some(result),
                                    Poll::Pending => None,
                                })
                            })
                            .await;
                            match queued {
                                Some(result) => result,
                                None => {
                                    // Once the node is going away, later
                                    // clients are refused (and retry
                                    // elsewhere) instead of queueing where
                                    // no one accepts.
                                    if drain.node.load(Ordering::SeqCst) && !drain.keep_listening {
                                        self.stop_listening();
                                    }
                                    drain.backlog_taken.store(true, Ordering::SeqCst);
                                    std::future::pending().await
                                }
                            }
                        }
                        None => std::future::pending().await,
                    }
                } => result,
            };
            let (stream, peer) = match result {
                Ok(accepted) => accepted,
                Err(err) if is_per_connection_error(&err) => continue,
                Err(err) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the
                    // connection stays queued and the socket stays readable,
                    // so retrying at once would spin. Back off while the open
                    // connections go on being served and some of them close.
                    self.accept_failures += 1;
                    let delay = accept_backoff(self.accept_failures);
                    if self.accept_failures == 1 {
                        tracing::warn!(
                            "accept failed: {err}; retrying with a back-off of {delay:?} up to \
                             {MAX_ACCEPT_BACKOFF:?} while open connections are served \
                             (set --max-connections below the descriptor limit to queue instead)"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if self.accept_failures > 0 {
                let failures = std::mem::take(&mut self.accept_failures);
                tracing::info!("accepting again after {failures} failed attempts");
            }
            // Small responses should leave at once, not wait for Nagle.
            let _ = stream.set_nodelay(true);
            return (Connection::new(stream, self.counters.clone()), peer);
        }
    }
}

/// The longest wait between two failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// 10 ms after the first failure, doubling up to [`MAX_ACCEPT_BACKOFF`]: quick
/// to recover when a few descriptors free up, cheap while none do.
fn accept_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(4);
    (Duration::from_millis(10) * (1 << doublings)).min(MAX_ACCEPT_BACKOFF)
}

async fn next_passed(passed: PassedQueue) -> Option<PassedConnection> {
    passed.lock().await.recv().await
}

fn into_tokio(connection: PassedConnection) -> io::Result<(TcpStream, SocketAddr)> {
    connection.stream.set_nonblocking(true)?;
    Ok((
        TcpStream::from_std(connection.stream)?,
        connection.header.client,
    ))
}

/// Errors that concern one connection that died in the queue, not the socket.
fn is_per_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl axum::serve::Listener for Listener {
    type Io = Connection;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl std::future::Future<Output = (Self::Io, Self::Addr)> + Send {
        self.accept_connection()
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match self.sockets.first() {
            Some(socket) => socket.local_addr(),
            None => Err(io::Error::other("this worker has no listening socket")),
        }
    }
}

/// An accepted TCP connection, counted in the worker's statistics while open.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    counters: Arc<WorkerCounters>,
}

impl Connection {
    fn new(stream: TcpStream, counters: Arc<WorkerCounters>) -> Self {
        counters.connections_total.fetch_add(1, Ordering::Relaxed);
        counters.connections_open.fetch_add(1, Ordering::Relaxed);
        Connection { stream, counters }
    }

    /// The underlying TCP stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The client's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.counters
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_grows_from_10_to_100_ms() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(4), Duration::from_millis(80));
        assert_eq!(accept_backoff(5), MAX_ACCEPT_BACKOFF);
        assert_eq!(accept_backoff(u32::MAX), MAX_ACCEPT_BACKOFF);
    }
}
