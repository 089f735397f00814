//! The primary's listening sockets: bound once, before any worker starts, and
//! held for the primary's whole life so no restart or reload closes a port.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::Balance;
use crate::error::{Error, Result};
use crate::net::steering::{self, Program, Steering};

const BACKLOG: i32 = 1024;

/// How an address's sockets are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One `SO_REUSEPORT` socket per slot, bound in slot order so that each
    /// socket's index in the group is its slot (reuseport, kernel-steered sticky).
    PerSlot,
    /// One socket, accepted from by every worker (shared) or by the primary alone.
    Single,
}

impl From<Balance> for Layout {
    /// By mode alone: per slot for reuseport only. `Config::layout` also puts
    /// kernel-steered sticky on per-slot sockets.
    fn from(balance: Balance) -> Self {
        match balance {
            Balance::ReusePort => Layout::PerSlot,
            _ => Layout::Single,
        }
    }
}

/// One `--listen` address and the sockets that serve it.
#[derive(Debug)]
pub(crate) struct BoundAddress {
    /// The real address, with the actual port when port 0 was asked for.
    pub local: SocketAddr,
    layout: Layout,
    /// One socket per slot in the `PerSlot` layout, a single shared one
    /// otherwise; `None` for a slot whose socket was closed.
    sockets: Vec<Option<Socket>>,
    /// The slot of each socket of the group, in the kernel's order: a
    /// steering program returns an index into this. It is the slot order
    /// until a socket closes, when the kernel moves its group's last socket
    /// into the gap; new sockets join at the end.
    group: Vec<usize>,
    /// What the supervisor asked for last, in slots.
    steering: Option<Steering>,
    /// The program attached now.
    attached: Option<Program>,
    /// Set once attaching failed: logged once, not retried.
    steering_failed: bool,
    /// The first socket came from systemd, which keeps it (and queues on
    /// it) across our restarts.
    activated: bool,
}

impl BoundAddress {
    /// Sockets listening in slot order (the kernel's group order), no
    /// program attached yet.
    fn unsteered(local: SocketAddr, layout: Layout, sockets: Vec<Option<Socket>>) -> Self {
        BoundAddress {
            local,
            layout,
            group: (0..sockets.len()).collect(),
            sockets,
            steering: None,
            attached: None,
            steering_failed: false,
            activated: false,
        }
    }

    /// The node is stopping: every socket corral bound itself stops
    /// listening, in every process that holds it, so new connections are
    /// refused (a client or load balancer retries those elsewhere) instead
    /// of queueing where no worker will accept them. A socket from systemd
    /// keeps listening: systemd holds it for the next start.
    pub fn stop_listening(&self) {
        let ours = self.sockets.iter().skip(usize::from(self.activated));
        for socket in ours.flatten() {
            stop_listening_on(socket);
        }
    }

    /// Whether the socket the worker in `slot` inherits came from systemd.
    pub fn slot_socket_is_systemds(&self, slot: usize) -> bool {
        self.activated && slot % self.sockets.len() == 0
    }

    /// The socket the worker in `slot` inherits.
    pub fn socket_for_slot(&self, slot: usize) -> Option<&Socket> {
        self.sockets[slot % self.sockets.len()].as_ref()
    }

    /// Every open socket of this address: what the primary accepts from when
    /// it accepts.
    pub fn sockets(&self) -> impl Iterator<Item = &Socket> {
        self.sockets.iter().flatten()
    }

    /// Each open socket with its slot (per-slot layout; slot 0 otherwise).
    #[cfg(test)]
    pub fn slot_sockets(&self) -> impl Iterator<Item = (usize, &Socket)> {
        self.sockets
            .iter()
            .enumerate()
            .filter_map(|(slot, socket)| socket.as_ref().map(|socket| (slot, socket)))
    }

    /// Closes a slot's own socket (per-slot layout) so the kernel stops
    /// queueing that slot's share of new connections where no worker will
    /// ever accept them (a slot given up on, or scaled down); the other
    /// slots' sockets take it over. Connections still queued on it are reset
    /// (or, with `net.ipv4.tcp_migrate_req`, moved to another socket).
    ///
    /// A steered group is re-steered around the gap: first away from the
    /// slot, then, once the kernel has renumbered the group, by the new order.
    pub fn close_slot(&mut self, slot: usize) {
        if self.layout != Layout::PerSlot || self.sockets.len() <= 1 || self.sockets[slot].is_none()
        {
            return;
        }
        let requested = self.steering.clone();
        if let Some(steering) = &requested {
            self.apply(&steering.without(slot));
        }
        self.sockets[slot] = None;
        if let Some(index) = self.group.iter().position(|&s| s == slot) {
            // The kernel's own rule (reuseport_detach_sock).
            self.group.swap_remove(index);
        }
        if let Some(steering) = &requested {
            self.apply(steering);
        }
    }

