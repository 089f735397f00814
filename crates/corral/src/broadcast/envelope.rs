//! The frame one node publishes for every node: who sent it, its place in the
//! sender's sequence, and the worker's JSON payload, untouched.
//!
//! A frame is a version byte followed by postcard. The payload is carried as
//! raw bytes (not re-encoded as a JSON string), so a message costs one copy and
//! a dozen bytes of header, and is encoded once per node however many nodes and
//! workers receive it.

use serde::{Deserialize, Serialize};

/// Bumped when the layout changes, so nodes of different versions on one
/// channel skip each other's frames instead of misreading them.
const VERSION: u8 = 1;

/// One frame on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Frame<'a> {
    /// A worker's broadcast.
    Message {
        #[serde(borrow)]
        node: &'a str,
        slot: u32,
        seq: u64,
        #[serde(borrow)]
        payload: &'a [u8],
    },
    /// Sent when the node's queue is empty: every sequence number up to `last`
    /// has been published or dropped, so a receiver that saw less missed the
    /// rest even when the sender has gone quiet.
    Heartbeat {
        #[serde(borrow)]
        node: &'a str,
        last: u64,
    },
}

impl<'a> Frame<'a> {
    /// The sending node.
    pub(crate) fn node(&self) -> &'a str {
        match self {
            Frame::Message { node, .. } | Frame::Heartbeat { node, .. } => node,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Writing into a Vec only fails for types serde cannot represent,
        // which a frame never holds.
        postcard::to_io(self, &mut out).expect("a frame always encodes");
        out
    }

    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Frame<'a>, DecodeError> {
        match bytes.split_first() {
            None => Err(DecodeError::Empty),
            Some((&VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|err| DecodeError::Malformed(err.to_string()))
            }
            Some((&version, _)) => Err(DecodeError::Version(version)),
        }
    }
}

/// Why a frame on the channel was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("an empty frame")]
    Empty,
    #[error("a frame of layout version {0} (this node reads version {VERSION}); run one corral version per channel")]
    Version(u8),
    #[error("a frame that is not corral's ({0}); is another program publishing on this channel?")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_with_its_payload_bytes_untouched() {
        let payload = br#"{"event":"payment.captured","amount":1250}"#;
        let frame = Frame::Message {
            node: "web-1:4100:9f2c",
            slot: 3,
            seq: 42,
            payload,
        };
        let bytes = frame.encode();
        assert_eq!(Frame::decode(&bytes), Ok(frame));
        // The JSON is carried as it is, not escaped into a string.
        assert!(bytes.windows(payload.len()).any(|w| w == payload));
        assert!(bytes.len() < payload.len() + 32, "{} bytes", bytes.len());
    }

    #[test]
    fn a_heartbeat_round_trips() {
        let frame = Frame::Heartbeat {
            node: "n",
            last: u64::MAX,
        };
        assert_eq!(frame.node(), "n");
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }

    #[test]
    fn foreign_and_future_frames_are_refused_with_a_reason() {
        assert_eq!(Frame::decode(b""), Err(DecodeError::Empty));
        assert_eq!(Frame::decode(&[9, 0, 0]), Err(DecodeError::Version(9)));
        assert!(matches!(
            Frame::decode(&[VERSION, 0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        let text = DecodeError::Version(9).to_string();
        assert!(text.contains("version 9"), "{text}");
    }
}
