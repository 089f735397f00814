//! Reading a PROXY protocol (v1 or v2) header off a new connection, so a
//! cluster behind a load balancer sees — and sticks to — the real client.
//!
//! The header is peeked, parsed with the `ppp` crate, and then exactly its
//! bytes are consumed: whatever the client sent after it stays in the socket
//! for the worker to read.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v1;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2: 16 fixed bytes plus at most 216 of addresses for TCP (TLVs can add more,
/// but 536 bytes covers what load balancers send).
const MAX_HEADER: usize = 536;

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
    let mut buffer = vec![0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        let peeked = stream.peek(&mut buffer).await?;
        if peeked == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a PROXY header",
            ));
        }
        let parsed = HeaderResult::parse(&buffer[..peeked]);
        if parsed.is_incomplete() {
            if peeked == MAX_HEADER {
                return Err(invalid("PROXY header too long"));
            }
            if peeked == seen {
                // Nothing new arrived: wait for more bytes instead of spinning.
                stream.readable().await?;
                tokio::task::yield_now().await;
            }
            seen = peeked;
            continue;
        }
        let (length, client) = match parsed {
            HeaderResult::V1(Ok(header)) => (header.header.len(), v1_client(&header.addresses)),
            HeaderResult::V2(Ok(header)) => (header.header.len(), v2_client(&header.addresses)),
            HeaderResult::V1(Err(err)) => {
                return Err(invalid(&format!("malformed PROXY v1 header: {err}")))
            }
            HeaderResult::V2(Err(err)) => {
                return Err(invalid(&format!("malformed PROXY v2 header: {err}")))
            }
        };
        let mut consumed = vec![0u8; length];
        stream.read_exact(&mut consumed).await?;
        return Ok(client);
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
