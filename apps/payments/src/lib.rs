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
//! from each worker.
//!
//! Layers, each depending only on those above it:
//! - [`domain`]: payments, settlements, merchants, ids; pure, typed errors;
//! - [`store`]: what must hold across processes and restarts;
//! - [`compute`]: CPU-heavy work on the pool, under admission and memory
//!   bounds;
//! - [`jobs`]: durable async settlement batches;
//! - [`http`]: routes, bodies, the WebSocket, and the one mapping of errors
//!   to status codes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let state = payments::AppState::new(payments::Config::new("./data"), 0)?;
//! let _sweeper = payments::jobs::start_sweeper(&state);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, payments::router(state)).await?;
//! # Ok(()) }
//! ```

pub mod compute;
pub mod config;
pub mod domain;
pub mod events;
pub mod gen;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod state;
pub mod store;

// The settlement checker is measured by the bench crate under this path.
pub use domain::settlement;

pub use compute::{Heavy, HeavyError, Overloaded};
pub use config::{Config, ServeArgs};
pub use domain::merchants::Merchants;
pub use events::{Event, Events, LocalEvents};
pub use http::error::ApiError;
pub use http::router;
pub use metrics::Metrics;
pub use state::AppState;
pub use store::{Database, PgStore, SqliteStore, Store, StoreError, StoreHandle, Synchronous};
