//! The service's own Prometheus metrics. Each worker registers them with
//! corral ([`Metrics::register`], called from the clustered main), and the
//! primary's `/metrics` serves them next to corral's, one series per slot.

use std::time::Duration;

use corral::metrics::prometheus_client::metrics::counter::Counter;
use corral::metrics::prometheus_client::metrics::family::Family;
use corral::metrics::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use corral::metrics::prometheus_client::registry::{Registry, Unit};

use crate::domain::settlement::Checked;

type Labels = Vec<(&'static str, &'static str)>;

/// What one worker counted. Cheap to clone: clones count into the same
/// metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    payments_created: Counter,
    settlement_lines: Family<Labels, Counter>,
    settlement_verify: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            payments_created: Counter::default(),
            settlement_lines: Family::default(),
            // 1 ms to about 16 s: a 10,000-line batch takes a few ms on the pool.
            settlement_verify: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl Metrics {
    /// Adds the metrics to `registry` under the `payments_` prefix.
    ///
    /// ```
    /// let mut registry = corral::metrics::prometheus_client::registry::Registry::default();
    /// payments::Metrics::default().register(&mut registry);
    /// ```
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("payments");
        registry.register(
            "created",
            "Payments created (idempotent replays are not counted)",
            self.payments_created.clone(),
        );
        registry.register(
            "settlement_lines",
            "Settlement lines verified, by result",
            self.settlement_lines.clone(),
        );
        registry.register_with_unit(
            "settlement_verify",
            "Time to verify a settlement batch's signed lines on the CPU pool",
            Unit::Seconds,
            self.settlement_verify.clone(),
        );
    }

    /// A payment was created.
    pub fn payment_created(&self) {
        self.payments_created.inc();
    }

    /// A settlement batch was verified in `took`.
    pub fn settlement_checked(&self, checked: &Checked<'_>, took: Duration) {
        let valid = checked.lines.saturating_sub(checked.rejected_count) as u64;
        self.settlement_lines
            .get_or_create(&vec![("result", "valid")])
            .inc_by(valid);
        self.settlement_lines
            .get_or_create(&vec![("result", "rejected")])
            .inc_by(checked.rejected_count as u64);
        self.settlement_verify.observe(took.as_secs_f64());
    }
}
