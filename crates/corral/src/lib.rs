//! corral: make a Rust network service use every core.
//!
//! Two techniques, used together:
//! - **clustering**: a primary process supervises one worker process per core,
//!   all serving the same ports, restarting crashed workers and reloading
//!   without dropping a connection ([`Cluster`]);
//! - **a CPU pool**: heavy work runs on a pool of lower-priority threads so the
//!   event loop never blocks ([`pool`]).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! fn main() -> corral::Result<()> {
//!     corral::Cluster::builder()
//!         .listen("0.0.0.0:8080")
//!         .workers(corral::Workers::PerCore)
//!         .run(|worker| async move {
//!             let app = Router::new().route("/", get(|| async { "hello" }));
//!             axum::serve(worker.listener(), app)
//!                 .with_graceful_shutdown(worker.shutdown())
//!                 .await
//!         })
//! }
//! ```

#[cfg(not(unix))]
compile_error!("corral supervises worker processes with Unix sockets and signals; it builds on Linux (and other Unix systems)");

pub mod broadcast;
mod cluster;
pub mod control;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod ipc;
mod logging;
pub mod metrics;
pub mod net;
pub mod pool;
mod systemd;

#[cfg(feature = "clap")]
pub use cluster::ClusterArgs;
pub use cluster::{
    Balance, Cluster, ClusterBuilder, Message, Published, Subscription, TrackRequests,
    TrackRequestsLayer, TrackedResponse, Worker, Workers, MAX_MESSAGE_BYTES,
};
#[cfg(feature = "clap")]
pub use cluster::{ConfigFile, ProgramSpec};
pub use error::{BoxError, Error, Result};
