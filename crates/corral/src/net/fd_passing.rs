//! Handing accepted connections from the primary to a worker: the TCP
//! sockets' descriptors travel as `SCM_RIGHTS` ancillary data on a
//! `SOCK_SEQPACKET` Unix socket pair, up to [`MAX_BATCH`] in one message,
//! each with a small frame naming the listen address and the client, and a
//! sequence number.
//!
//! The hand-off is acknowledged: the primary keeps its copy of each
//! descriptor until the worker sends back (on the same pair, before it reads
//! a byte of the connection) the highest sequence number it has taken. A
//! worker that dies with connections still queued in its end of the pair
//! loses none of them: the primary still holds them and passes them on.
//!
//! Written on nix directly because the crates that wrap descriptor passing
//! either assume stream sockets (where message boundaries, and so the pairing
//! of a descriptor with its header, are not kept) or have no tokio support.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recv, recvmsg, send, sendmsg, shutdown, socketpair, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, Shutdown, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The largest frame; a sequence number, a `SocketAddr` and an index encode
/// in far less.
const MAX_HEADER: usize = 64;

/// Connections passed in one message at most (`SCM_RIGHTS` carries up to
/// 253 descriptors). One message per batch instead of one per connection
/// saves a `sendmsg` in the primary, and a `recvmsg` and a wake-up in the
/// worker, for every connection but the first.
pub(crate) const MAX_BATCH: usize = 32;

/// An acknowledgement: the highest sequence number taken, little-endian.
const ACK_BYTES: usize = 8;

/// What travels with each descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PassedHeader {
    /// Which `--listen` address accepted the connection.
    pub listener: u16,
    /// The client: the peer, or the address a PROXY protocol header named.
    pub client: SocketAddr,
}

/// One message on the pair: the header, then the sequence number the worker
/// acknowledges it by. The number trails the header so that a worker from
/// an older build (a reload can start one under this primary only the other
/// way round, but the format is the contract) reads the header alone, and a
/// newer worker under a primary that sends no number knows not to
/// acknowledge.
pub(crate) fn encode_frame(seq: u64, header: &PassedHeader) -> Result<Vec<u8>, postcard::Error> {
    let mut frame = postcard::to_allocvec(header)?;
    frame.extend_from_slice(&postcard::to_allocvec(&seq)?);
    Ok(frame)
}