    /// Binds a closed slot's socket again, joining the `SO_REUSEPORT` group;
    /// for a slot past the last one (scaling up), binds sockets up to it. A
    /// steered group is re-steered to include it.
    pub fn reopen_slot(&mut self, slot: usize) -> Result<()> {
        if self.layout != Layout::PerSlot {
            return Ok(());
        }
        if self.group.is_empty() {
            // The group went with its last socket; a new one has no program.
            self.attached = None;
        }
        while self.sockets.len() <= slot {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.group.push(self.sockets.len());
            self.sockets.push(Some(socket));
        }
        if self.sockets[slot].is_none() {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.sockets[slot] = Some(socket);
            self.group.push(slot);
        }
        if let Some(steering) = self.steering.clone() {
            self.apply(&steering);
        }
        Ok(())
    }

    /// Steers the group's new connections (per-slot layout, Linux): attaches
    /// the program for `steering`, replacing the previous one atomically, or
    /// keeps it when nothing changed. Slots without a socket are left out.
    /// Returns whether steering is on; when attaching fails it says so once
    /// in the log and stays off, and the kernel spreads connections by its
    /// own hash.
    pub fn steer(&mut self, steering: &Steering) -> bool {
        if self.layout != Layout::PerSlot || self.steering_failed {
            return false;
        }
        if self.steering.as_ref() != Some(steering) {
            self.steering = Some(steering.clone());
            self.apply(steering);
        }
        !self.steering_failed
    }

    /// Attaches the program for `steering` in the group's current order,
    /// unless it is attached already.
    fn apply(&mut self, steering: &Steering) {
        if self.steering_failed {
            return;
        }
        let program = steering.compile(&self.group);
        if self.attached.as_ref() == Some(&program) {
            return;
        }
        let result = if !steering::supported() {
            // `supported` has logged why.
            Err(None)
        } else {
            match self.sockets().next() {
                Some(socket) => steering::attach(socket, &program).map_err(Some),
                None => return,
            }
        };
        match result {
            Ok(()) => {
                tracing::debug!(
                    "{}: steering new connections: {steering:?} over group {:?}",
                    self.local,
                    self.group
                );
                self.attached = Some(program);
            }
            Err(err) => {
                if let Some(err) = err {
                    tracing::warn!(
                        "{}: cannot steer new connections to ready workers ({err}); the kernel spreads them over every slot instead",
                        self.local
                    );
                }
                self.steering_failed = true;
                self.steering = None;
            }
        }
    }
}

/// Steers every address's group the same way (see [`BoundAddress::steer`]);
/// true when all of them are steered.
pub(crate) fn steer_all(bound: &mut [BoundAddress], steering: &Steering) -> bool {
    // Every address, even after one fails: each must get the new program.
    let steered: Vec<bool> = bound.iter_mut().map(|a| a.steer(steering)).collect();
    steered.into_iter().all(|steered| steered)
}

/// Binds every address for `slots` workers, in the layout given (a
/// [`Layout`], or a [`Balance`] for the mode's default layout).
pub(crate) fn bind_all(
    addresses: &[String],
    slots: usize,
    layout: impl Into<Layout>,
) -> Result<Vec<BoundAddress>> {
    let layout = layout.into();
    if addresses.is_empty() {
        return Err(Error::NoListenAddress);
    }
    addresses
        .iter()
        .map(|text| {
            let addr = resolve(text)?;
            bind_address(addr, slots, layout)
        })
        .collect()
}

/// Understands `HOST:PORT`, `[V6]:PORT` and `:PORT` (every IPv4 interface).
pub(crate) fn resolve(text: &str) -> Result<SocketAddr> {
    let invalid = |reason: String| Error::InvalidAddress {
        addr: text.to_owned(),
        reason,
    };
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_owned()
    };
    let mut candidates = full
        .to_socket_addrs()
        .map_err(|err| invalid(err.to_string()))?;
    candidates
        .next()
        .ok_or_else(|| invalid("the host name has no address".to_owned()))
}

fn bind_address(addr: SocketAddr, slots: usize, layout: Layout) -> Result<BoundAddress> {
    // With SO_REUSEPORT the kernel would let us join another process's group on
    // the same port and silently split its traffic. A probe bound without it
    // fails with EADDRINUSE if anyone listens there, and resolves port 0.
    let probe = new_socket(addr, false).map_err(|err| bind_error(addr, err))?;
    probe
        .bind(&addr.into())
        .map_err(|err| bind_error(addr, err))?;
    let actual = local_addr(&probe).map_err(|err| bind_error(addr, err))?;
    drop(probe);

    let (count, reuse_port) = match layout {
        Layout::PerSlot => (slots.max(1), true),
        Layout::Single => (1, false),
    };
    // In slot order: the kernel numbers a group's sockets in the order they
    // start listening, and steering relies on that number being the slot.
    let sockets = (0..count)
        .map(|_| listening_socket(actual, reuse_port).map(Some))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|err| bind_error(actual, err))?;
    Ok(BoundAddress::unsteered(actual, layout, sockets))
}

