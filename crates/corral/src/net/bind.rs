//! The primary's listening sockets: bound once, before any worker starts, and
//! held for the primary's whole life so no restart or reload closes a port.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::Balance;
use crate::error::{Error, Result};

const BACKLOG: i32 = 1024;

/// One `--listen` address and the sockets that serve it.
#[derive(Debug)]
pub(crate) struct BoundAddress {
    /// The real address, with the actual port when port 0 was asked for.
    pub local: SocketAddr,
    /// One socket per slot in `ReusePort` mode, a single shared one otherwise;
    /// `None` for a slot given up on.
    sockets: Vec<Option<Socket>>,
    /// One socket per slot (`SO_REUSEPORT` group) rather than one shared.
    per_slot: bool,
}

impl BoundAddress {
    /// The socket the worker in `slot` inherits.
    pub fn socket_for_slot(&self, slot: usize) -> Option<&Socket> {
        self.sockets[slot % self.sockets.len()].as_ref()
    }

    /// Makes sure a slot added at run time has its socket: in a
    /// `SO_REUSEPORT` group, a new member joins at the next index.
    pub fn ensure_slot(&mut self, slot: usize) -> Result<()> {
        while self.per_slot && self.sockets.len() <= slot {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.sockets.push(Some(socket));
        }
        Ok(())
    }

    /// Closes a slot's own socket (`ReusePort` mode) so the kernel stops
    /// queueing that slot's share of new connections where no worker will
    /// ever accept them; the other slots' sockets take it over.
    pub fn close_slot(&mut self, slot: usize) {
        if self.per_slot && slot < self.sockets.len() {
            self.sockets[slot] = None;
        }
    }

    /// Binds a closed slot's socket again, joining the `SO_REUSEPORT` group.
    pub fn reopen_slot(&mut self, slot: usize) -> Result<()> {
        if self.per_slot && self.sockets[slot].is_none() {
            let socket =
                listening_socket(self.local, true).map_err(|err| bind_error(self.local, err))?;
            self.sockets[slot] = Some(socket);
        }
        Ok(())
    }
}

/// Binds every address for `slots` workers in the given balancing mode.
pub(crate) fn bind_all(
    addresses: &[String],
    slots: usize,
    balance: Balance,
) -> Result<Vec<BoundAddress>> {
    if addresses.is_empty() {
        return Err(Error::NoListenAddress);
    }
    addresses
        .iter()
        .map(|text| {
            let addr = resolve(text)?;
            bind_address(addr, slots, balance)
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

fn bind_address(addr: SocketAddr, slots: usize, balance: Balance) -> Result<BoundAddress> {
    // With SO_REUSEPORT the kernel would let us join another process's group on
    // the same port and silently split its traffic. A probe bound without it
    // fails with EADDRINUSE if anyone listens there, and resolves port 0.
    let probe = new_socket(addr, false).map_err(|err| bind_error(addr, err))?;
    probe
        .bind(&addr.into())
        .map_err(|err| bind_error(addr, err))?;
    let actual = local_addr(&probe).map_err(|err| bind_error(addr, err))?;
    drop(probe);

    let per_slot = balance == Balance::ReusePort;
    let count = if per_slot { slots } else { 1 };
    let reuse_port = per_slot;
    let sockets = (0..count)
        .map(|_| listening_socket(actual, reuse_port).map(Some))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|err| bind_error(actual, err))?;
    Ok(BoundAddress {
        local: actual,
        sockets,
        per_slot,
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
    fn a_slot_added_at_run_time_joins_the_group() {
        let mut bound = bind_all(&["127.0.0.1:0".to_owned()], 1, Balance::ReusePort).unwrap();
        let address = &mut bound[0];
        address.ensure_slot(2).unwrap();
        for slot in 0..3 {
            let socket = address.socket_for_slot(slot).unwrap();
            assert_eq!(local_addr(socket).unwrap(), address.local);
        }
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
