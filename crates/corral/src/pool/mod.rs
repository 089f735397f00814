//! The CPU pool: runs heavy closures on a fixed set of lower-priority
//! threads so the event loop stays responsive (Node's `worker_threads` with
//! Piscina, in one process and without copying data).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! use corral::pool::{Pool, PoolError};
//!
//! let pool = Pool::builder().threads(2).queue(100).build()?;
//! let digest = pool.run(|| (0..1_000_000u64).fold(0, |h, i| h ^ i.wrapping_mul(31))).await;
//! assert!(digest.is_ok());
//!
//! // A handler would answer 503 + Retry-After on QueueFull.
//! match pool.try_run(|| 2 + 2).await {
//!     Ok(four) => assert_eq!(four, 4),
//!     Err(PoolError::QueueFull) => unreachable!("the queue is empty"),
//!     Err(other) => panic!("{other}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Underneath is a [`rayon::ThreadPool`]: its work-stealing scheduler also
//! serves the data-parallel [`TaskContext::map_chunks`]. A tokio semaphore
//! bounds admission, so memory stays bounded under any load.

mod builder;
mod chunks;
mod error;
mod stats;
mod task;
mod threads;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

pub use builder::PoolBuilder;
pub use error::PoolError;
pub use stats::PoolStats;
pub use task::{Task, TaskContext};
pub use threads::default_threads;

pub(crate) use stats::{micros, micros_histogram, ms};

use stats::Metrics;
use task::State;

/// A fixed set of threads that run closures and hand back futures.
///
/// Cloning is cheap and shares the threads. When the last clone and the last
/// [`Task`] are gone the threads are stopped and joined; dropping blocks
/// until running tasks return.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = corral::pool::Pool::builder().threads(2).build().unwrap();
/// let other = pool.clone();
/// let (a, b) = tokio::join!(pool.run(|| 1), other.run(|| 2));
/// assert_eq!(a.unwrap() + b.unwrap(), 3);
/// # }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Field order matters: `rayon` is dropped (told to stop) before `_joiner`
/// joins its threads.
struct Inner {
    rayon: rayon::ThreadPool,
    _joiner: threads::Joiner,
    core: Arc<Core>,
}

/// What queued jobs share with the pool handle. One `Arc`, so a job costs
/// one reference count.
struct Core {
    /// A permit is a place in the pool, running or queued. Admission
    /// forgets its permit; the job adds it back when it is done.
    permits: Semaphore,
    metrics: Metrics,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Starts configuring a pool.
    ///
    /// ```
    /// let pool = corral::pool::Pool::builder().build().unwrap();
    /// assert_eq!(pool.stats().threads, corral::pool::default_threads(None));
    /// ```
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// Runs `f` on a pool thread. If the queue is full it waits for room
    /// (back-pressure); otherwise the task is queued at once, before the
    /// first poll.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
    /// let len = pool.run(|| "hello".repeat(1000).len()).await;
    /// assert_eq!(len, Ok(5000));
    /// # }
    /// ```
    pub fn run<F, T>(&self, f: F) -> Task<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run_with(move |_: &TaskContext<'_>| f())
    }

    /// Like [`run`](Self::run), and `f` gets a [`TaskContext`] to see
    /// whether it was cancelled and to split batch work over all threads.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
    /// let cancelled = pool.run_with(|cx| cx.is_cancelled()).await;
    /// assert_eq!(cancelled, Ok(false));
    /// # }
    /// ```
    pub fn run_with<F, T>(&self, f: F) -> Task<T>
    where
        F: FnOnce(&TaskContext<'_>) -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.inner.core.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Task::new(self.clone(), self.submit(f))
            }
            Err(_) => {
                let pool = self.clone();
                let admission = Box::pin(async move {
                    // The pool never closes its semaphore.
                    if let Ok(permit) = pool.inner.core.permits.acquire().await {
                        permit.forget();
                    }
                    pool.submit(f)
                });
                Task::new(self.clone(), State::waiting(admission))
            }
        }
    }

    /// Runs `f` if the queue has room, else resolves at once to
    /// [`PoolError::QueueFull`] without running it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
    /// assert_eq!(pool.try_run(|| 7).await, Ok(7));
    /// # }
    /// ```
    pub fn try_run<F, T>(&self, f: F) -> Task<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.try_run_with(move |_: &TaskContext<'_>| f())
    }

    /// [`try_run`](Self::try_run) with a [`TaskContext`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
    /// assert_eq!(pool.try_run_with(|cx| cx.is_cancelled()).await, Ok(false));
    /// # }
    /// ```
    pub fn try_run_with<F, T>(&self, f: F) -> Task<T>
    where
        F: FnOnce(&TaskContext<'_>) -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.inner.core.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Task::new(self.clone(), self.submit(f))
            }
            Err(_) => {
                self.metrics().rejected.fetch_add(1, Relaxed);
                Task::new(self.clone(), State::failed(PoolError::QueueFull))
            }
        }
    }

    /// A snapshot of the pool's counters and timings.
    ///
    /// ```
    /// let pool = corral::pool::Pool::builder().threads(3).build().unwrap();
    /// assert_eq!(pool.stats().threads, 3);
    /// assert_eq!(pool.stats().queued, 0);
    /// ```
    pub fn stats(&self) -> PoolStats {
        self.metrics().snapshot()
    }

    fn metrics(&self) -> &Metrics {
        &self.inner.core.metrics
    }

    /// Queues `f`; the caller holds a (forgotten) permit for it.
    fn submit<F, T>(&self, f: F) -> State<T>
    where
        F: FnOnce(&TaskContext<'_>) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (state, done) = State::queued();
        let core = Arc::clone(&self.inner.core);
        core.metrics.admitted.fetch_add(1, Relaxed);
        let admitted = Instant::now();
        self.inner
            .rayon
            .spawn(move || task::execute(core, admitted, f, done));
        state
    }
}
