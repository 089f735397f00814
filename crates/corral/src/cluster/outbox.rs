//! A worker's queue of messages to the primary, bounded in count and bytes.
//!
//! The supervisor's own messages (ready, heartbeats, recycle requests) have a
//! lane of their own, so a flood of user messages can never starve the
//! heartbeat and get a healthy worker killed as hung. User messages fail fast
//! with [`Error::MessageQueueFull`] when their lane is full: `send` and
//! `broadcast` neither block the event loop nor grow memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::ipc::ToPrimary;

/// User messages queued at most, and their payload bytes.
pub(crate) const USER_MESSAGES: usize = 1024;
pub(crate) const USER_BYTES: usize = 8 << 20;
/// Supervisor messages are few (one heartbeat per interval); a small lane is plenty.
const CONTROL_MESSAGES: usize = 64;

#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    control: mpsc::Sender<ToPrimary>,
    user: mpsc::Sender<ToPrimary>,
    user_bytes: Arc<AtomicUsize>,
}

/// The sending task's end.
pub(crate) struct OutboxQueues {
    pub control: mpsc::Receiver<ToPrimary>,
    pub user: mpsc::Receiver<ToPrimary>,
    pub user_bytes: Arc<AtomicUsize>,
}

impl Outbox {
    pub fn new() -> (Outbox, OutboxQueues) {
        let (control, control_rx) = mpsc::channel(CONTROL_MESSAGES);
        let (user, user_rx) = mpsc::channel(USER_MESSAGES);
        let user_bytes = Arc::new(AtomicUsize::new(0));
        (
            Outbox {
                control,
                user,
                user_bytes: user_bytes.clone(),
            },
            OutboxQueues {
                control: control_rx,
                user: user_rx,
                user_bytes,
            },
        )
    }

    /// Queues a supervisor message; false if the channel is gone or, for a
    /// heartbeat, the lane is full (the next one carries fresher figures).
    pub fn control(&self, message: ToPrimary) -> bool {
        self.control.try_send(message).is_ok()
    }

    /// Queues a user message, or says at once why it cannot.
    pub fn user(&self, message: ToPrimary) -> Result<()> {
        let size = payload_size(&message);
        let queued = self.user_bytes.fetch_add(size, Ordering::Relaxed);
        if queued + size > USER_BYTES && queued > 0 {
            self.user_bytes.fetch_sub(size, Ordering::Relaxed);
            return Err(Error::MessageQueueFull {
                messages: USER_MESSAGES - self.user.capacity(),
                bytes: queued,
            });
        }
        match self.user.try_send(message) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.user_bytes.fetch_sub(size, Ordering::Relaxed);
                match err {
                    mpsc::error::TrySendError::Full(_) => Err(Error::MessageQueueFull {
                        messages: USER_MESSAGES,
                        bytes: queued,
                    }),
                    mpsc::error::TrySendError::Closed(_) => Err(Error::Message(
                        "the channel to the primary is closed".to_owned(),
                    )),
                }
            }
        }
    }
}

pub(crate) fn payload_size(message: &ToPrimary) -> usize {
    match message {
        ToPrimary::User(payload) | ToPrimary::Broadcast(payload) => payload.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_user_lane_fails_fast_and_leaves_the_heartbeat_lane_free() {
        let (outbox, _queues) = Outbox::new();
        let big = vec![0u8; 16 << 10];
        let mut accepted = 0;
        let error = loop {
            match outbox.user(ToPrimary::User(big.clone())) {
                Ok(()) => accepted += 1,
                Err(error) => break error,
            }
        };
        assert!(matches!(error, Error::MessageQueueFull { .. }), "{error}");
        // 16 KiB messages hit the count limit first (1024 x 16 KiB > 8 MiB? no: the bytes).
        assert!(accepted * big.len() <= USER_BYTES, "{accepted} accepted");
        assert!(accepted <= USER_MESSAGES);
        assert!(outbox.control(ToPrimary::Ready), "heartbeats still pass");
    }

    #[test]
    fn draining_the_queue_makes_room_again() {
        let (outbox, mut queues) = Outbox::new();
        for _ in 0..USER_MESSAGES {
            outbox.user(ToPrimary::User(vec![1])).unwrap();
        }
        assert!(outbox.user(ToPrimary::User(vec![1])).is_err());
        let message = queues.user.try_recv().unwrap();
        queues
            .user_bytes
            .fetch_sub(payload_size(&message), Ordering::Relaxed);
        outbox.user(ToPrimary::User(vec![1])).unwrap();
    }
}
