//! Length-prefixed, size-bounded frames carrying postcard-encoded messages
//! over a Unix socket.
//!
//! tokio-util's `LengthDelimitedCodec` does the framing and enforces the size
//! limit; a frame that is too large or does not decode is an error that ends
//! the channel, never a panic.

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The largest frame either side accepts.
pub(crate) const MAX_FRAME_BYTES: usize = 1 << 20;

/// Why a channel ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    #[error("the peer closed the channel")]
    Closed,
    #[error("bad frame: {0}")]
    Frame(#[from] std::io::Error),
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
}

/// Splits one end of a worker's IPC socket into a typed sender and receiver,
/// so one task can wait for messages while another sends.
pub(crate) fn channel(stream: UnixStream) -> (Sender, Receiver) {
    let (read, write) = stream.into_split();
    (
        Sender {
            frames: FramedWrite::new(write, codec()),
        },
        Receiver {
            frames: FramedRead::new(read, codec()),
        },
    )
}

pub(crate) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

/// The sending half of a channel.
pub(crate) struct Sender {
    frames: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
}

impl Sender {
    pub async fn send<M: Serialize>(&mut self, message: &M) -> Result<(), ChannelError> {
        let bytes = postcard::to_allocvec(message)?;
        self.frames.send(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }
}

/// The receiving half of a channel.
pub(crate) struct Receiver {
    frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
}

impl Receiver {
    /// Cancel-safe: a frame half read stays buffered for the next call.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<M, ChannelError> {
        match self.frames.next().await {
            None => Err(ChannelError::Closed),
            Some(frame) => Ok(postcard::from_bytes(&frame?)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{ToPrimary, ToWorker};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn messages_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let ((mut a_tx, mut a_rx), (mut b_tx, mut b_rx)) = (channel(a), channel(b));
        a_tx.send(&ToWorker::Drain).await.unwrap();
        assert_eq!(b_rx.recv::<ToWorker>().await.unwrap(), ToWorker::Drain);
        b_tx.send(&ToPrimary::Ready).await.unwrap();
        assert_eq!(a_rx.recv::<ToPrimary>().await.unwrap(), ToPrimary::Ready);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_an_error() {
        let (mut raw, b) = UnixStream::pair().unwrap();
        let (_tx, mut b) = channel(b);
        raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            b.recv::<ToPrimary>().await,
            Err(ChannelError::Frame(_))
        ));
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        let (mut raw, b) = UnixStream::pair().unwrap();
        let (_tx, mut b) = channel(b);
        raw.write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd])
            .await
            .unwrap();
        assert!(matches!(
            b.recv::<ToPrimary>().await,
            Err(ChannelError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_peer_is_reported() {
        let (raw, b) = UnixStream::pair().unwrap();
        drop(raw);
        let (_tx, mut b) = channel(b);
        assert!(matches!(
            b.recv::<ToPrimary>().await,
            Err(ChannelError::Closed)
        ));
    }
}
