//! Handing accepted connections from the primary to a worker: the TCP
//! socket's descriptor travels as `SCM_RIGHTS` ancillary data on a
//! `SOCK_SEQPACKET` Unix socket pair, with a small header naming the listen
//! address and the client.
//!
//! Written on nix directly because the crates that wrap descriptor passing
//! either assume stream sockets (where message boundaries, and so the pairing
//! of a descriptor with its header, are not kept) or have no tokio support.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The largest header; a `SocketAddr` and an index encode in far less.
const MAX_HEADER: usize = 64;

/// What travels with each descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PassedHeader {
    /// Which `--listen` address accepted the connection.
    pub listener: u16,
    /// The client: the peer, or the address a PROXY protocol header named.
    pub client: SocketAddr,
}

/// A connection on its way to a worker.
#[derive(Debug)]
pub(crate) struct PassedConnection {
    pub stream: std::net::TcpStream,
    pub header: PassedHeader,
}

/// A connected pair: the primary keeps the first end, the worker inherits the second.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// The primary's end.
pub(crate) struct ConnectionSender {
    socket: AsyncFd<OwnedFd>,
}

impl ConnectionSender {
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        set_nonblocking(socket.as_raw_fd())?;
        Ok(ConnectionSender {
            socket: register(socket, Interest::WRITABLE)?,
        })
    }

    /// Sends one connection. On error the connection is handed back, so it
    /// can be given to another worker instead of being lost.
    pub async fn send(
        &self,
        connection: PassedConnection,
    ) -> Result<(), (io::Error, PassedConnection)> {
        let header = match postcard::to_allocvec(&connection.header) {
            Ok(bytes) => bytes,
            Err(err) => return Err((io::Error::other(err), connection)),
        };
        let fds = [connection.stream.as_raw_fd()];
        let result = self
            .socket
            .async_io(Interest::WRITABLE, |socket| {
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[IoSlice::new(&header)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await;
        match result {
            // The worker now holds its own copy; ours closes on drop.
            Ok(_) => Ok(()),
            Err(err) => Err((err, connection)),
        }
    }
}

/// The worker's end.
pub(crate) struct ConnectionReceiver {
    socket: AsyncFd<OwnedFd>,
}

impl ConnectionReceiver {
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        set_nonblocking(socket.as_raw_fd())?;
        Ok(ConnectionReceiver {
            socket: register(socket, Interest::READABLE)?,
        })
    }

    /// The next connection; `Ok(None)` once the primary closed its end.
    pub async fn recv(&self) -> io::Result<Option<PassedConnection>> {
        loop {
            let mut buffer = [0u8; MAX_HEADER];
            let received = self
                .socket
                .async_io(Interest::READABLE, |socket| {
                    receive(socket.as_fd().as_raw_fd(), &mut buffer)
                })
                .await?;
            let Some((length, fd)) = received else {
                return Ok(None);
            };
            let Some(fd) = fd else {
                tracing::warn!("a connection message arrived without its descriptor; skipped");
                continue;
            };
            let header: PassedHeader = match postcard::from_bytes(&buffer[..length]) {
                Ok(header) => header,
                Err(err) => {
                    // Dropping `fd` closes the connection: better than serving
                    // it under a wrong identity.
                    tracing::warn!("malformed connection header ({err}); connection closed");
                    continue;
                }
            };
            let stream = std::net::TcpStream::from(fd);
            return Ok(Some(PassedConnection { stream, header }));
        }
    }
}

/// One `recvmsg`: the header length and the descriptor, or `None` at EOF.
fn receive(socket: RawFd, buffer: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut descriptor = None;
    for control in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = control {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us and
                // nothing else refers to it; extra ones are closed on drop.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if descriptor.is_none() {
                    descriptor = Some(owned);
                }
            }
        }
    }
    if message.bytes == 0 && descriptor.is_none() {
        return Ok(None);
    }
    Ok(Some((message.bytes, descriptor)))
}

fn register(socket: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns the descriptor, keeps it open and returns the same
    // number until the `AsyncFd` (which now owns it) is dropped.
    unsafe { AsyncFd::register_with_interest(socket, interest) }
        .map_err(|err| io::Error::other(err.to_string()))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // SAFETY: `fd` is owned by the caller for the duration of this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(borrowed, FcntlArg::F_GETFL)?);
    fcntl(borrowed, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn a_connection_crosses_with_its_header() {
        let (primary, worker) = pair().unwrap();
        let sender = ConnectionSender::new(primary).unwrap();
        let receiver = ConnectionReceiver::new(worker).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let header = PassedHeader {
            listener: 1,
            client: peer,
        };
        sender
            .send(PassedConnection {
                stream: accepted,
                header,
            })
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        let mut passed = receiver.recv().await.unwrap().unwrap();
        assert_eq!(passed.header, header);
        passed.stream.set_nonblocking(false).unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        passed.stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_closed_primary_ends_the_stream() {
        let (primary, worker) = pair().unwrap();
        drop(primary);
        let receiver = ConnectionReceiver::new(worker).unwrap();
        assert!(receiver.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dead_worker_hands_the_connection_back() {
        let (primary, worker) = pair().unwrap();
        drop(worker);
        let sender = ConnectionSender::new(primary).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let header = PassedHeader {
            listener: 0,
            client: peer,
        };
        let (_, back) = sender
            .send(PassedConnection {
                stream: accepted,
                header,
            })
            .await
            .unwrap_err();
        assert_eq!(back.header, header);
    }
}
