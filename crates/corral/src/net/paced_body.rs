//! A request body that must keep arriving, so a client cannot hold a
//! connection open by trickling its upload.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;

/// The slowest a request body may arrive once its grace period (the header
/// timeout) is over: Kestrel's `MinRequestBodyDataRate`, which lets slow
/// mobile uploads through but not a client trickling bytes to hold a socket.
const MIN_BODY_BYTES_PER_S: f64 = 240.0;

/// A request body that must keep arriving: after a grace period it fails
/// once it has averaged less than [`MIN_BODY_BYTES_PER_S`]. Only time spent
/// waiting for the client counts, not time the application spends between
/// reads.
pub(super) struct Paced {
    body: Incoming,
    grace: Duration,
    received: u64,
    waited: Duration,
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Paced {
    pub(super) fn new(body: Incoming, grace: Duration) -> Self {
        Paced {
            body,
            grace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }
}

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(Ok(data)) = frame
                    .as_ref()
                    .map(|frame| frame.as_ref().map(|f| f.data_ref()))
                {
                    this.received += data.map_or(0, |data| data.len() as u64);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                let allowance = this.grace
                    + Duration::from_secs_f64(this.received as f64 / MIN_BODY_BYTES_PER_S);
                let deadline = since + allowance.saturating_sub(this.waited);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request body arrived too slowly (--header-timeout)",
                    ))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
