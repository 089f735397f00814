//! The one error type of corral, worded so the user knows what to do next.

use std::fmt;
use std::io;

/// A boxed error from user code (the worker's serve future).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with corral's [`Error`].
///
/// ```
/// fn check() -> corral::Result<()> {
///     Ok(())
/// }
/// assert!(check().is_ok());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a cluster from starting or running.
///
/// `Debug` prints the same sentence as `Display`, so `fn main() -> corral::Result<()>`
/// shows the user a readable message rather than a struct dump.
///
/// ```
/// let err = corral::Error::NoListenAddress;
/// assert!(err.to_string().contains("--listen"));
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No address to listen on was configured.
    #[error("no listen address: call `.listen(\"HOST:PORT\")` or pass `--listen HOST:PORT`")]
    NoListenAddress,
    /// A listen address could not be understood.
    #[error("invalid listen address `{addr}`: {reason} (expected HOST:PORT, e.g. 127.0.0.1:8080 or :8080)")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Another process already listens on the address.
    #[error("cannot listen on {addr}: the address is already in use; stop the process that holds it or pick another port with --listen")]
    AddressInUse {
        /// The address as resolved.
        addr: String,
    },
    /// Binding or listening failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as resolved.
        addr: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// The worker program could not be started at all.
    #[error("cannot start a worker process from {exe}: {source}")]
    Spawn {
        /// The program the primary tried to run.
        exe: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// The settings contradict each other.
    #[error("{0}")]
    Config(String),
    /// Every worker slot kept crashing, so the primary gave up.
    #[error("every worker slot is in a crash loop ({detail}); fix the cause shown in the worker logs above and start again")]
    CrashLoop {
        /// What the last failures were.
        detail: String,
    },
    /// The process was started as a worker but its inherited state is unusable.
    #[error("this process was started as a corral worker but {0}; workers are started by the primary, do not set CORRAL_WORKER_* yourself")]
    WorkerEnvironment(String),
    /// A message could not be encoded, decoded or sent.
    #[error("{0}")]
    Message(String),
    /// The queue of messages to the primary is full: the primary is not
    /// keeping up. The message was not sent; send less often or retry later.
    #[error("the message queue to the primary is full ({messages} messages, {bytes} bytes waiting); the message was not sent: send less often, or retry later")]
    MessageQueueFull {
        /// Messages waiting.
        messages: usize,
        /// Their payload bytes.
        bytes: usize,
    },
    /// The worker's serve future returned an error.
    #[error("worker failed: {0}")]
    Worker(#[source] BoxError),
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