/// Decodes a message carrying several descriptors: one frame (header, then
/// sequence number) per descriptor, in the descriptors' order; a single
/// header with no number is what a primary that wants no acknowledgement
/// sends.
pub(crate) fn decode_frames(
    bytes: &[u8],
) -> Result<Vec<(Option<u64>, PassedHeader)>, postcard::Error> {
    let (header, mut rest) = postcard::take_from_bytes::<PassedHeader>(bytes)?;
    if rest.is_empty() {
        return Ok(vec![(None, header)]);
    }
    let mut frames = Vec::new();
    let mut header = header;
    loop {
        let (seq, after) = postcard::take_from_bytes::<u64>(rest)?;
        frames.push((Some(seq), header));
        if after.is_empty() || frames.len() == MAX_BATCH {
            if !after.is_empty() {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            return Ok(frames);
        }
        (header, rest) = postcard::take_from_bytes::<PassedHeader>(after)?;
    }
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

/// How often the primary reads a worker's acknowledgements while it holds
/// connections the worker has not acknowledged. Reading them as they come
/// would wake the primary once more per connection (the pair is not
/// registered with the event loop at all, for the same reason: the worker
/// taking each message would wake it too); at this pace the primary holds a
/// few milliseconds' worth of descriptors, and learns of a worker's death
/// with its connections within one period.
pub(crate) const ACK_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Past this many unacknowledged connections, each send reads the
/// acknowledgements first, so a flood cannot pile up descriptors.
const READ_ACKS_AT: usize = 256;

/// The primary's end: passes connections and holds each one until the
/// worker acknowledges it.
pub(crate) struct ConnectionSender {
    socket: OwnedFd,
    next_seq: u64,
    /// Passed and not yet acknowledged, oldest first. Holding the stream
    /// keeps the connection open whatever happens to the worker.
    unacknowledged: VecDeque<(u64, PassedConnection)>,
    /// The worker's end is closed: it will acknowledge nothing more.
    worker_closed: bool,
}

impl ConnectionSender {
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        set_nonblocking(socket.as_raw_fd())?;
        Ok(ConnectionSender {
            socket,
            next_seq: 1,
            unacknowledged: VecDeque::new(),
            worker_closed: false,
        })
    }

    /// Sends one connection and keeps it until the worker acknowledges it;
    /// see [`send_batch`](Self::send_batch).
    #[cfg(test)]
    pub async fn send(
        &mut self,
        connection: PassedConnection,
    ) -> Result<(), (io::Error, PassedConnection)> {
        self.send_batch(vec![connection])
            .await
            .map_err(|(err, mut back)| (err, back.remove(0)))
    }

    /// Sends up to [`MAX_BATCH`] connections in one message and keeps them
    /// until the worker acknowledges them. On error (the worker is gone)
    /// the connections are handed back, so they can be given to another
    /// worker instead of being lost; the unacknowledged ones are in
    /// [`into_unacknowledged`](Self::into_unacknowledged).
    ///
    /// While the worker's queue is full this keeps reading acknowledgements,
    /// so a worker waiting to send one never deadlocks with it.
    pub async fn send_batch(
        &mut self,
        connections: Vec<PassedConnection>,
    ) -> Result<(), (io::Error, Vec<PassedConnection>)> {
        debug_assert!(!connections.is_empty() && connections.len() <= MAX_BATCH);
        if self.unacknowledged.len() >= READ_ACKS_AT {
            // A failure to read shows again, as a failed send, below.
            let _ = self.read_acknowledgements();
        }
        let mut message = Vec::with_capacity(connections.len() * 24);
        for (offset, connection) in connections.iter().enumerate() {
            match encode_frame(self.next_seq + offset as u64, &connection.header) {
                Ok(frame) => message.extend_from_slice(&frame),
                Err(err) => return Err((io::Error::other(err), connections)),
            }
        }
        let fds: Vec<RawFd> = connections.iter().map(|c| c.stream.as_raw_fd()).collect();
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &[IoSlice::new(&message)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                // The pair's buffer is full: the worker is behind, perhaps
                // waiting for room to acknowledge. Rare enough to poll for;
                // backing off to 50 ms keeps a stopped worker (SIGSTOP) from
                // waking the primary a thousand times a second.
                Err(nix::errno::Errno::EAGAIN) => {
                    let _ = self.read_acknowledgements();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(50));
                }
                Err(err) => return Err((err.into(), connections)),
            }
        }
        for connection in connections {
            self.unacknowledged.push_back((self.next_seq, connection));
            self.next_seq += 1;
        }
        Ok(())
    }

    /// Reads every acknowledgement the worker has sent so far, without
    /// waiting, and releases the connections they cover. `Ok(false)` once the
    /// worker's end is closed (the worker is gone): nothing more will be
    /// acknowledged.
    pub fn read_acknowledgements(&mut self) -> io::Result<bool> {
        Ok(self.read_acks()?.is_some())
    }

    /// How many acknowledgements were read, or `None` at the worker's end.
    fn read_acks(&mut self) -> io::Result<Option<usize>> {
        let mut read = 0;
        while !self.worker_closed {
            match receive_ack(self.socket.as_raw_fd()) {
                Ok(Some(taken)) => {
                    release(&mut self.unacknowledged, taken);
                    read += 1;
                }
                Ok(None) => self.worker_closed = true,
                Err(err) if err.kind() == io::ErrorKind::BrokenPipe => self.worker_closed = true,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Some(read)),
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }

    /// Waits for the worker's next acknowledgement (checking every
    /// [`ACK_POLL`]) and releases the connections it covers. `Ok(false)`
    /// once the worker's end is closed. Cancel-safe.
    pub async fn acknowledged(&mut self) -> io::Result<bool> {
        loop {
            match self.read_acks()? {
                None => return Ok(false),
                Some(0) => tokio::time::sleep(ACK_POLL).await,
                Some(_) => return Ok(true),
            }
        }
    }

    /// How many passed connections the worker has not acknowledged yet.
    pub fn unacknowledged(&self) -> usize {
        self.unacknowledged.len()
    }

    /// No more connections will follow: the worker sees the end once it has
    /// taken those queued, and can still acknowledge them.
    pub fn finish(&self) -> io::Result<()> {
        match shutdown(self.socket.as_raw_fd(), Shutdown::Write) {
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// The connections the worker never acknowledged, oldest first, with the
    /// primary's copy of each still open.
    pub fn into_unacknowledged(self) -> Vec<PassedConnection> {
        self.unacknowledged
            .into_iter()
            .map(|(_, connection)| connection)
            .collect()
    }
}

/// Drops the primary's copy of every connection up to `taken`.
fn release(unacknowledged: &mut VecDeque<(u64, PassedConnection)>, taken: u64) {
    while unacknowledged.front().is_some_and(|(seq, _)| *seq <= taken) {
        unacknowledged.pop_front();
    }
}

/// One acknowledgement, or `None` once the worker's end is closed.
fn receive_ack(socket: RawFd) -> io::Result<Option<u64>> {
    let mut buffer = [0u8; ACK_BYTES];
    loop {
        let length = match recv(socket, &mut buffer, MsgFlags::MSG_DONTWAIT) {
            // A peer that closes with messages unread in its queue leaves a
            // one-shot ECONNRESET here, reported before the messages it sent
            // earlier: its last acknowledgements are still queued behind it.
            Err(nix::errno::Errno::ECONNRESET) => continue,
            other => other.map_err(io::Error::from)?,
        };
        match length {
            0 => return Ok(None),
            ACK_BYTES => return Ok(Some(u64::from_le_bytes(buffer))),
            // Not from our worker code; an acknowledgement that cannot be
            // read releases nothing, so nothing is lost by skipping it.
            other => tracing::warn!("skipped a {other}-byte acknowledgement"),
        }
    }
}

/// The worker's end.
pub(crate) struct ConnectionReceiver {
    socket: AsyncFd<OwnedFd>,
    /// The highest sequence number received.
    taken: u64,
    /// The highest sequence number acknowledged.
    acknowledged: u64,
    /// The primary closed its end (or shut it for writing).
    ended: bool,
}

impl ConnectionReceiver {
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        set_nonblocking(socket.as_raw_fd())?;
        Ok(ConnectionReceiver {
            socket: register(socket, Interest::READABLE | Interest::WRITABLE)?,
            taken: 0,
            acknowledged: 0,
            ended: false,
        })
    }

    /// The next connection, already acknowledged; `Ok(None)` once the
    /// primary closed its end.
    #[cfg(test)]
    pub async fn recv(&mut self) -> io::Result<Option<PassedConnection>> {
        Ok(self.recv_batch(1).await?.pop())
    }

    /// Waits for at least one connection and takes those waiting, message
    /// by message, until it has `limit` or more, then acknowledges them all
    /// at once, before the caller reads a byte of any. Empty once the
    /// primary closed its end.
    pub async fn recv_batch(&mut self, limit: usize) -> io::Result<Vec<PassedConnection>> {
        let mut batch = Vec::new();
        let mut buffer = vec![0u8; MAX_BATCH * MAX_HEADER];
        while batch.len() < limit.max(1) && !self.ended {
            let received = if batch.is_empty() {
                let mut guard = self.socket.readable().await?;
                match guard.try_io(|socket| receive(socket.as_fd().as_raw_fd(), &mut buffer)) {
                    Ok(received) => received?,
                    Err(_would_block) => continue,
                }
            } else {
                match receive(self.socket.get_ref().as_raw_fd(), &mut buffer) {
                    Ok(received) => received,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => return Err(err),
                }
            };
            let Some((length, fds)) = received else {
                self.ended = true;
                break;
            };
            let frames = match decode_frames(&buffer[..length]) {
                Ok(frames) => frames,
                Err(err) => {
                    // Dropping the descriptors closes the connections: better
                    // than serving them under a wrong identity. A later
                    // acknowledgement covers them, since they are cumulative.
                    tracing::warn!("malformed connection header ({err}); connections closed");
                    continue;
                }
            };
            if frames.len() != fds.len() {
                tracing::warn!(
                    "a message named {} connections and carried {} descriptors; the unmatched are closed",
                    frames.len(),
                    fds.len()
                );
            }
            for (seq, _) in &frames {
                if let Some(seq) = seq {
                    self.taken = self.taken.max(*seq);
                }
            }
            for ((_, header), fd) in frames.into_iter().zip(fds) {
                let stream = std::net::TcpStream::from(fd);
                batch.push(PassedConnection { stream, header });
            }
        }
        self.acknowledge().await;
        Ok(batch)
    }

    /// The worker's end itself, for tests that play a worker dying mid-batch.
    #[cfg(test)]
    pub fn into_socket(self) -> OwnedFd {
        self.socket.into_inner()
    }

    /// Tells the primary every connection received so far is taken. A
    /// primary that is gone needs no acknowledgement.
    async fn acknowledge(&mut self) {
        if self.taken == self.acknowledged {
            return;
        }
        let ack = self.taken.to_le_bytes();
        loop {
            let Ok(mut guard) = self.socket.writable().await else {
                return;
            };
            match guard.try_io(|socket| {
                send(socket.as_raw_fd(), &ack, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => break,
                Ok(Err(err)) => {
                    tracing::debug!("cannot acknowledge connections: {err}");
                    break;
                }
                Err(_would_block) => continue,
            }
        }
        self.acknowledged = self.taken;
    }
}

/// One `recvmsg`: the frames' length and the descriptors, or `None` at EOF.
fn receive(socket: RawFd, buffer: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; MAX_BATCH]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = loop {
        match recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            // See `receive_ack`: the queue is still there to read.
            Err(nix::errno::Errno::ECONNRESET) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut descriptors = Vec::new();
    for control in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = control {
            // SAFETY: the kernel just installed these descriptors for us and
            // nothing else refers to them.
            descriptors.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if message.bytes == 0 && descriptors.is_empty() {
        return Ok(None);
    }
    Ok(Some((message.bytes, descriptors)))
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

/// Test scaffolding shared by the tests of the hand-off's two sides (this
/// module and the primary's acceptor).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::io::{Read, Write};

    /// A connected client and the accepted end, ready to pass as a
    /// connection of listen address `index`.
    pub fn connection(
        listener: &std::net::TcpListener,
        index: u16,
    ) -> (std::net::TcpStream, PassedConnection) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let header = PassedHeader {
            listener: index,
            client: peer,
        };
        (
            client,
            PassedConnection {
                stream: accepted,
                header,
            },
        )
    }

    /// Proves a connection is still open end to end.
    pub fn ping(client: &mut std::net::TcpStream, passed: &mut std::net::TcpStream) {
        passed.set_nonblocking(false).unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        passed.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    /// Takes one message (a batch) off the worker's end without
    /// acknowledging it, as a worker killed at the wrong moment would: its
    /// descriptors.
    pub fn take_without_ack(worker: &OwnedFd) -> Vec<OwnedFd> {
        let mut buffer = [0u8; MAX_BATCH * MAX_HEADER];
        let (_, fds) = receive(worker.as_raw_fd(), &mut buffer).unwrap().unwrap();
        fds
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{connection, ping, take_without_ack};
    use super::*;

    /// One descriptor taken off the worker's end, never acknowledged.
    fn take_one_without_ack(worker: &OwnedFd) -> OwnedFd {
        let mut fds = take_without_ack(worker);
        assert_eq!(fds.len(), 1);
        fds.remove(0)
    }

    #[tokio::test]
    async fn a_connection_crosses_with_its_header_and_is_released_once_acknowledged() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, connection) = connection(&listener, 1);
        let header = connection.header;
        sender
            .send(connection)
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        assert_eq!(sender.unacknowledged(), 1);
        let mut passed = receiver.recv().await.unwrap().unwrap();
        assert_eq!(passed.header, header);
        assert!(sender.acknowledged().await.unwrap());
        assert_eq!(sender.unacknowledged(), 0);
        ping(&mut client, &mut passed.stream);
    }

    #[tokio::test]
    async fn a_batch_is_acknowledged_at_once() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..10 {
            let (client, connection) = connection(&listener, 1);
            clients.push(client);
            sender
                .send(connection)
                .await
                .map_err(|(err, _)| err)
                .unwrap();
        }
        let batch = receiver.recv_batch(64).await.unwrap();
        assert_eq!(batch.len(), 10);
        assert!(sender.acknowledged().await.unwrap());
        assert_eq!(sender.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn several_connections_cross_in_one_message_in_order() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (clients, connections): (Vec<_>, Vec<_>) =
            (0..MAX_BATCH).map(|_| connection(&listener, 1)).unzip();
        let headers: Vec<PassedHeader> = connections.iter().map(|c| c.header).collect();
        sender
            .send_batch(connections)
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        // One message: a receiver asking for one gets the whole batch.
        let mut batch = receiver.recv_batch(1).await.unwrap();
        assert_eq!(batch.iter().map(|c| c.header).collect::<Vec<_>>(), headers);
        assert!(sender.acknowledged().await.unwrap());
        assert_eq!(sender.unacknowledged(), 0);
        for (mut client, passed) in clients.into_iter().zip(&mut batch) {
            ping(&mut client, &mut passed.stream);
        }
    }

    #[tokio::test]
    async fn a_worker_that_dies_before_acknowledging_gives_every_connection_back() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..5 {
            let (client, connection) = connection(&listener, 1);
            clients.push((client, connection.header));
            sender
                .send(connection)
                .await
                .map_err(|(err, _)| err)
                .unwrap();
        }
        // The worker takes two descriptors and dies with three still queued.
        let taken = [take_one_without_ack(&worker), take_one_without_ack(&worker)];
        drop(worker);
        drop(taken);
        assert!(!sender.acknowledged().await.unwrap());
        let back = sender.into_unacknowledged();
        assert_eq!(back.len(), 5);
        for ((client, header), mut connection) in clients.into_iter().zip(back) {
            assert_eq!(connection.header, header);
            let mut client = client;
            ping(&mut client, &mut connection.stream);
        }
    }

    #[tokio::test]
    async fn acknowledged_connections_stay_with_the_worker() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (client, connection) = connection(&listener, 1);
            clients.push(client);
            sender
                .send(connection)
                .await
                .map_err(|(err, _)| err)
                .unwrap();
        }
        let kept = receiver.recv_batch(64).await.unwrap();
        assert_eq!(kept.len(), 2);
        let (late_client, late) = connection(&listener, 1);
        let late_header = late.header;
        sender.send(late).await.map_err(|(err, _)| err).unwrap();
        drop(receiver);
        // The acknowledgement may be read before or after the close shows.
        while sender.acknowledged().await.unwrap() {}
        let back = sender.into_unacknowledged();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].header, late_header);
        drop((kept, late_client));
    }

    #[tokio::test]
    async fn a_finished_sender_still_reads_the_last_acknowledgements() {
        let (primary, worker) = pair().unwrap();
        let mut sender = ConnectionSender::new(primary).unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_client, connection) = connection(&listener, 1);
        sender
            .send(connection)
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        sender.finish().unwrap();
        assert_eq!(receiver.recv_batch(64).await.unwrap().len(), 1);
        assert!(receiver.recv_batch(64).await.unwrap().is_empty());
        assert!(sender.acknowledged().await.unwrap());
        assert_eq!(sender.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn a_closed_primary_ends_the_stream() {
        let (primary, worker) = pair().unwrap();
        drop(primary);
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        assert!(receiver.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dead_worker_hands_the_connection_back() {
        let (primary, worker) = pair().unwrap();
        drop(worker);
        let mut sender = ConnectionSender::new(primary).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_client, connection) = connection(&listener, 1);
        let header = connection.header;
        let (_, back) = sender.send(connection).await.unwrap_err();
        assert_eq!(back.header, header);
    }

    #[test]
    fn garbage_frames_are_refused() {
        assert!(decode_frames(&[]).is_err());
        assert!(decode_frames(&[0xff; 40]).is_err());
        let header = PassedHeader {
            listener: 2,
            client: "[::1]:9".parse().unwrap(),
        };
        let frame = encode_frame(u64::MAX, &header).unwrap();
        assert!(frame.len() <= MAX_HEADER);
        assert_eq!(
            decode_frames(&frame).unwrap(),
            vec![(Some(u64::MAX), header)]
        );
        let mut longer = frame.clone();
        longer.push(0);
        assert!(decode_frames(&longer).is_err());
        let mut two = frame.clone();
        two.extend_from_slice(&encode_frame(7, &header).unwrap());
        assert_eq!(
            decode_frames(&two).unwrap(),
            vec![(Some(u64::MAX), header), (Some(7), header)]
        );
        // A header without its number is only valid alone.
        let mut unnumbered = frame.clone();
        unnumbered.extend_from_slice(&postcard::to_allocvec(&header).unwrap());
        assert!(decode_frames(&unnumbered).is_err());
    }

    #[test]
    fn frames_without_a_sequence_number_still_decode() {
        // What a primary without acknowledgements sends, and what a worker
        // without them reads from a newer primary.
        let header = PassedHeader {
            listener: 0,
            client: "192.0.2.1:4000".parse().unwrap(),
        };
        let old = postcard::to_allocvec(&header).unwrap();
        assert_eq!(decode_frames(&old).unwrap(), vec![(None, header)]);
        let new = encode_frame(9, &header).unwrap();
        assert_eq!(postcard::from_bytes::<PassedHeader>(&new).unwrap(), header);
    }

    #[tokio::test]
    async fn a_primary_that_wants_no_acknowledgement_gets_none() {
        let (primary, worker) = pair().unwrap();
        let mut receiver = ConnectionReceiver::new(worker).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_client, passed) = connection(&listener, 1);
        let old = postcard::to_allocvec(&passed.header).unwrap();
        let fds = [passed.stream.as_raw_fd()];
        sendmsg::<()>(
            primary.as_raw_fd(),
            &[IoSlice::new(&old)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(receiver.recv_batch(8).await.unwrap().len(), 1);
        let mut buffer = [0u8; 16];
        let nothing = recv(primary.as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT);
        assert_eq!(nothing, Err(nix::errno::Errno::EAGAIN));
    }
}
