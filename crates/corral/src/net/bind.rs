//! The primary's listening sockets: bound once, before any worker starts, and
//! held for the primary's whole life so no restart or reload closes a port.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::Balance;
use crate::error::{Error, Result};
use crate::net::steering::{self, Steering};

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
    /// otherwise; `None` for a slot whose socket was closed (never once
    /// steering is on).
    sockets: Vec<Option<Socket>>,
    /// The steering attached last, if any.
    steering: Option<Steering>,
    /// Set when a program was ever attached: from then on no socket may
    /// close, or the kernel would renumber the group under the program.
    ever_steered: bool,
    /// Set once attaching failed: logged once, not retried.
    steering_failed: bool,
}

impl BoundAddress {
    /// The socket the worker in `slot` inherits.
    pub fn socket_for_slot(&self, slot: usize) -> Option<&Socket> {
        self.sockets[slot % self.sockets.len()].as_ref()
    }

    /// Every open socket of this address: what the primary accepts from when
    /// it accepts (on per-slot sockets too, where steering is unavailable).
    pub fn sockets(&self) -> impl Iterator<Item = &Socket> {
        self.sockets.iter().flatten()
    }

    /// Closes a slot's own socket (per-slot layout, without steering) so the
    /// kernel stops queueing that slot's share of new connections where no
    /// worker will ever accept them; the other slots' sockets take it over.
    /// Does nothing while the group is steered: closing would renumber the
    /// group, and the program already sends the slot nothing.
    pub fn close_slot(&mut self, slot: usize) {
        if self.layout == Layout::PerSlot && !self.ever_steered && self.sockets.len() > 1 {
            self.sockets[slot] = None;
        }
    }

    /// Binds a closed slot's socket again, joining the `SO_REUSEPORT` group;
    /// for a slot past the last one (scaling up), binds sockets up to it, so
    /// each new socket's index in the group is again its slot.
    pub fn reopen_slot(&mut self, slot: usize) -> Result<()> {
        if self.layout != Layout::PerSlot {
            return Ok(());
        }
        while self.sockets.len() <= slot {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.sockets.push(Some(socket));
        }
        if self.sockets[slot].is_none() {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.sockets[slot] = Some(socket);
        }
        Ok(())
    }

    /// Steers the group's new connections (per-slot layout, Linux): attaches
    /// the program for `steering`, replacing the previous one atomically, or
    /// keeps it when nothing changed. Slots past the group's sockets are
    /// ignored. Returns whether steering is on; when attaching fails it says
    /// so once in the log and stays off, and the kernel spreads connections
    /// by its own hash.
    pub fn steer(&mut self, steering: &Steering) -> bool {
        if self.layout != Layout::PerSlot || self.steering_failed {
            return false;
        }
        let count = self.sockets.len();
        let steering = match steering {
            Steering::Ready(slots) => {
                Steering::Ready(slots.iter().copied().filter(|&slot| slot < count).collect())
            }
            Steering::Sticky(keeps) => {
                Steering::Sticky(keeps.iter().copied().take(count).collect())
            }
        };
        if self.steering.as_ref() == Some(&steering) {
            return true;
        }
        let result = if !steering::supported() {
            // `supported` has logged why.
            Err(None)
        } else if self.sockets.iter().any(Option::is_none) {
            Err(Some(io::Error::other(
                "a slot's socket was closed before steering started, so the group's order no longer matches the slots",
            )))
        } else {
            let socket = self
                .sockets()
                .next()
                .expect("a per-slot address has sockets");
            steering::attach(socket, &steering.compile()).map_err(Some)
        };
        match result {
            Ok(()) => {
                tracing::debug!("{}: steering new connections: {steering:?}", self.local);
                self.steering = Some(steering);
                self.ever_steered = true;
                true
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
                false
            }
        }
    }

    /// Whether a steering program is attached.
    pub fn is_steered(&self) -> bool {
        self.steering.is_some()
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
    Ok(BoundAddress {
        local: actual,
        layout,
        sockets,
        steering: None,
        ever_steered: false,
        steering_failed: false,
    })
}

fn listening_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, reuse_port)?;
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
    fn bare_port_means_every_interface() {
        assert_eq!(resolve(":8080").unwrap().to_string(), "0.0.0.0:8080");
        assert!(resolve("nonsense").is_err());
    }
}
