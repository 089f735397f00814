//! What a cluster was asked to do: the settings shared by the primary and its workers.

use std::time::Duration;

use crate::net::bind::Layout;

/// How many worker processes to run.
///
/// ```
/// use corral::Workers;
/// assert_eq!(Workers::Fixed(3).count(), 3);
/// assert!(Workers::PerCore.count() >= 1);
/// assert_eq!("max".parse::<Workers>().unwrap(), Workers::PerCore);
/// assert_eq!("2".parse::<Workers>().unwrap(), Workers::Fixed(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One worker per available core (`--workers max`): the CPUs of this
    /// process's affinity mask, capped on Linux by its cgroup CPU quota (v2
    /// `cpu.max` or v1 `cpu.cfs_quota_us`, as a container's CPU limit sets
    /// it), rounded down and at least 1. That is what
    /// `std::thread::available_parallelism` returns; `tests/cpu_quota.rs`
    /// checks it in a real cgroup.
    #[default]
    PerCore,
    /// Exactly this many workers (at least one).
    Fixed(usize),
}

impl Workers {
    /// The number of worker slots this resolves to on this machine.
    pub fn count(self) -> usize {
        match self {
            Workers::PerCore => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            Workers::Fixed(n) => n.max(1),
        }
    }
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "max" | "auto" => Ok(Workers::PerCore),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!(
                    "`{s}` is not a worker count: use a whole number of at least 1, or `max` for one per core"
                )),
                Ok(n) => Ok(Workers::Fixed(n)),
            },
        }
    }
}

/// How connections are spread over the workers.
///
/// ```
/// use corral::Balance;
/// assert_eq!(Balance::default(), Balance::ReusePort);
/// assert_eq!(Balance::Shared.to_string(), "shared");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Balance {
    /// One `SO_REUSEPORT` socket per slot; the kernel spreads connections and
    /// a slot's queue waits for its replacement when a worker dies.
    #[default]
    #[cfg_attr(feature = "clap", value(name = "reuseport"))]
    ReusePort,
    /// One socket that every worker accepts from (Node's `SCHED_NONE`).
    Shared,
    /// The primary accepts and hands connections to the ready workers in turn
    /// (Node's `SCHED_RR`).
    #[cfg_attr(feature = "clap", value(name = "round-robin"))]
    RoundRobin,
    /// The primary accepts and hands each connection to the ready worker with
    /// the fewest open connections.
    #[cfg_attr(feature = "clap", value(name = "least-conn"))]
    LeastConnections,
    /// Each connection goes to the slot its client address hashes to, so a
    /// client keeps its worker across connections and across that worker's
    /// restarts (WebSocket and session affinity). The kernel steers it to the
    /// slot's own socket; with `--proxy-protocol` (the client address is in
    /// the payload) the primary accepts and hands it over.
    Sticky,
}

impl Balance {
    /// True for the modes where the primary may accept and pass
    /// connections (sticky does with `--proxy-protocol`, or where the kernel
    /// cannot steer).
    ///
    /// ```
    /// assert!(corral::Balance::Sticky.passes_connections());
    /// assert!(!corral::Balance::ReusePort.passes_connections());
    /// ```
    pub fn passes_connections(self) -> bool {
        matches!(
            self,
            Balance::RoundRobin | Balance::LeastConnections | Balance::Sticky
        )
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::ReusePort => "reuseport",
            Balance::Shared => "shared",
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-conn",
            Balance::Sticky => "sticky",
        })
    }
}

/// The primary's handler for messages workers send with
/// [`Worker::send`](crate::Worker::send).
#[derive(Clone)]
pub(crate) struct MessageHook(
    pub std::sync::Arc<std::sync::Mutex<dyn FnMut(usize, crate::Message) + Send>>,
);

impl std::fmt::Debug for MessageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageHook")
    }
}

