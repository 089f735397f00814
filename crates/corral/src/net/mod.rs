//! Sockets: binding in the primary, accepting in the workers.

pub(crate) mod bind;
mod listener;

pub use listener::{Connection, Listener};
