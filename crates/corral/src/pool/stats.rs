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
    /// Tasks waiting for a thread now.
    pub queued: u64,
    /// Tasks running now.
    pub running: u64,
    /// Tasks that returned a value.
    pub completed: u64,
    /// Tasks that panicked.
    pub failed: u64,
    /// Tasks `try_run` turned away because the queue was full.
    pub rejected: u64,
    /// Tasks removed before they started because nobody waited any more.
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

/// Live counters, shared by the pool handle and every queued job.
pub(crate) struct Metrics {
    started: Instant,
    threads: usize,
    queue_capacity: usize,
    pub(crate) queued: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    busy_ns: AtomicU64,
    /// One pair per pool thread (plus one for callers outside it), so
    /// threads never contend on a histogram lock.
    timings: Vec<Mutex<Timings>>,
}

struct Timings {
    wait_us: Histogram<u64>,
    run_us: Histogram<u64>,
}

impl Timings {
    fn new() -> Self {
        Timings {
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
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            timings: (0..=threads).map(|_| Mutex::new(Timings::new())).collect(),
        }
    }

    /// Records one finished task; `slot` is the rayon thread index.
    pub(crate) fn record(&self, slot: Option<usize>, wait: Duration, run: Duration) {
        self.busy_ns
            .fetch_add(u64::try_from(run.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        let slot = slot.unwrap_or(self.threads).min(self.threads);
        let mut t = self.timings[slot]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        t.wait_us.saturating_record(micros(wait));
        t.run_us.saturating_record(micros(run));
    }

    pub(crate) fn snapshot(&self) -> PoolStats {
        let mut wait = micros_histogram();
        let mut run = micros_histogram();
        for t in &self.timings {
            let t = t.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Same bounds on both sides, so adding cannot fail.
            let _ = wait.add(&t.wait_us);
            let _ = run.add(&t.run_us);
        }
        let capacity_ns = self.started.elapsed().as_nanos() as f64 * self.threads as f64;
        let busy_ns = self.busy_ns.load(Relaxed) as f64;
        PoolStats {
            threads: self.threads,
            queue_capacity: self.queue_capacity,
            queued: self.queued.load(Relaxed),
            running: self.running.load(Relaxed),
            completed: self.completed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            wait_p50_ms: ms(wait.value_at_quantile(0.5)),
            wait_p99_ms: ms(wait.value_at_quantile(0.99)),
            wait_max_ms: ms(wait.max()),
            run_p50_ms: ms(run.value_at_quantile(0.5)),
            run_p99_ms: ms(run.value_at_quantile(0.99)),
            run_max_ms: ms(run.max()),
            utilisation: if capacity_ns > 0.0 {
                (busy_ns / capacity_ns).min(1.0)
            } else {
                0.0
            },
        }
    }
}