/// Every setting of a cluster; built by [`ClusterBuilder`](crate::ClusterBuilder).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub listen: Vec<String>,
    pub workers: Workers,
    pub balance: Balance,
    pub proxy_protocol: bool,
    pub on_message: Option<MessageHook>,
    pub ready_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// On stop, how long workers keep serving after hearing the node drains.
    pub drain_delay: Duration,
    pub drain_grace: Duration,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    pub max_memory: Option<u64>,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    pub crash_loop_limit: u32,
    pub stable_after: Duration,
    /// How long each new worker of a reload must stay ready before the next slot moves.
    pub reload_gate: Duration,
    pub logging: bool,
    pub pool_threads: Option<usize>,
    pub pool_queue: Option<usize>,
    pub admin: Option<String>,
    /// `--name`; `None` means the program's file name (`control::default_name`).
    pub name: Option<String>,
    /// `--control PATH`; `None` means `control::socket_path`'s default.
    pub control: Option<std::path::PathBuf>,
    /// `--user`/`--group`: what the workers run as.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Set by `run_command`: workers are this program, not this binary.
    pub external: Option<ExternalProgram>,
    /// How long an external program must stay up to count as ready.
    pub ready_after: Duration,
    /// `Worker::serve`: time for a request head (and a body's grace).
    pub header_timeout: Duration,
    /// `Worker::serve`: how long a keep-alive connection may idle.
    pub idle_timeout: Duration,
    /// `Worker::serve`: open connections per worker; `None`: from `RLIMIT_NOFILE`.
    pub max_connections: Option<usize>,
    /// Where worker broadcasts go: this node, or every node on a backend.
    pub broadcast: crate::broadcast::BroadcastConfig,
}

/// A program clustered by `run_command`.
#[derive(Debug, Clone)]
pub(crate) struct ExternalProgram {
    pub program: std::ffi::OsString,
    pub args: Vec<std::ffi::OsString>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            workers: Workers::PerCore,
            balance: Balance::ReusePort,
            proxy_protocol: false,
            on_message: None,
            ready_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            drain_grace: Duration::from_secs(2),
            max_requests: None,
            max_requests_jitter: 0,
            max_memory: None,
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(10),
            crash_loop_limit: 5,
            stable_after: Duration::from_secs(5),
            reload_gate: Duration::from_secs(2),
            logging: true,
            pool_threads: None,
            pool_queue: None,
            admin: None,
            name: None,
            control: None,
            user: None,
            group: None,
            external: None,
            ready_after: Duration::from_secs(1),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            broadcast: crate::broadcast::BroadcastConfig::in_cluster(),
        }
    }
}

impl Config {
    /// True where the primary accepts every connection and passes it to a
    /// worker: round-robin, least-conn, and sticky when the client address
    /// is in the payload (`--proxy-protocol`) or the kernel cannot steer.
    pub fn primary_accepts(&self) -> bool {
        match self.balance {
            Balance::RoundRobin | Balance::LeastConnections => true,
            Balance::Sticky => self.proxy_protocol || !crate::net::steering::supported(),
            Balance::ReusePort | Balance::Shared => false,
        }
    }

    /// How each address's sockets are bound: one per slot in a
    /// `SO_REUSEPORT` group the kernel spreads (and, where it can, the
    /// primary steers) for reuseport and for sticky whenever the primary
    /// does not accept; one socket otherwise.
    pub fn layout(&self) -> Layout {
        match self.balance {
            Balance::ReusePort => Layout::PerSlot,
            Balance::Sticky if !self.primary_accepts() => Layout::PerSlot,
            _ => Layout::Single,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_is_kernel_steered_unless_the_client_is_in_the_payload() {
        let config = |balance, proxy_protocol| Config {
            balance,
            proxy_protocol,
            ..Config::default()
        };
        let steers = crate::net::steering::supported();
        assert_eq!(config(Balance::Sticky, false).primary_accepts(), !steers);
        let per_slot = |config: Config| config.layout() == Layout::PerSlot;
        assert_eq!(per_slot(config(Balance::Sticky, false)), steers);
        assert!(config(Balance::Sticky, true).primary_accepts());
        assert!(!per_slot(config(Balance::Sticky, true)));
        for balance in [Balance::RoundRobin, Balance::LeastConnections] {
            assert!(config(balance, false).primary_accepts());
            assert!(!per_slot(config(balance, false)));
        }
        assert!(per_slot(config(Balance::ReusePort, true)));
        assert!(!config(Balance::ReusePort, false).primary_accepts());
        assert!(!per_slot(config(Balance::Shared, false)));
    }

    #[test]
    fn worker_count_parsing_rejects_zero_and_words() {
        assert!("0".parse::<Workers>().is_err());
        assert!("many".parse::<Workers>().is_err());
        assert_eq!("4".parse::<Workers>(), Ok(Workers::Fixed(4)));
    }
}
