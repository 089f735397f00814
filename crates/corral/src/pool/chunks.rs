//! Data-parallel batch work inside one task.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use rayon::prelude::*;

use super::{PoolError, TaskContext};

impl TaskContext<'_> {
    /// Maps `items` in chunks of `chunk_size` on every thread of the pool
    /// (idle threads steal chunks), returning the results in order.
    ///
    /// `progress(done, total)` is called after each chunk, from whichever
    /// thread ran it, with the number of items done so far.
    ///
    /// # Errors
    /// [`PoolError::Cancelled`] when the task is cancelled midway; chunks not
    /// started by then are skipped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = corral::pool::Pool::builder().threads(2).build().unwrap();
    /// let records: Vec<u64> = (0..100_000).collect();
    /// let total = pool
    ///     .run_with(move |cx| {
    ///         let sums = cx.map_chunks(&records, 1000, |chunk| chunk.iter().sum::<u64>(), |_, _| {})?;
    ///         Ok::<_, corral::pool::PoolError>(sums.iter().sum::<u64>())
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(total, Ok(4_999_950_000));
    /// # }
    /// ```
    pub fn map_chunks<I, R, M, P>(
        &self,
        items: &[I],
        chunk_size: usize,
        map: M,
        progress: P,
    ) -> Result<Vec<R>, PoolError>
    where
        I: Sync,
        R: Send,
        M: Fn(&[I]) -> R + Sync + Send,
        P: Fn(usize, usize) + Sync + Send,
    {
        let total = items.len();
        let done = AtomicUsize::new(0);
        items
            .par_chunks(chunk_size.max(1))
            .map(|chunk| {
                if self.is_cancelled() {
                    return None;
                }
                let result = map(chunk);
                progress(done.fetch_add(chunk.len(), Relaxed) + chunk.len(), total);
                Some(result)
            })
            .collect::<Option<Vec<R>>>()
            .ok_or(PoolError::Cancelled)
    }
}
