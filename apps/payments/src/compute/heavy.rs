//! The one door to CPU-heavy work.
//!
//! Handlers never run parsing, signature checks or image work on the event
//! loop: they hand a closure to [`Heavy`], which runs it on the worker's
//! `corral::pool::Pool` (lower-priority threads; rayon inside a task uses the
//! same threads). On top of the pool it keeps one admission bound, taken per
//! request, so overload is decided per request: an admitted batch's chunks
//! wait for the pool, and only new heavy requests are turned away with 503.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pool's queue is full; the caller should answer 503 + `Retry-After`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("CPU pool queue is full")]
pub struct Overloaded {
    /// Suggested `Retry-After`, in seconds.
    pub retry_after_secs: u64,
}

/// Why a heavy task produced no value.
#[derive(Debug, thiserror::Error)]
pub enum HeavyError {
    /// Rejected at admission (only from [`Heavy::try_run`]).
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The closure panicked; the panic is contained to that task.
    #[error("heavy task failed: {0}")]
    Failed(String),
}

/// A place in the heavy queue, held until the task it was taken for ends.
#[derive(Debug)]
pub struct Admission(OwnedSemaphorePermit);

/// A bounded runner for CPU-heavy closures. Cheap to clone.
#[derive(Clone)]
pub struct Heavy {
    /// Permits for tasks that are running or waiting to run.
    admitted: Arc<Semaphore>,
    pool: corral::pool::Pool,
    retry_after_secs: u64,
}

impl std::fmt::Debug for Heavy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heavy")
            .field("available", &self.admitted.available_permits())
            .finish_non_exhaustive()
    }
}

impl Heavy {
    /// A runner on a pool of its own with `threads` threads and room for
    /// `queue` more waiting requests; `try_run` rejects beyond that.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let pool = corral::pool::Pool::builder()
            .threads(threads.max(1))
            .name("payments-heavy")
            .build()?;
        Ok(Self::with_pool(pool, queue))
    }

    /// A runner on an existing pool (a cluster worker's `worker.pool()`),
    /// admitting as many requests as the pool has threads plus `queue`.
    pub fn with_pool(pool: corral::pool::Pool, queue: usize) -> Self {
        let threads = pool.stats().threads.max(1);
        Heavy {
            admitted: Arc::new(Semaphore::new(threads + queue)),
            pool,
            retry_after_secs: 1,
        }
    }

    /// Set the `Retry-After` suggested when overloaded.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = secs;
        self
    }

    /// Run `f`, waiting for room in the queue if needed (used for work that was
    /// already accepted, e.g. a stored settlement job).
    pub async fn run<T, F>(&self, f: F) -> Result<T, HeavyError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let admission = self
            .admitted
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| HeavyError::Failed(e.to_string()))?;
        self.run_with(admission, f).await
    }

    /// Run `f` if the queue has room, else fail at once with
    /// [`HeavyError::Overloaded`] (used for new requests).
    pub async fn try_run<T, F>(&self, f: F) -> Result<T, HeavyError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let admission = self.admitted.clone().try_acquire_owned().map_err(|_| {
            HeavyError::Overloaded(Overloaded {
                retry_after_secs: self.retry_after_secs,
            })
        })?;
        self.run_with(admission, f).await
    }

    /// Take a place in the queue now, to run a closure later with
    /// [`Heavy::run_admitted`]; fails at once when the queue is full. Lets a
    /// handler refuse new work with 503 before it stores anything, while the
    /// admitted work itself waits for a thread.
    pub fn try_admit(&self) -> Result<Admission, Overloaded> {
        self.admitted
            .clone()
            .try_acquire_owned()
            .map(Admission)
            .map_err(|_| Overloaded {
                retry_after_secs: self.retry_after_secs,
            })
    }

    /// Run `f` in a place taken earlier with [`Heavy::try_admit`].
    pub async fn run_admitted<T, F>(&self, admission: Admission, f: F) -> Result<T, HeavyError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run_with(admission.0, f).await
    }

    async fn run_with<T, F>(&self, admission: OwnedSemaphorePermit, f: F) -> Result<T, HeavyError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // If the caller's future is dropped while the task waits in the pool's
        // queue, the pool drops the closure unrun.
        let result = self.pool.run(f).await;
        drop(admission);
        result.map_err(|err| HeavyError::Failed(err.to_string()))
    }
}
