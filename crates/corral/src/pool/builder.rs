//! How a pool is configured.

use std::io;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::stats::Metrics;
use super::{threads, Core, Inner, Pool};

/// Configures a [`Pool`]; made by [`Pool::builder`].
///
/// ```
/// let pool = corral::pool::Pool::builder()
///     .threads(2)
///     .queue(64)
///     .name("resize")
///     .nice(5)
///     .build()
///     .unwrap();
/// assert_eq!(pool.stats().threads, 2);
/// assert_eq!(pool.stats().queue_capacity, 64);
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    threads: Option<usize>,
    queue: usize,
    name: String,
    nice: i32,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            threads: None,
            queue: 1024,
            name: "corral-pool".to_owned(),
            nice: 10,
        }
    }
}

impl PoolBuilder {
    /// Number of threads. Default: [`default_threads(None)`](super::default_threads),
    /// one per core; a clustered worker should pass
    /// `default_threads(Some(workers))`.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// How many tasks may wait for a free thread (default 1024). Past it,
    /// `try_run` rejects with [`PoolError::QueueFull`](super::PoolError::QueueFull)
    /// and `run` waits for room.
    pub fn queue(mut self, tasks: usize) -> Self {
        self.queue = tasks;
        self
    }

    /// Thread name prefix (default `corral-pool`); threads are named
    /// `{name}-{index}`. Linux shows the first 15 bytes.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Unix nice value of the pool threads relative to the process (default
    /// 10: the event loop, at 0, wins the CPU whenever it has work). 0 keeps
    /// the process's priority. Applied on Linux only.
    pub fn nice(mut self, nice: i32) -> Self {
        self.nice = nice;
        self
    }

    /// Starts the threads; returns once all of them run.
    ///
    /// # Errors
    /// `InvalidInput` if `threads` is 0, or the OS error when a thread
    /// cannot be spawned.
    pub fn build(self) -> io::Result<Pool> {
        let threads = self.threads.unwrap_or_else(|| super::default_threads(None));
        if threads == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a pool needs at least one thread",
            ));
        }
        let places = threads
            .saturating_add(self.queue)
            .min(Semaphore::MAX_PERMITS);
        let (rayon, handles) = threads::build(threads, &self.name, self.nice)?;
        Ok(Pool {
            inner: Arc::new(Inner {
                rayon,
                _joiner: threads::Joiner(handles),
                core: Arc::new(Core {
                    permits: Semaphore::new(places),
                    metrics: Metrics::new(threads, self.queue),
                }),
            }),
        })
    }
}
