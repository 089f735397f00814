//! What the pool counts, and the snapshot it reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A snapshot of a pool's counters and timings, from [`Pool::stats`](super::Pool::stats).
///
/// Counters and histograms cover the pool's whole life. It is plain data so
/// it can travel in a worker's heartbeat.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
/// pool.run(|| 6 * 7).await.unwrap();
/// let stats = pool.stats();
/// assert_eq!(stats.completed, 1);
/// let json = serde_json::to_string(&stats).unwrap();
/// assert!(json.contains("\"run_p99_ms\""));
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Threads in the pool.
    pub threads: usize,
    /// How many tasks may wait for a thread before `try_run` rejects.
    pub queue_capacity: usize,
    /// Tasks waiting for a thread now, including dropped ones a thread has
    /// not discarded yet (they still hold their queue slot).
    pub queued: u64,
    /// Tasks running now.
    pub running: u64,
    /// Tasks that returned a value.
    pub completed: u64,
    /// Tasks that panicked.
    pub failed: u64,
    /// Tasks `try_run` turned away because the queue was full.
    pub rejected: u64,
    /// Tasks discarded unrun because nobody waited for them any more
    /// (their [`Task`](super::Task) was dropped or timed out first).
    pub cancelled: u64,
    /// Tasks whose deadline passed before they finished.
    pub timed_out: u64,
    /// Median time from admission to start, in milliseconds.
    pub wait_p50_ms: f64,
    /// 99th percentile time from admission to start, in milliseconds.
    pub wait_p99_ms: f64,
    /// Longest time from admission to start, in milliseconds.
    pub wait_max_ms: f64,
    /// Median running time, in milliseconds.
    pub run_p50_ms: f64,
    /// 99th percentile running time, in milliseconds.
    pub run_p99_ms: f64,
    /// Longest running time, in milliseconds.
    pub run_max_ms: f64,
    /// Share of the threads' time spent running tasks since the pool
    /// started, from 0 to 1.
    pub utilisation: f64,
}

/// Live counters. Callers count what happens on their side in atomics;
/// each pool thread counts what it runs in its own slot, so pool threads
/// never write to a shared cache line.
pub(crate) struct Metrics {
    started: Instant,
    threads: usize,
    queue_capacity: usize,
    pub(crate) admitted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    /// One per pool thread, plus one for tasks run elsewhere.
    slots: Vec<Mutex<Slot>>,
}

struct Slot {
    started: u64,
    completed: u64,
    failed: u64,
    busy_ns: u64,
    wait_us: Histogram<u64>,
    run_us: Histogram<u64>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            started: 0,
            completed: 0,
            failed: 0,
            busy_ns: 0,
            wait_us: micros_histogram(),
            run_us: micros_histogram(),
        }
    }
}

/// Microseconds from 1 µs to an hour, 3 significant digits; larger values
/// saturate rather than fail.
pub(crate) fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reads a histogram value recorded in microseconds as milliseconds.
pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Metrics {
    pub(crate) fn new(threads: usize, queue_capacity: usize) -> Self {
        Metrics {
            started: Instant::now(),
            threads,
            queue_capacity,
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            slots: (0..=threads).map(|_| Mutex::new(Slot::new())).collect(),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        let index = rayon::current_thread_index()
            .unwrap_or(self.threads)
            .min(self.threads);
        self.slots[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn task_started(&self, wait: Duration) {
        let mut slot = self.slot();
        slot.started += 1;
        slot.wait_us.saturating_record(micros(wait));
    }

    pub(crate) fn task_finished(&self, run: Duration, panicked: bool) {
        let mut slot = self.slot();
        if panicked {
            slot.failed += 1;
        } else {
            slot.completed += 1;
        }
        slot.busy_ns = slot
            .busy_ns
            .saturating_add(u64::try_from(run.as_nanos()).unwrap_or(u64::MAX));
        slot.run_us.saturating_record(micros(run));
    }

    pub(crate) fn snapshot(&self) -> PoolStats {
        let mut wait = micros_histogram();
        let mut run = micros_histogram();
        let (mut started, mut completed, mut failed, mut busy_ns) = (0u64, 0u64, 0u64, 0u64);
        // Read the callers' side first: a task counted as started is then
        // always counted as admitted too, so `queued` cannot go negative.
        let cancelled = self.cancelled.load(Relaxed);
        for slot in &self.slots {
            let slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            started += slot.started;
            completed += slot.completed;
            failed += slot.failed;
            busy_ns = busy_ns.saturating_add(slot.busy_ns);
            // Same bounds on both sides, so adding cannot fail.
            let _ = wait.add(&slot.wait_us);
            let _ = run.add(&slot.run_us);
        }
        let admitted = self.admitted.load(Relaxed);
        let capacity_ns = self.started.elapsed().as_nanos() as f64 * self.threads as f64;
        PoolStats {
            threads: self.threads,
            queue_capacity: self.queue_capacity,
            queued: admitted.saturating_sub(started + cancelled),
            running: started.saturating_sub(completed + failed),
            completed,
            failed,
            rejected: self.rejected.load(Relaxed),
            cancelled,
            timed_out: self.timed_out.load(Relaxed),
            wait_p50_ms: ms(wait.value_at_quantile(0.5)),
            wait_p99_ms: ms(wait.value_at_quantile(0.99)),
            wait_max_ms: ms(wait.max()),
            run_p50_ms: ms(run.value_at_quantile(0.5)),
            run_p99_ms: ms(run.value_at_quantile(0.99)),
            run_max_ms: ms(run.max()),
            utilisation: if capacity_ns > 0.0 {
                (busy_ns as f64 / capacity_ns).min(1.0)
            } else {
                0.0
            },
        }
    }
}
