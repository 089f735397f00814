//! Storage: everything that must hold across requests, processes and
//! restarts. Depends on the domain only; answers in domain types and
//! [`StoreError`], never in HTTP terms.

pub mod sqlite;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::domain::payment::Payment;

pub use sqlite::{SqliteStore, Synchronous};

/// A storage failure: at start-up one sentence naming the flag or file, the
/// cause and the fix; while serving, a 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created or used.
    #[error("--data-dir {}: cannot create the directory ({source}); pass a directory this user may create and write", dir.display())]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A database file cannot be created, opened or given its mode.
    #[error("--data-dir: cannot open the database file {} ({source}); make the data directory and its files readable and writable by this user, or pass another --data-dir", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database file holds something else.
    #[error("--data-dir: {} is not a SQLite database; move that file away or pass another --data-dir", file.display())]
    NotADatabase {
        /// The file.
        file: PathBuf,
    },
    /// SQLite refused to open or set up the database.
    #[error("--data-dir: cannot set up the database {} ({source}); check that it is a payments database this user may write, or pass another --data-dir", file.display())]
    Open {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// SQLite said no.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored JSON document could not be (de)serialized.
    #[error("stored json: {0}")]
    Json(#[from] serde_json::Error),
    /// The blocking task died.
    #[error("blocking task: {0}")]
    Task(String),
}

/// Outcome of an idempotent payment creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// A new payment; the body is the 201 answer.
    Created(Payment, Vec<u8>),
    /// The key was used before with the same request: the payment it
    /// created, as first answered, byte for byte.
    Replayed(Vec<u8>),
    /// The key was used before with another request.
    Conflict,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// `processing` or `done`.
    pub status: String,
    /// Data lines in the batch.
    pub total: u64,
    /// Lines checked so far.
    pub processed: u64,
    /// The result JSON once done.
    pub result: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
