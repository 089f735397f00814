//! A queue bounded both in messages and in bytes that refuses instead of
//! waiting, so a slow Redis or a busy supervisor costs dropped (and counted)
//! messages, never memory without bound nor a blocked supervisor.
//!
//! tokio's bounded channel counts items only; the byte budget is kept beside
//! it in an atomic that the receiving side gives back.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How often at most a queue that keeps overflowing logs about it.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its maximum number of messages.
    Count,
    /// The queued messages hold the maximum number of bytes.
    Bytes,
    /// The receiving side is gone (shutting down).
    Closed,
}

pub(crate) fn bounded<T>(
    name: &'static str,
    messages: usize,
    bytes: usize,
) -> (QueueSender<T>, QueueReceiver<T>) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let used = Arc::new(AtomicUsize::new(0));
    let overflow = Arc::new(Overflow {
        name,
        messages,
        bytes,
        dropped: AtomicU64::new(0),
        unlogged: Mutex::new((0, None)),
    });
    (
        QueueSender {
            tx,
            used: used.clone(),
            overflow,
        },
        QueueReceiver { rx, used },
    )
}

/// The sending side; cheap to clone.
#[derive(Debug)]
pub(crate) struct QueueSender<T> {
    tx: mpsc::Sender<(T, usize)>,
    used: Arc<AtomicUsize>,
    overflow: Arc<Overflow>,
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        QueueSender {
            tx: self.tx.clone(),
            used: self.used.clone(),
            overflow: self.overflow.clone(),
        }
    }
}

impl<T> QueueSender<T> {
    /// Queues `item` of `size` bytes, or refuses at once; a refusal for lack
    /// of room is counted and logged (at most once a second).
    pub(crate) fn try_push(&self, item: T, size: usize) -> Result<(), Refused> {
        let before = self.used.fetch_add(size, Ordering::AcqRel);
        if before + size > self.overflow.bytes {
            self.used.fetch_sub(size, Ordering::AcqRel);
            self.overflow.dropped();
            return Err(Refused::Bytes);
        }
        match self.tx.try_send((item, size)) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.used.fetch_sub(size, Ordering::AcqRel);
                match err {
                    mpsc::error::TrySendError::Full(_) => {
                        self.overflow.dropped();
                        Err(Refused::Count)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(Refused::Closed),
                }
            }
        }
    }

    /// Items refused for lack of room since the queue was made.
    pub(crate) fn dropped(&self) -> u64 {
        self.overflow.dropped.load(Ordering::Relaxed)
    }

    /// Resolves once the receiving side is gone.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The receiving side.
#[derive(Debug)]
pub(crate) struct QueueReceiver<T> {
    rx: mpsc::Receiver<(T, usize)>,
    used: Arc<AtomicUsize>,
}

impl<T> QueueReceiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        let (item, size) = self.rx.recv().await?;
        self.used.fetch_sub(size, Ordering::AcqRel);
        Some(item)
    }

    /// The next item if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let (item, size) = self.rx.try_recv().ok()?;
        self.used.fetch_sub(size, Ordering::AcqRel);
        Some(item)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// Counts refusals and logs them, grouped, so a flood of drops is one line a
/// second that says how many, not one line per message.
#[derive(Debug)]
struct Overflow {
    name: &'static str,
    messages: usize,
    bytes: usize,
    dropped: AtomicU64,
    /// Drops not yet logged, and when the last line was written.
    unlogged: Mutex<(u64, Option<Instant>)>,
}

impl Overflow {
    fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let mut unlogged = self
            .unlogged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        unlogged.0 += 1;
        let now = Instant::now();
        if unlogged
            .1
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(
                "broadcast: the {} queue is full (limit {} messages, {} KiB); dropped {} message(s) since the last report, {} in all",
                self.name,
                self.messages,
                self.bytes >> 10,
                unlogged.0,
                self.dropped.load(Ordering::Relaxed)
            );
            *unlogged = (0, Some(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_past_the_message_count_and_counts_it() {
        let (tx, mut rx) = bounded::<u32>("test", 2, 1 << 20);
        assert_eq!(tx.try_push(1, 1), Ok(()));
        assert_eq!(tx.try_push(2, 1), Ok(()));
        assert_eq!(tx.try_push(3, 1), Err(Refused::Count));
        assert_eq!(tx.dropped(), 1);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.try_push(4, 1), Ok(()));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.try_recv(), Some(4));
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn refuses_past_the_byte_budget_and_gives_it_back_on_receive() {
        let (tx, mut rx) = bounded::<&str>("test", 100, 10);
        assert_eq!(tx.try_push("a", 6), Ok(()));
        assert_eq!(tx.try_push("b", 6), Err(Refused::Bytes));
        assert_eq!(tx.try_push("c", 4), Ok(()));
        assert_eq!(rx.recv().await, Some("a"));
        assert_eq!(tx.try_push("d", 6), Ok(()));
        assert_eq!(tx.dropped(), 1);
    }

    #[tokio::test]
    async fn a_closed_queue_refuses_without_counting_a_drop() {
        let (tx, rx) = bounded::<u8>("test", 4, 100);
        drop(rx);
        assert_eq!(tx.try_push(1, 1), Err(Refused::Closed));
        assert_eq!(tx.dropped(), 0);
        tx.closed().await;
    }
}
