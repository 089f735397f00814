//! Storage: everything that must hold across requests, processes and
//! restarts. Depends on the domain only; answers in domain types and
//! [`StoreError`], never in HTTP terms.

pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::domain::payment::{NewPayment, Payment};
use crate::domain::settlement::{BatchResult, Checked};

pub use self::postgres::PgStore;
pub use sqlite::{SqliteStore, Synchronous};

/// What the service needs from its database, whichever it is. One node or
/// many, the invariants hold:
/// - one payment per idempotency key, even when requests race on several
///   nodes;
/// - every settlement id settled exactly once, even when batches race;
/// - an async batch is leased to one process at a time; when its holder
///   dies the lease runs out and any process may claim it.
///
/// Calls block (network or file I/O): async code goes through
/// [`StoreHandle::blocking`]; pool threads call them directly.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Create a payment for `key`, or replay / refuse when the key is known.
    fn create_payment(&self, key: &str, req: &NewPayment) -> Result<CreateOutcome, StoreError>;

    /// The stored JSON of a payment.
    fn payment_json(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Number of payments stored (for tests and diagnostics).
    fn payment_count(&self) -> Result<u64, StoreError>;

    /// Settle a checked batch atomically. With `owner = None` (synchronous
    /// batch) the batch row is created done. With `owner = Some(o)` (stored
    /// job) the batch must still be `processing` and leased to `o`;
    /// otherwise `Ok(None)` is returned with nothing written.
    fn settle(
        &self,
        batch_id: &str,
        lines: &Checked<'_>,
        owner: Option<&str>,
    ) -> Result<Option<BatchResult>, StoreError>;

    /// Store an async batch durably, leased to `owner` until `lease_until_ms`.
    fn enqueue_batch(
        &self,
        batch_id: &str,
        body: &[u8],
        total: u64,
        owner: &str,
        lease_until_ms: i64,
    ) -> Result<(), StoreError>;

    /// Take over every unfinished batch whose lease has run out; returns
    /// their ids. Two processes never claim the same batch.
    fn claim_expired(&self, owner: &str, lease_until_ms: i64) -> Result<Vec<String>, StoreError>;

    /// Extend `owner`'s lease and record progress; false when the lease is
    /// no longer `owner`'s.
    fn renew_lease(
        &self,
        batch_id: &str,
        owner: &str,
        lease_until_ms: i64,
        processed: Option<u64>,
    ) -> Result<bool, StoreError>;

    /// The stored body of an unfinished batch.
    fn batch_body(&self, batch_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// A batch's status row.
    fn batch(&self, batch_id: &str) -> Result<Option<BatchRow>, StoreError>;

    /// How many ids are settled in all (for tests and diagnostics).
    fn settled_count(&self) -> Result<u64, StoreError>;
}

/// A shared store. Cheap to clone; derefs to the [`Store`].
#[derive(Debug, Clone)]
pub struct StoreHandle(Arc<dyn Store>);

impl StoreHandle {
    /// Share `store`.
    pub fn new(store: impl Store) -> Self {
        StoreHandle(Arc::new(store))
    }

    /// Run blocking store work off the event loop.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl std::ops::Deref for StoreHandle {
    type Target = dyn Store;

    fn deref(&self) -> &dyn Store {
        self.0.as_ref()
    }
}

/// Open the store `database` selects: SQLite under `data_dir` with the
/// given durability and lock wait, or Postgres.
///
/// ```
/// use payments::domain::payment::NewPayment;
/// use payments::store::{open, CreateOutcome, Database, Synchronous};
///
/// let dir = tempfile::tempdir()?;
/// let store = open(&Database::Sqlite, dir.path(), Synchronous::Normal, std::time::Duration::from_secs(5))?;
/// let req = NewPayment {
///     merchant_id: "acme".into(),
///     amount: 100,
///     currency: "EUR".into(),
///     reference: "order 1".into(),
/// };
/// assert!(matches!(store.create_payment("key-1", &req)?, CreateOutcome::Created(..)));
/// assert!(matches!(store.create_payment("key-1", &req)?, CreateOutcome::Replayed(_)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open(
    database: &Database,
    data_dir: &std::path::Path,
    synchronous: Synchronous,
    busy_timeout: std::time::Duration,
) -> Result<StoreHandle, StoreError> {
    Ok(match database {
        Database::Sqlite => {
            StoreHandle::new(SqliteStore::open(data_dir, synchronous, busy_timeout)?)
        }
        Database::Postgres(url) => StoreHandle::new(PgStore::open(url)?),
    })
}

/// Which database `--database` (or its absence) selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// SQLite under `--data-dir` (the default).
    Sqlite,
    /// A Postgres server shared by every node.
    Postgres(String),
}

impl Database {
    /// From the `--database` flag: absent is SQLite, else a
    /// `postgres://` or `postgresql://` URL.
    ///
    /// ```
    /// use payments::store::Database;
    /// assert_eq!(Database::from_flag(None).ok(), Some(Database::Sqlite));
    /// assert!(Database::from_flag(Some("postgres://app@db:5432/pay")).is_ok());
    /// let err = Database::from_flag(Some("mysql://u:secret@db/x")).unwrap_err();
    /// assert!(err.to_string().starts_with("--database mysql://u:***@db/x: "));
    /// ```
    pub fn from_flag(url: Option<&str>) -> Result<Self, StoreError> {
        match url {
            None => Ok(Database::Sqlite),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Database::Postgres(u.to_owned()))
            }
            Some(u) => Err(StoreError::DatabaseFlag(redact(u))),
        }
    }
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

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
    /// `--database` is not a URL this service can use.
    #[error("--database {0}: only postgres://USER@HOST:PORT/DB URLs are supported; omit the flag to use SQLite under --data-dir")]
    DatabaseFlag(String),
    /// The Postgres server cannot be reached or refused the setup.
    #[error("--database {url}: cannot open the database ({cause}); check that the server runs and the URL's user, password, host, port and database are right")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// The cause.
        cause: String,
    },
    /// Postgres said no while serving.
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
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
