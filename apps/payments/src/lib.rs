//! `payments`: corral's showcase service, a merchant API for a fintech.
//!
//! - payments with idempotency keys that hold across worker processes,
//! - settlement batches (CSV, HMAC-signed lines) checked in parallel on the
//!   CPU pool, synchronously or as durable background jobs,
//! - document thumbnails made on the CPU pool,
//! - events for `/v1/events` subscribers.
//!
//! All state is in one SQLite file shared by every worker process. The crate
//! exposes [`router`] over an [`AppState`] so a clustered main can serve it
//! from each worker:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let state = payments::AppState::new(payments::Config::new("./data"), 0)?;
//! let _sweeper = payments::jobs::start_sweeper(&state);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, payments::router(state)).await?;
//! # Ok(()) }
//! ```

pub mod body;
pub mod config;
pub mod error;
pub mod events;
pub mod gen;
pub mod heavy;
pub mod jobs;
pub mod merchants;
pub mod payment;
pub mod routes;
pub mod settlement;
pub mod state;
pub mod store;
pub mod thumbnail;

pub use config::{Config, ServeArgs};
pub use error::ApiError;
pub use events::{Event, Events, LocalEvents};
pub use heavy::{Heavy, HeavyError, Overloaded};
pub use merchants::Merchants;
pub use routes::router;
pub use state::AppState;
pub use store::{Store, Synchronous};
