//! Messages between workers and the primary, and cluster-wide broadcast.
//!
//! Payloads are JSON (any serde type, including `serde_json::Value`), bounded
//! by [`MAX_MESSAGE_BYTES`], and delivered in the order each sender sent them.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::ipc::MAX_FRAME_BYTES;

/// The largest message payload, in bytes (the IPC frame limit less room for
/// the envelope).
pub const MAX_MESSAGE_BYTES: usize = MAX_FRAME_BYTES - 1024;

/// A message a worker sent to the primary, given to the
/// [`on_message`](crate::ClusterBuilder::on_message) handler.
///
/// ```
/// # fn handle(message: corral::Message) {
/// let value: serde_json::Value = message.decode().unwrap_or_default();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    payload: Vec<u8>,
}

impl Message {
    pub(crate) fn new(payload: Vec<u8>) -> Self {
        Message { payload }
    }

    /// Decodes the payload into the type the worker sent.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload)
            .map_err(|err| Error::Message(format!("cannot decode the message: {err}")))
    }

    /// The raw JSON payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.payload
    }
}

/// One broadcast message, with the slot of the worker that published it.
#[derive(Debug, Clone, PartialEq)]
pub struct Published<T> {
    /// The publisher's slot.
    pub from_slot: usize,
    /// The message.
    pub message: T,
}

/// A broadcast message as it arrives, before decoding.
#[derive(Debug)]
pub(crate) struct RawPublished {
    pub from_slot: usize,
    pub payload: Vec<u8>,
}

/// Every message any worker [broadcasts](crate::Worker::broadcast), this
/// worker's own included, from [`Worker::subscribe`](crate::Worker::subscribe).
///
/// A subscriber that falls more than 1024 messages behind skips the oldest
/// (and logs how many), so one slow consumer cannot stall the worker.
pub struct Subscription<T> {
    receiver: broadcast::Receiver<Arc<RawPublished>>,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Subscription<T> {
    pub(crate) fn new(receiver: broadcast::Receiver<Arc<RawPublished>>) -> Self {
        Subscription {
            receiver,
            _type: PhantomData,
        }
    }

    /// The messages as a [`Stream`](futures_util::Stream), for combinators
    /// and `select!`-style code.
    ///
    /// ```no_run
    /// use futures_util::StreamExt;
    /// # async fn demo(worker: corral::Worker) {
    /// let mut lines = worker.subscribe::<String>().into_stream().take(10);
    /// while let Some(published) = lines.next().await {
    ///     println!("{}: {}", published.from_slot, published.message);
    /// }
    /// # }
    /// ```
    pub fn into_stream(self) -> futures_util::stream::BoxStream<'static, Published<T>>
    where
        T: Send + 'static,
    {
        // Boxed so callers can use `next()` without pinning it themselves.
        Box::pin(futures_util::stream::unfold(
            self,
            |mut subscription| async move {
                let next = subscription.recv().await?;
                Some((next, subscription))
            },
        ))
    }

    /// The next message; `None` once the worker is shutting down. Messages
    /// that do not decode as `T` are skipped with a warning.
    pub async fn recv(&mut self) -> Option<Published<T>> {
        loop {
            match self.receiver.recv().await {
                Ok(raw) => match serde_json::from_slice(&raw.payload) {
                    Ok(message) => {
                        return Some(Published {
                            from_slot: raw.from_slot,
                            message,
                        })
                    }
                    Err(err) => tracing::warn!(
                        "skipping a broadcast from slot {} that does not decode: {err}",
                        raw.from_slot
                    ),
                },
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!("subscriber fell behind; skipped {skipped} broadcast messages");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Encodes a payload, refusing one over the size limit.
pub(crate) fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(message)
        .map_err(|err| Error::Message(format!("cannot encode the message: {err}")))?;
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Error::Message(format!(
            "the message is {} bytes, over the limit of {MAX_MESSAGE_BYTES}; send a reference to the data instead",
            payload.len()
        )));
    }
    Ok(payload)
}
