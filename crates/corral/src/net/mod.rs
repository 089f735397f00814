//! Sockets: binding in the primary, accepting in the workers, handing
//! connections from one to the other, PROXY protocol headers, and steering
//! the kernel's choice of socket in a `SO_REUSEPORT` group.

pub(crate) mod bind;
pub(crate) mod fd_passing;
mod listener;
pub(crate) mod proxy_protocol;
pub(crate) mod steering;

pub(crate) use listener::PassedQueue;
pub use listener::{Connection, Listener};
