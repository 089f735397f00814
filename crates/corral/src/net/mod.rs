//! Sockets: binding in the primary, accepting in the workers, handing
//! connections from one to the other, PROXY protocol headers, steering the
//! kernel's choice of socket in a `SO_REUSEPORT` group, and serving HTTP on
//! them with timeouts and a connection cap.

pub(crate) mod bind;
pub(crate) mod fd_passing;
mod listener;
mod paced_body;
pub(crate) mod proxy_protocol;
mod serve;
pub(crate) mod steering;

pub use listener::{Connection, Listener};
pub(crate) use listener::{Drain, PassedQueue};
pub use serve::{default_max_connections, serve, ServeOptions};
