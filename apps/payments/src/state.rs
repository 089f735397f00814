//! The state every handler shares within one worker process.

use std::sync::Arc;

use crate::compute::thumbnail::DecodeBudget;
use crate::compute::Heavy;
use crate::config::Config;
use crate::domain::ids::random_token;
use crate::domain::merchants::Merchants;
use crate::events::{Events, LocalEvents};
use crate::store::{StoreError, StoreHandle};

/// Shared state of one worker. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    slot: usize,
    store: StoreHandle,
    heavy: Heavy,
    decode_budget: DecodeBudget,
    events: Arc<dyn Events>,
    /// Identifies this process as the holder of async batch leases.
    owner: String,
    /// Says whether the node is going away (`/health` then answers 503).
    draining: std::sync::OnceLock<DrainingCheck>,
    metrics: crate::metrics::Metrics,
}

type DrainingCheck = Box<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("slot", &self.inner.slot)
            .field("owner", &self.inner.owner)
            .field("store", &self.inner.store)
            .finish()
    }
}

impl AppState {
    /// State with a CPU pool of its own sized from `config` and in-process
    /// events (one process, e.g. tests). Opens (and if needed creates) the
    /// database.
    pub fn new(config: Config, slot: usize) -> Result<Self, StoreError> {
        let heavy = Heavy::new(config.pool_threads, config.pool_queue)
            .map_err(|e| StoreError::Task(format!("cannot start the CPU pool: {e}")))?
            .with_retry_after(config.retry_after_secs);
        Self::with_parts(config, slot, heavy, Arc::new(LocalEvents::default()))
    }

    /// State with a given CPU runner and event sink (what the clustered main
    /// uses to plug in corral's pool and broadcast).
    pub fn with_parts(
        config: Config,
        slot: usize,
        heavy: Heavy,
        events: Arc<dyn Events>,
    ) -> Result<Self, StoreError> {
        let store = crate::store::open(
            &config.database,
            &config.data_dir,
            config.synchronous,
            config.busy_timeout,
        )?;
        let owner = format!("pid{}-slot{}-{}", std::process::id(), slot, random_token(8));
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                slot,
                store,
                heavy,
                decode_budget: DecodeBudget::default(),
                events,
                owner,
                draining: std::sync::OnceLock::new(),
                metrics: crate::metrics::Metrics::default(),
            }),
        })
    }

    /// Configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Worker slot (0-based), reported by `/health`.
    pub fn slot(&self) -> usize {
        self.inner.slot
    }

    /// The database.
    pub fn store(&self) -> &StoreHandle {
        &self.inner.store
    }

    /// The CPU-heavy work runner.
    pub fn heavy(&self) -> &Heavy {
        &self.inner.heavy
    }

    /// The memory this worker's image decodes share.
    pub fn decode_budget(&self) -> &DecodeBudget {
        &self.inner.decode_budget
    }

    /// The event sink.
    pub fn events(&self) -> &Arc<dyn Events> {
        &self.inner.events
    }

    /// Known merchants.
    pub fn merchants(&self) -> &Merchants {
        &self.inner.config.merchants
    }

    /// Makes `/health` answer 503 whenever `draining` says the node is
    /// going away (the clustered main passes `Worker::is_node_draining`).
    /// Only the first call counts.
    pub fn report_draining_by(&self, draining: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.inner.draining.set(Box::new(draining));
    }

    /// True once the node is going away; without a check, never.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.get().is_some_and(|draining| draining())
    }

    /// This worker's own Prometheus metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// This process's lease-holder identity.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }
}
