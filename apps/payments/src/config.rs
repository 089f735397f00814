//! Service configuration and the command-line flags that fill it.

use std::path::PathBuf;
use std::time::Duration;

use crate::domain::merchants::{Merchants, MerchantsError};
use crate::store::{Database, StoreError, Synchronous};

/// Why the flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--merchants`.
    #[error(transparent)]
    Merchants(#[from] MerchantsError),
    /// `--database`.
    #[error(transparent)]
    Database(#[from] StoreError),
}

/// Default `--max-settlement-bytes`: 64 MiB.
pub const DEFAULT_MAX_SETTLEMENT_BYTES: usize = 64 * 1024 * 1024;

/// Default largest thumbnail upload: 32 MiB.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 32 * 1024 * 1024;

/// Everything a worker needs to serve the API.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding the SQLite database (shared by all workers).
    pub data_dir: PathBuf,
    /// SQLite under `data_dir`, or a Postgres server shared by every node.
    pub database: Database,
    /// Known merchants and their secrets.
    pub merchants: Merchants,
    /// Largest settlement CSV body.
    pub max_settlement_bytes: usize,
    /// Largest thumbnail upload.
    pub max_document_bytes: usize,
    /// SQLite durability level.
    pub synchronous: Synchronous,
    /// How long a writer waits for another process's transaction.
    pub busy_timeout: Duration,
    /// How long an async batch stays leased to the process running it without
    /// renewal; after that another process takes it over.
    pub lease: Duration,
    /// Heavy tasks running at once (placeholder pool).
    pub pool_threads: usize,
    /// Heavy tasks allowed to wait beyond those; more get 503.
    pub pool_queue: usize,
    /// `Retry-After` seconds on 503.
    pub retry_after_secs: u64,
}

impl Config {
    /// Defaults with the demo merchants and the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            database: Database::Sqlite,
            merchants: Merchants::demo(),
            max_settlement_bytes: DEFAULT_MAX_SETTLEMENT_BYTES,
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(15),
            pool_threads: 2,
            pool_queue: 16,
            retry_after_secs: 1,
        }
    }
}

/// The service's own flags (the cluster's `--listen`, `--workers`... come
/// from [`corral::ClusterArgs`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory of the SQLite database.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB` to keep everything in
    /// Postgres, shared by every node; SQLite under --data-dir when absent.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Merchants TOML file (`[[merchant]]` tables with `id` and `secret`);
    /// the embedded demo merchants when absent.
    #[arg(long)]
    pub merchants: Option<PathBuf>,
    /// Largest settlement CSV body, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_SETTLEMENT_BYTES)]
    pub max_settlement_bytes: usize,
    /// Largest thumbnail upload, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_DOCUMENT_BYTES)]
    pub max_document_bytes: usize,
    /// SQLite synchronous level: `normal` survives process crashes, `full`
    /// also power loss.
    #[arg(long, value_enum, default_value = "normal")]
    pub synchronous: Synchronous,
    /// Threads of each worker's CPU pool [default: cores / workers].
    #[arg(long, value_name = "N")]
    pub pool_threads: Option<usize>,
    /// Heavy tasks allowed to wait for the CPU pool before 503.
    #[arg(long, default_value_t = 16)]
    pub pool_queue: usize,
    /// Events span every node on this Redis server; without it they stay in
    /// this node's workers.
    #[arg(long, value_name = "redis://HOST:PORT[/DB]")]
    pub broadcast: Option<corral::broadcast::BroadcastConfig>,
}

impl ServeArgs {
    /// Build the configuration (reads the merchants file).
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let merchants = match &self.merchants {
            Some(path) => Merchants::load(path)?,
            None => Merchants::demo(),
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(Config {
            database: Database::from_flag(self.database.as_deref())?,
            merchants,
            max_settlement_bytes: self.max_settlement_bytes,
            max_document_bytes: self.max_document_bytes,
            synchronous: self.synchronous,
            pool_threads: self.pool_threads.unwrap_or(threads),
            pool_queue: self.pool_queue,
            ..Config::new(self.data_dir.clone())
        })
    }
}
