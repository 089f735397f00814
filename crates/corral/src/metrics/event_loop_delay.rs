//! How late the event loop runs a timer: the event-loop delay, as Node's
//! `perf_hooks.monitorEventLoopDelay` measures it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::pool::{micros, micros_histogram, ms};

/// Samples the delay of the current tokio event loop until dropped.
///
/// A timer ticks at a fixed resolution (10 ms by default); each tick records
/// how late it ran. A loop blocked for 200 ms records a delay near 200 ms.
/// Tokio's timer wheel has 1 ms granularity, so an idle loop reads 0–1 ms.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let delay = corral::metrics::EventLoopDelay::start();
/// tokio::time::sleep(std::time::Duration::from_millis(50)).await;
/// let stats = delay.snapshot();
/// assert!(stats.samples > 0);
/// assert!(stats.p50_ms <= stats.max_ms);
/// # }
/// ```
#[derive(Debug)]
pub struct EventLoopDelay {
    histogram: Arc<Mutex<Histogram<u64>>>,
    sampler: JoinHandle<()>,
}

/// Event-loop delay percentiles, from [`EventLoopDelay::snapshot`].
///
/// ```
/// let stats = corral::metrics::LoopDelayStats::default();
/// assert_eq!(serde_json::to_value(&stats).unwrap()["p99_ms"], 0.0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopDelayStats {
    /// Median delay, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile delay, in milliseconds.
    pub p99_ms: f64,
    /// Longest delay, in milliseconds.
    pub max_ms: f64,
    /// Mean delay, in milliseconds.
    pub mean_ms: f64,
    /// How many ticks were measured.
    pub samples: u64,
}

impl EventLoopDelay {
    /// Starts sampling every 10 ms on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, like [`tokio::spawn`].
    pub fn start() -> Self {
        Self::with_resolution(Duration::from_millis(10))
    }

    /// Starts sampling every `resolution` (at least 1 ms) on the current
    /// tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let delay = corral::metrics::EventLoopDelay::with_resolution(std::time::Duration::from_millis(1));
    /// tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    /// assert!(delay.snapshot().samples > 0);
    /// # }
    /// ```
    ///
    /// # Panics
    /// Outside a tokio runtime, like [`tokio::spawn`].
    pub fn with_resolution(resolution: Duration) -> Self {
        let resolution = resolution.max(Duration::from_millis(1));
        let histogram = Arc::new(Mutex::new(micros_histogram()));
        let record = Arc::clone(&histogram);
        let sampler = tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + resolution, resolution);
            // After a stall, measure from the late tick instead of firing a
            // burst of catch-up ticks that would each look late.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                let due = ticks.tick().await;
                let late = Instant::now().saturating_duration_since(due);
                record
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .saturating_record(micros(late));
            }
        });
        EventLoopDelay { histogram, sampler }
    }

    /// Percentiles of every delay measured since the start.
    pub fn snapshot(&self) -> LoopDelayStats {
        let h = self
            .histogram
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if h.is_empty() {
            return LoopDelayStats::default();
        }
        LoopDelayStats {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            samples: h.len(),
        }
    }
}

impl Drop for EventLoopDelay {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}
