//! Serving HTTP with the protections a public server needs, so that no
//! client can pin a worker: a request head must arrive within the header
//! timeout, a keep-alive connection may sit idle only so long, a request body
//! must keep arriving, and the worker stops accepting at its connection cap
//! (new connections then wait in the kernel's queue instead of failing).
//!
//! hyper serves the connections. Its own `header_read_timeout` also runs
//! while a keep-alive connection waits for its next request, which would cut
//! idle connections at the header timeout; so both timeouts are kept here,
//! at the socket: the connection's reads see whether a request is in flight,
//! when the last response finished and when the next request's first byte
//! came.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::paced_body::Paced;
use crate::error::BoxError;

/// Descriptors a worker keeps for itself beyond its connections (sockets,
/// IPC, the event loop, files the application opens), at the least.
const MIN_FD_HEADROOM: u64 = 64;

/// The limits [`serve`] enforces on every connection.
///
/// ```
/// use std::time::Duration;
///
/// let options = corral::net::ServeOptions::default()
///     .header_timeout(Duration::from_secs(10))
///     .idle_timeout(Duration::from_secs(30))
///     .max_connections(10_000);
/// assert_eq!(options.max_connections_value(), 10_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    header_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
}

impl Default for ServeOptions {
    /// 30 s for a request head, 60 s idle, and as many connections as the
    /// descriptor limit allows with headroom ([`default_max_connections`]).
    fn default() -> Self {
        ServeOptions {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(),
        }
    }
}

impl ServeOptions {
    /// How long a client has to send a complete request head: from accept on
    /// a new connection, from the first byte of the next request on a
    /// keep-alive one. A request body gets the same time, and must then keep
    /// arriving at 240 bytes/s or more. Default 30 s.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// How long a keep-alive connection may wait for its next request.
    /// Default 60 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Open connections above which no new one is accepted until one closes
    /// (at least 1). Default: [`default_max_connections`].
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// The header timeout set.
    pub fn header_timeout_value(&self) -> Duration {
        self.header_timeout
    }

    /// The idle timeout set.
    pub fn idle_timeout_value(&self) -> Duration {
        self.idle_timeout
    }

    /// The connection cap set.
    pub fn max_connections_value(&self) -> usize {
        self.max_connections
    }
}

/// The connection cap that keeps a process inside its descriptor limit
/// (`RLIMIT_NOFILE`): the soft limit less an eighth of it (at least 64) for
/// everything else the process opens.
///
/// ```
/// assert!(corral::net::default_max_connections() >= 1);
/// ```
pub fn default_max_connections() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != nix::sys::resource::RLIM_INFINITY => soft,
        // No limit (or none readable): still bound the worker to a sane figure.
        _ => 1 << 20,
    };
    let headroom = (soft / 8).max(MIN_FD_HEADROOM);
    soft.saturating_sub(headroom).clamp(1, 1 << 20) as usize
}

/// Serves `app` (an axum `Router` or any tower service) on every connection
/// `listener` yields, with the protections of `options`, until `shutdown`
/// resolves; then stops accepting, lets each connection finish its request
/// in flight (idle ones close at once) and returns when all are closed.
///
/// HTTP/1.1 (with upgrades, e.g. WebSocket) and HTTP/2 over cleartext, as
/// `axum::serve`. In a cluster, use [`Worker::serve`](crate::Worker::serve),
/// which adds the worker's drain handling; this is for a server of your own.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// # async fn demo() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// let app = Router::new().route("/", get(|| async { "hello" }));
/// let options = corral::net::ServeOptions::default();
/// corral::net::serve(listener, app, options, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await
/// # }
/// ```
pub async fn serve<L, S, B>(
    mut listener: L,
    app: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timeout is ours (see the module comment).
    builder.http1().header_read_timeout(None);
    let cap = Arc::new(Semaphore::new(options.max_connections));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut at_cap = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = connections.join_next() => continue,
            accepted = accept_below_cap(&mut listener, &cap, options, &mut at_cap) => accepted,
        };
        let (permit, io) = accepted;
        let builder = builder.clone();
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let activity = Arc::new(Activity::new());
            let io = Guarded::new(io, permit, options, activity.clone());
            let service = Protected {
                app,
                activity,
                body_grace: options.header_timeout,
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!("connection ended: {err}");
            }
        });
    }
    stop.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Waits for room under the cap, then for a connection. Cancel-safe: a
