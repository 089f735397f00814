//! corral: make a Rust network service use every core.
//!
//! Two techniques, used together (see `DESIGN.md`):
//! - **clustering**: a primary process supervises one worker process per core,
//!   all serving the same ports ([`Cluster`]);
//! - **a CPU pool**: heavy work runs on a pool of lower-priority threads so the
//!   event loop never blocks ([`pool`]).

pub mod metrics;
pub mod pool;
