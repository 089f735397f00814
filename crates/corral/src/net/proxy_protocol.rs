//! Reading a PROXY protocol (v1 or v2) header off a new connection, so a
//! cluster behind a load balancer sees — and sticks to — the real client.
//!
//! Exactly the header's bytes are consumed: whatever the client sent after it
//! stays in the socket for the worker to read. Each round peeks at what has
//! arrived, works out how much of it belongs to the header (v1 ends at its
//! CRLF, v2 states its length in bytes 14..16) and reads just that, so every
//! round consumes at least one byte and the next peek sleeps until more come:
//! a client holding half a header costs nothing until the timeout closes it.
//! The bytes are then parsed with the `ppp` crate.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v1;
use ppp::v2;
use ppp::PartialResult;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2: 16 fixed bytes plus at most 216 of addresses for TCP (TLVs can add more,
/// but 536 bytes covers what load balancers send).
const MAX_HEADER: usize = 536;
/// The protocol's own bound for a v1 line, CRLF included.
const MAX_V1: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol and the 2-byte length.
const V2_FIXED: usize = 16;

/// Reads the header. `Ok(Some(addr))`: the client's address; `Ok(None)`: a
/// valid header that names no address (`UNKNOWN`, `LOCAL`: health checks);
/// `Err`: malformed, missing or too slow — close the connection.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    limit: Duration,
) -> io::Result<Option<SocketAddr>> {
    tokio::time::timeout(limit, read_header_now(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY protocol header in time"))?
}

async fn read_header_now(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut header = HeaderBytes::default();
    let mut chunk = [0u8; MAX_HEADER];
    loop {
        // Sleeps until the socket has bytes we have not consumed yet.
        let peeked = stream.peek(&mut chunk).await?;
        if peeked == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a PROXY header",
            ));
        }
        let take = header.take(&chunk[..peeked])?;
        // Those bytes are already in the socket: this read does not wait.
        stream.read_exact(&mut chunk[..take]).await?;
        if let Some(client) = header.push(&chunk[..take])? {
            return Ok(client);
        }
    }
}

/// The bytes of a header consumed so far; decides how many of the next ones
/// still belong to it. Kept apart from the socket so it can be tested and
/// fuzzed on its own.
#[derive(Debug, Default)]
pub(crate) struct HeaderBytes {
    bytes: Vec<u8>,
}

impl HeaderBytes {
    /// How many of `available` (the bytes next in the socket) belong to the
    /// header: at least one when `available` is not empty, none beyond the
    /// header's end. An error when they cannot continue a header.
    pub(crate) fn take(&self, available: &[u8]) -> io::Result<usize> {
        let have = &self.bytes;
        let Some(&first) = have.first().or(available.first()) else {
            return Ok(0);
        };
        match first {
            b'P' => {
                let room = MAX_V1 - have.len();
                match available.iter().position(|&b| b == b'\n') {
                    Some(end) if end < room => Ok(end + 1),
                    _ if available.len() < room => Ok(available.len()),
                    _ => Err(invalid("PROXY v1 header longer than 107 bytes")),
                }
            }
            b'\r' => {
                let total = if have.len() >= V2_FIXED {
                    V2_FIXED + usize::from(u16::from_be_bytes([have[14], have[15]]))
                } else {
                    V2_FIXED
                };
                Ok(available.len().min(total - have.len()))
            }
            _ => Err(invalid("not a PROXY protocol header")),
        }
    }

    /// Appends bytes `take` allowed. `Ok(Some(client))` once the header is
    /// complete and valid (`client` as [`read_header`] returns it).
    pub(crate) fn push(&mut self, bytes: &[u8]) -> io::Result<Option<Option<SocketAddr>>> {
        self.bytes.extend_from_slice(bytes);
        let have = &self.bytes[..];
        let Some(&first) = have.first() else {
            return Ok(None);
        };
        if first == b'P' {
            check_prefix(have, V1_PREFIX, "not a PROXY protocol header")?;
            if !have.ends_with(b"\n") {
                return Ok(None);
            }
            // `ppp` also takes a bare LF after UNKNOWN; the protocol says CRLF.
            if !have.ends_with(b"\r\n") {
                return Err(invalid("malformed PROXY v1 header: it must end with CRLF"));
            }
            return match v1::Header::try_from(have) {
                Ok(header) if header.header.len() == have.len() => {
                    Ok(Some(v1_client(&header.addresses)))
                }
                Ok(_) => Err(invalid("malformed PROXY v1 header: not one line")),
                Err(err) if err.is_incomplete() => {
                    Err(invalid("malformed PROXY v1 header: it must end with CRLF"))
                }
                Err(err) => Err(invalid(&format!("malformed PROXY v1 header: {err}"))),
            };
        }
        check_prefix(have, V2_SIGNATURE, "not a PROXY protocol header")?;
        if have.len() < V2_FIXED {
            return Ok(None);
        }
        let total = V2_FIXED + usize::from(u16::from_be_bytes([have[14], have[15]]));
        if total > MAX_HEADER {
            return Err(invalid("PROXY v2 header longer than 536 bytes"));
        }
        if have.len() < total {
            return Ok(None);
        }
        match v2::Header::try_from(have) {
            Ok(header) if header.header.len() == have.len() => {
                Ok(Some(v2_client(&header.addresses)))
            }
            Ok(_) => Err(invalid("malformed PROXY v2 header: wrong length")),
            Err(err) => Err(invalid(&format!("malformed PROXY v2 header: {err}"))),
        }
    }
}