/// permit taken before the cancel is given back.
async fn accept_below_cap<L: axum::serve::Listener>(
    listener: &mut L,
    cap: &Arc<Semaphore>,
    options: ServeOptions,
    at_cap: &mut bool,
) -> (OwnedSemaphorePermit, L::Io) {
    let permit = match cap.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            if !*at_cap {
                *at_cap = true;
                tracing::warn!(
                    "{} connections open (--max-connections): new ones wait in the queue until one closes",
                    options.max_connections
                );
            }
            cap.clone()
                .acquire_owned()
                .await
                .expect("the connection cap is never closed")
        }
    };
    if std::mem::take(at_cap) {
        tracing::info!("below --max-connections again: accepting");
    }
    let (io, _) = listener.accept().await;
    (permit, io)
}

/// What a connection's requests tell its reads.
#[derive(Debug)]
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Responses finished so far; a change starts a new idle period.
    finished: AtomicU64,
    /// When the last response finished, in nanoseconds since `start`.
    idle_since: AtomicU64,
    /// Switched protocols (WebSocket): HTTP's timeouts no longer apply.
    upgraded: AtomicBool,
    /// The connection's last read that found nothing: hyper may have polled
    /// it just before the response finished, so it is woken to arm the idle
    /// timer.
    reader: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }

    fn idle_since(&self) -> Instant {
        self.start + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }
}

/// A request being answered; dropped when its response has been sent (or
/// abandoned).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let since = activity.start.elapsed().as_nanos() as u64;
        activity.idle_since.store(since, Ordering::Release);
        activity.finished.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        activity.reader.wake();
    }
}

