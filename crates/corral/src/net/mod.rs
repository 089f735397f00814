//! Sockets: binding in the primary, accepting in the workers, handing
//! connections from one to the other, PROXY protocol headers, and steering
//! the kernel's choice of socket in a `SO_REUSEPORT` group.

// `steer` and friends wait for the supervisor rewrite (issue 9).
#[allow(dead_code)]
pub(crate) mod bind;
pub(crate) mod fd_passing;
mod listener;
pub(crate) mod proxy_protocol;
// Until the supervisor rewrite (issue 9) steers the groups, only the
// sticky hashing here is called outside tests.
#[allow(dead_code)]
pub(crate) mod steering;

pub(crate) use listener::PassedQueue;
pub use listener::{Connection, Listener};
