//! Clustering: the builder, the primary (supervisor) and the worker side.

mod acceptor;
mod admin;
#[cfg(feature = "clap")]
mod args;
mod balancer;
mod builder;
mod config;
#[cfg(feature = "clap")]
mod config_file;
mod identity;
mod messages;
mod outbox;
mod primary;
mod request_tracking;
mod spawn;
mod supervisor;
mod watchdog;
mod worker;

#[cfg(feature = "clap")]
pub use args::ClusterArgs;
pub use builder::{Cluster, ClusterBuilder};
pub use config::{Balance, Workers};
#[cfg(feature = "clap")]
pub use config_file::{ConfigFile, ProgramSpec};
pub use messages::{Message, Published, Subscription, MAX_MESSAGE_BYTES};
pub use request_tracking::{TrackRequests, TrackRequestsLayer, TrackedResponse};
pub use worker::Worker;