/// A connection's socket, which fails a read that waits past the head or
/// idle deadline; hyper then closes the connection. Holds the connection's
/// place under the cap for as long as the socket is open (an upgraded
/// connection outlives hyper's task).
struct Guarded<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    options: ServeOptions,
    activity: Arc<Activity>,
    /// The `finished` count this idle period began at.
    seen_finished: u64,
    /// When the first byte of the next request came, in this idle period.
    head_started: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl<Io> Guarded<Io> {
    fn new(
        io: Io,
        permit: OwnedSemaphorePermit,
        options: ServeOptions,
        activity: Arc<Activity>,
    ) -> Self {
        let deadline = activity.start + options.header_timeout;
        Guarded {
            io,
            _permit: permit,
            options,
            activity,
            seen_finished: 0,
            head_started: None,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Whether the connection waits for a request head, and so reads are
    /// timed; starts a new idle period when a response finished since.
    fn waiting_for_a_request(&mut self) -> bool {
        if self.activity.upgraded.load(Ordering::Acquire)
            || self.activity.in_flight.load(Ordering::Acquire) > 0
        {
            return false;
        }
        let finished = self.activity.finished.load(Ordering::Acquire);
        if finished != self.seen_finished {
            self.seen_finished = finished;
            self.head_started = None;
        }
        true
    }

    fn deadline(&self) -> Instant {
        if self.seen_finished == 0 {
            // A new connection: its first head is due from accept.
            return self.activity.start + self.options.header_timeout;
        }
        match self.head_started {
            Some(started) => started + self.options.header_timeout,
            None => self.activity.idle_since() + self.options.idle_timeout,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Guarded<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before
                    && this.waiting_for_a_request()
                    && this.head_started.is_none()
                {
                    this.head_started = Some(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.activity.reader.register(cx.waker());
                if !this.waiting_for_a_request() {
                    return Poll::Pending;
                }
                let deadline = this.deadline();
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                std::task::ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if this.head_started.is_some() || this.seen_finished == 0 {
                        "no complete request head within --header-timeout"
                    } else {
                        "idle for --idle-timeout"
                    },
                )))
            }
            other => other,
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Guarded<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The application as hyper calls it: each request counted in flight on its
/// connection until its response is sent, its body paced.
#[derive(Clone)]
struct Protected<S> {
    app: S,
    activity: Arc<Activity>,
    body_grace: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Protected<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Answer<B>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(self.activity.clone());
        let grace = self.body_grace;
        let request = request.map(|body| Body::new(Paced::new(body, grace)));
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.oneshot(request).await.map_err(Into::into)?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                in_flight.0.upgraded.store(true, Ordering::Release);
            }
            Ok(response.map(|body| Answer {
                body,
                in_flight: Some(in_flight),
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body; its request stops being in flight once it is sent.
    struct Answer<B> {
        #[pin]
        body: B,
        in_flight: Option<InFlight>,
    }
}

impl<B> hyper::body::Body for Answer<B>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.in_flight.take();
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const HEAD: Duration = Duration::from_millis(300);
    const IDLE: Duration = Duration::from_millis(900);

    /// A server on a free port with short timeouts; `GET /` answers, `POST
    /// /echo` reads its whole body.
    async fn server(max_connections: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "hi" }))
            .route(
                "/echo",
                axum::routing::post(|body: Bytes| async move { format!("{}", body.len()) }),
            );
        let options = ServeOptions::default()
            .header_timeout(HEAD)
            .idle_timeout(IDLE)
            .max_connections(max_connections);
        tokio::spawn(serve(listener, app, options, std::future::pending()));
        addr
    }

    /// Reads until the server closes; how long that took and what came.
    async fn until_closed(stream: &mut TcpStream) -> (Duration, String) {
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => panic!("still open after 10 s"),
            }
        }
        (start.elapsed(), String::from_utf8_lossy(&seen).into_owned())
    }

    /// One keep-alive `GET /` and its whole response.
    async fn get(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let mut seen = String::new();
        while !seen.ends_with("hi") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen
    }

    fn around(took: Duration, expected: Duration) -> bool {
        took >= expected.mul_f32(0.8) && took <= expected + Duration::from_millis(700)
    }

    #[tokio::test]
    async fn a_silent_or_slow_head_is_closed_at_the_header_timeout() {
        let addr = server(100).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        let (took, _) = until_closed(&mut silent).await;
        assert!(around(took, HEAD), "silent: closed after {took:?}");
        let (took, _) = until_closed(&mut slow).await;
        assert!(
            took <= Duration::from_millis(700),
            "slow: closed after {took:?}"
        );
    }

    #[tokio::test]
    async fn keep_alive_may_idle_longer_than_a_head_may_take() {
        let addr = server(100).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut stream).await.starts_with("HTTP/1.1 200"));
        // Past the header timeout, within the idle one: still served.
        tokio::time::sleep(HEAD * 2).await;
        assert!(get(&mut stream).await.starts_with("HTTP/1.1 200"));
        let (took, _) = until_closed(&mut stream).await;
        assert!(around(took, IDLE), "idle: closed after {took:?}");
    }

    #[tokio::test]
    async fn the_next_head_on_a_keep_alive_connection_is_timed_from_its_first_byte() {
        let addr = server(100).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        get(&mut stream).await;
        stream.write_all(b"GET / HTT").await.unwrap();
        let (took, _) = until_closed(&mut stream).await;
        assert!(around(took, HEAD), "closed after {took:?}");
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_and_a_steady_one_is_read() {
        let addr = server(100).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        let (took, answer) = until_closed(&mut stalled).await;
        assert!(around(took, HEAD), "closed after {took:?}: {answer:?}");
        assert!(!answer.contains("200 OK"), "{answer:?}");

        let mut steady = TcpStream::connect(addr).await.unwrap();
        steady
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4000\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // 4 kB over 600 ms, twice the header timeout: well above 240 B/s.
        for _ in 0..6 {
            steady.write_all(&[b'x'; 666]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        steady.write_all(&[b'x'; 4]).await.unwrap();
        let (_, answer) = until_closed(&mut steady).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("4000"),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn above_the_cap_a_connection_waits_and_is_served_when_one_closes() {
        let addr = server(2).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        get(&mut first).await;
        get(&mut second).await;
        // Connected (the kernel queues it) but not accepted.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(HEAD / 2, third.read(&mut buf))
                .await
                .is_err(),
            "answered above the cap"
        );
        drop(first);
        let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
            .await
            .expect("served once a connection closed")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
}