/// Takes a listening socket handed over by socket activation instead of
/// binding one. In the per-slot layout it is slot 0 and the other slots get
/// their own sockets in the same `SO_REUSEPORT` group, which needs the
/// activated socket to have `SO_REUSEPORT` (`ReusePort=yes` in the socket
/// unit); without it every worker shares the one socket.
pub(crate) fn adopt(socket: Socket, slots: usize, layout: Layout) -> Result<BoundAddress> {
    let local = local_addr(&socket).map_err(|err| {
        Error::Config(format!(
            "a socket passed by systemd (LISTEN_FDS) is not a TCP socket ({err}); give corral only ListenStream= sockets"
        ))
    })?;
    let _ = socket.set_tcp_nodelay(true);
    let layout = match layout {
        Layout::PerSlot if !socket.reuse_port().unwrap_or(false) => {
            tracing::warn!(
                "{local}: the socket from systemd has no SO_REUSEPORT (set ReusePort=yes in the socket unit); every worker shares it"
            );
            Layout::Single
        }
        layout => layout,
    };
    let mut sockets = vec![Some(socket)];
    if layout == Layout::PerSlot {
        for _ in 1..slots.max(1) {
            sockets.push(Some(
                listening_socket(local, true).map_err(|err| bind_error(local, err))?,
            ));
        }
    }
    let mut address = BoundAddress::unsteered(local, layout, sockets);
    address.activated = true;
    Ok(address)
}

/// Makes a listening socket stop listening in every process that holds it.
/// On Linux, shutting its read side unhashes it: no new handshake completes
/// (clients are refused) and `accept` fails as [`no_longer_listening`] says.
/// Elsewhere it does nothing; the socket listens until it is closed.
pub(crate) fn stop_listening_on(socket: &impl std::os::fd::AsFd) {
    #[cfg(target_os = "linux")]
    if let Err(err) = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Read) {
        tracing::debug!("could not stop listening: {err}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// `accept` on a socket that [`stop_listening_on`] shut (EINVAL on Linux).
pub(crate) fn no_longer_listening(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EINVAL)
}

fn listening_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, reuse_port)?;
    // Accepted connections inherit it on Linux: programs under `corral run`
    // that never set it themselves (uvicorn with --fd serves 92 req/s at
    // 44 ms each without it, 6,752 req/s with it) answer small requests at once.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the socket has no IP address"))
}

pub(crate) fn bind_error(addr: SocketAddr, err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::AddrInUse {
        Error::AddressInUse {
            addr: addr.to_string(),
        }
    } else {
        Error::Bind {
            addr: addr.to_string(),
            source: err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gives_every_slot_the_same_real_port() {
        let bound = bind_all(&["127.0.0.1:0".to_owned()], 3, Balance::ReusePort).unwrap();
        let port = bound[0].local.port();
        assert_ne!(port, 0);
        for slot in 0..3 {
            let socket_port = local_addr(bound[0].socket_for_slot(slot).unwrap())
                .unwrap()
                .port();
            assert_eq!(socket_port, port);
        }
    }

    #[test]
    fn a_closed_slot_can_rejoin_the_group() {
        let mut bound = bind_all(&["127.0.0.1:0".to_owned()], 2, Balance::ReusePort).unwrap();
        let address = &mut bound[0];
        address.close_slot(1);
        assert!(address.socket_for_slot(1).is_none());
        address.reopen_slot(1).unwrap();
        let reopened = local_addr(address.socket_for_slot(1).unwrap()).unwrap();
        assert_eq!(reopened, address.local);
    }

    #[test]
    fn a_port_in_use_is_reported_as_such() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind_all(&[addr], 2, Balance::ReusePort).unwrap_err();
        assert!(matches!(err, Error::AddressInUse { .. }), "{err}");
    }

    #[test]
    fn accepted_connections_inherit_tcp_nodelay() {
        let bound = bind_all(&["127.0.0.1:0".to_owned()], 1, Balance::ReusePort).unwrap();
        let listener: std::net::TcpListener = bound[0]
            .socket_for_slot(0)
            .unwrap()
            .try_clone()
            .unwrap()
            .into();
        let _client = std::net::TcpStream::connect(bound[0].local).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn bare_port_means_every_interface() {
        assert_eq!(resolve(":8080").unwrap().to_string(), "0.0.0.0:8080");
        assert!(resolve("nonsense").is_err());
    }
}
