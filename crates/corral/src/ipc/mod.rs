//! The framed, bounded, typed channel between the primary and each worker.

mod channel;
mod message;

pub(crate) use channel::{channel, codec, ChannelError, Receiver, Sender, MAX_FRAME_BYTES};
pub(crate) use message::{ToPrimary, ToWorker};
