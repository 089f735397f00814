//! Entry points for the cargo-fuzz targets in `fuzz/`, so they can reach the
//! decoders of untrusted bytes without those becoming public API. Each one
//! feeds arbitrary bytes to a decoder exactly as corral does, and panics only
//! when an invariant breaks (a decoder panicking is the other finding).
//! Not part of corral's interface: hidden from the docs, and may change.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::ipc::{ToPrimary, ToWorker, MAX_FRAME_BYTES};
use crate::net::fd_passing::PassedHeader;
use crate::net::proxy_protocol::HeaderBytes;

/// The PROXY header reader, its input arriving in pieces of a size the first
/// byte chooses, the way the socket loop meets it: every round consumes at
/// least one byte and none past the header's end, and the result does not
/// depend on how the bytes were cut up.
pub fn proxy_header(data: &[u8]) {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let pieces = read_proxy_header(input, usize::from(step).max(1));
    let whole = read_proxy_header(input, input.len().max(1));
    // Errors may show after fewer bytes when they come in pieces; results may not differ.
    assert_eq!(
        pieces.0, whole.0,
        "the result depends on how the bytes arrive"
    );
    if let (Ok(_), consumed) = pieces {
        assert_eq!(
            consumed, whole.1,
            "the header's length depends on how it arrives"
        );
        assert!(consumed <= 536, "consumed {consumed} bytes");
        if input.first() == Some(&b'P') {
            assert!(consumed <= 107 && input[..consumed].ends_with(b"\r\n"));
        }
    }
}

/// The result (errors by kind) and the bytes consumed.
fn read_proxy_header(
    input: &[u8],
    step: usize,
) -> (
    Result<Option<std::net::SocketAddr>, std::io::ErrorKind>,
    usize,
) {
    let mut header = HeaderBytes::default();
    let mut consumed = 0;
    loop {
        let available = &input[consumed..(consumed + step).min(input.len())];
        if available.is_empty() {
            return (Err(std::io::ErrorKind::UnexpectedEof), consumed);
        }
        let take = match header.take(available) {
            Ok(take) => take,
            Err(err) => return (Err(err.kind()), consumed),
        };
        assert!(
            (1..=available.len()).contains(&take),
            "took {take} of {} available bytes",
            available.len()
        );
        consumed += take;
        match header.push(&available[..take]) {
            Ok(Some(client)) => return (Ok(client), consumed),
            Ok(None) => {}
            Err(err) => return (Err(err.kind()), consumed),
        }
    }
}

/// The IPC frame decoder, its input arriving in pieces of a size the first
/// byte chooses: frames never exceed the limit, and every message that
/// decodes encodes back to the same message.
pub fn ipc_frames(data: &[u8]) {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let mut codec = crate::ipc::codec();
    let mut buffer = BytesMut::new();
    for piece in input.chunks(usize::from(step).max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME_BYTES);
                    round_trips::<ToPrimary>(&frame);
                    round_trips::<ToWorker>(&frame);
                }
                Ok(None) => break,
                // A bad frame ends the channel.
                Err(_) => return,
            }
        }
    }
}

/// Compared as bytes, not values: heartbeat figures are floats, and a NaN
/// (which a worker may well send) is not equal to itself.
fn round_trips<M>(frame: &[u8])
where
    M: serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Ok(message) = postcard::from_bytes::<M>(frame) {
        let encoded = postcard::to_allocvec(&message).expect("a decoded message encodes");
        let again: M = postcard::from_bytes(&encoded).expect("an encoded message decodes");
        let reencoded = postcard::to_allocvec(&again).expect("a decoded message encodes");
        assert_eq!(reencoded, encoded, "{message:?} changed on its way");
    }
}

/// The header that travels with a passed connection, as the worker decodes
/// it: any header that decodes encodes back to itself, in no more than the
/// receiver's 64-byte buffer.
pub fn passed_header(data: &[u8]) {
    if let Ok(header) = postcard::from_bytes::<PassedHeader>(data) {
        let encoded = postcard::to_allocvec(&header).expect("a decoded header encodes");
        assert!(encoded.len() <= 64, "{} bytes: {header:?}", encoded.len());
        assert_eq!(
            postcard::from_bytes::<PassedHeader>(&encoded).ok(),
            Some(header)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &ToPrimary) -> Vec<u8> {
        let payload = postcard::to_allocvec(message).unwrap();
        let mut frame = vec![1u8];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame
    }

    /// Found by the `ipc_frames` target (a harness bug, not a decoder one):
    /// a heartbeat whose figures hold a NaN decodes and round-trips, though
    /// it is not equal to itself.
    #[test]
    fn a_heartbeat_with_nan_figures_round_trips() {
        let mut stats = crate::metrics::WorkerStats::default();
        stats.pool.wait_max_ms = f64::NAN;
        stats.event_loop_delay.p50_ms = -3.6e279;
        ipc_frames(&framed(&ToPrimary::Heartbeat(stats)));
    }

    /// Found by the `proxy_header` target: `ppp` accepts a v1 line ended by a
    /// bare LF; the reader must not, since the protocol ends it with CRLF.
    #[test]
    fn a_v1_line_ended_by_a_bare_lf_is_refused() {
        proxy_header(b"\x01PROXY UNKNOWN UNKNY \n\0\r\n");
        let mut header = HeaderBytes::default();
        let line = b"PROXY UNKNOWN x\n";
        assert_eq!(header.take(line).unwrap(), line.len());
        assert!(header.push(line).is_err());
    }

    #[test]
    fn the_entry_points_accept_what_they_are_meant_for() {
        proxy_header(b"\x03PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET");
        proxy_header(b"");
        ipc_frames(&framed(&ToPrimary::Ready));
        let header = PassedHeader {
            listener: 3,
            client: "[::1]:8080".parse().unwrap(),
        };
        passed_header(&postcard::to_allocvec(&header).unwrap());
    }
}