/// Fails as soon as the bytes stop matching the header's fixed start.
fn check_prefix(have: &[u8], prefix: &[u8], message: &str) -> io::Result<()> {
    let common = have.len().min(prefix.len());
    if have[..common] == prefix[..common] {
        Ok(())
    } else {
        Err(invalid(message))
    }
}

fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(addresses: &v2::Addresses) -> Option<SocketAddr> {
    match addresses {
        v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn v1_names_the_client_and_leaves_the_request() {
        let (mut client, mut server) = connected().await;
        client
            .write_all(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let addr = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, Some("10.1.2.3:5555".parse().unwrap()));
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET /");
    }

    #[tokio::test]
    async fn v2_names_the_client() {
        let (mut client, mut server) = connected().await;
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 168, 7, 9, 10, 0, 0, 1, 0x1f, 0x90, 0, 80,
        ]);
        header.extend_from_slice(b"hi");
        client.write_all(&header).await.unwrap();
        let addr = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, Some("192.168.7.9:8080".parse().unwrap()));
        let mut rest = [0u8; 2];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hi");
    }

    #[tokio::test]
    async fn a_header_split_across_packets_is_reassembled() {
        let (mut client, mut server) = connected().await;
        let reader =
            tokio::spawn(async move { read_header(&mut server, Duration::from_secs(5)).await });
        client.write_all(b"PROXY TCP4 10.9.8.7 ").await.unwrap();
        client.flush().await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"10.0.0.1 4000 80\r\n").await.unwrap();
        let addr = reader.await.unwrap().unwrap();
        assert_eq!(addr, Some("10.9.8.7:4000".parse().unwrap()));
    }

    /// Feeds `input` to a [`HeaderBytes`] the way the socket loop does, the
    /// socket delivering at most `step` bytes at a time; returns the result
    /// and how many bytes were consumed.
    fn drive(input: &[u8], step: usize) -> (io::Result<Option<SocketAddr>>, usize) {
        let mut header = HeaderBytes::default();
        let mut consumed = 0;
        loop {
            let available = &input[consumed..(consumed + step).min(input.len())];
            if available.is_empty() {
                return (Err(io::ErrorKind::UnexpectedEof.into()), consumed);
            }
            let take = match header.take(available) {
                Ok(take) => take,
                Err(err) => return (Err(err), consumed),
            };
            assert!((1..=available.len()).contains(&take));
            match header.push(&available[..take]) {
                Ok(Some(client)) => return (Ok(client), consumed + take),
                Ok(None) => consumed += take,
                Err(err) => return (Err(err), consumed + take),
            }
        }
    }

    #[test]
    fn exactly_the_header_is_consumed_however_the_bytes_arrive() {
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 168, 7, 9, 10, 0, 0, 1, 0x1f, 0x90, 0, 80,
        ]);
        let cases: [(&[u8], Option<SocketAddr>); 3] = [
            (
                b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 80\r\n",
                Some("10.1.2.3:5555".parse().unwrap()),
            ),
            (b"PROXY UNKNOWN\r\n", None),
            (&v2, Some("192.168.7.9:8080".parse().unwrap())),
        ];
        for (header, client) in cases {
            let mut input = header.to_vec();
            input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            for step in 1..input.len() {
                let (result, consumed) = drive(&input, step);
                assert_eq!(result.unwrap(), client, "step {step}");
                assert_eq!(consumed, header.len(), "step {step}");
            }
        }
    }

    #[test]
    fn bad_starts_and_overlong_lines_fail_early() {
        assert!(drive(b"GET / HTTP/1.1\r\n", 100).0.is_err());
        assert_eq!(drive(b"PRXY", 100).1, 4);
        assert!(drive(b"PRXY TCP4", 100).0.is_err());
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        let (result, consumed) = drive(&long, 7);
        assert!(result.is_err());
        assert!(consumed <= MAX_V1);
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        v2.extend_from_slice(&[0; 64]);
        let (result, consumed) = drive(&v2, 64);
        assert!(result.is_err());
        assert_eq!(consumed, V2_FIXED);
    }

    #[tokio::test]
    async fn a_held_partial_header_is_not_polled_in_a_loop() {
        let (mut client, mut server) = connected().await;
        client.write_all(b"PROXY TCP4 ").await.unwrap();
        client.flush().await.unwrap();
        let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = polls.clone();
        let reader = tokio::spawn(async move {
            use std::future::Future;
            let mut read = std::pin::pin!(read_header(&mut server, Duration::from_millis(300)));
            std::future::poll_fn(|cx| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                read.as_mut().poll(cx)
            })
            .await
        });
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // A first poll, one wake-up for the bytes already there, and the timer:
        // a spinning reader is polled thousands of times in 300 ms.
        let polls = polls.load(std::sync::atomic::Ordering::Relaxed);
        assert!(polls <= 5, "polled {polls} times");
        drop(client);
    }

    #[tokio::test]
    async fn garbage_is_rejected() {
        let (mut client, mut server) = connected().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_header(&mut server, Duration::from_secs(5))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (_client, mut server) = connected().await;
        let err = read_header(&mut server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
