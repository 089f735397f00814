//! A tower layer that counts requests and tells keep-alive clients to
//! reconnect while the worker drains.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{header, HeaderValue, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerCounters;

/// Made by [`Worker::track_requests`](crate::Worker::track_requests); add it
/// to a router with `.layer(...)`.
#[derive(Debug, Clone)]
pub struct TrackRequestsLayer {
    counters: Arc<WorkerCounters>,
    draining: CancellationToken,
}

impl TrackRequestsLayer {
    pub(crate) fn new(counters: Arc<WorkerCounters>, draining: CancellationToken) -> Self {
        TrackRequestsLayer { counters, draining }
    }
}

impl<S> tower::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackRequests {
            inner,
            counters: self.counters.clone(),
            draining: self.draining.clone(),
        }
    }
}

/// The service [`TrackRequestsLayer`] wraps around a router.
#[derive(Debug, Clone)]
pub struct TrackRequests<S> {
    inner: S,
    counters: Arc<WorkerCounters>,
    draining: CancellationToken,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for TrackRequests<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.counters.requests_total.fetch_add(1, Ordering::Relaxed);
        self.counters
            .requests_in_flight
            .fetch_add(1, Ordering::Relaxed);
        TrackedResponse {
            inner: self.inner.call(request),
            in_flight: Some(InFlight(self.counters.clone())),
            draining: self.draining.clone(),
        }
    }
}

/// Counts a request as in flight until its response is ready (or dropped).
#[derive(Debug)]
struct InFlight(Arc<WorkerCounters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TrackRequests`].
    #[derive(Debug)]
    pub struct TrackedResponse<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        draining: CancellationToken,
    }
}

impl<F, ResBody, E> Future for TrackedResponse<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut output = std::task::ready!(this.inner.poll(cx));
        this.in_flight.take();
        if this.draining.is_cancelled() {
            if let Ok(response) = &mut output {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(output)
    }
}
