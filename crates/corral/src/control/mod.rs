//! The control socket: how the `corral` command (`status`, `reload`, `scale`,
//! `stop`, `logs`, `monit`) talks to a running primary.
//!
//! Each cluster listens on an owner-only Unix socket named after it
//! ([`socket_path`]); the protocol is newline-delimited JSON ([`Request`],
//! [`Response`]). [`Client`] is the blocking client the `corral` command uses;
//! scripts may speak the protocol directly.
//!
//! ```no_run
//! use corral::control::{Client, Request, Response};
//!
//! let client = Client::connect(&corral::control::socket_path("payments", None))?;
//! let mut answers = client.request(&Request::Reload)?;
//! while let Some(answer) = answers.next_response()? {
//!     match answer {
//!         Response::Reloaded { generation } => println!("now at generation {generation}"),
//!         Response::Error { message, .. } => eprintln!("reload failed: {message}"),
//!         _ => {}
//!     }
//! }
//! # Ok::<(), corral::control::ClientError>(())
//! ```

mod bind;
mod client;
mod log_book;
mod path;
mod protocol;
mod server;
#[cfg(test)]
mod tests;

pub(crate) use bind::{bind, ControlListener};
pub use client::{Client, ClientError, Hello, Responses};
pub(crate) use log_book::LogBook;
pub use path::{control_dir, default_name, socket_path};
pub use protocol::{ErrorKind, LogLine, Request, Response, ScaleTarget, Stream, PROTOCOL_VERSION};
pub(crate) use server::serve;

/// What the control server needs from the supervisor.
#[derive(Clone)]
pub(crate) struct ControlHandle {
    /// The `/status` JSON of interfaces.md, produced by the supervisor.
    pub status: std::sync::Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    pub commands: tokio::sync::mpsc::Sender<ControlCommand>,
    pub logs: LogBook,
}

/// A request the supervisor carries out and answers on `done`.
#[derive(Debug)]
pub(crate) enum ControlCommand {
    /// Replied to when the rolling reload is over: Ok(new generation) or Err(reason).
    Reload {
        done: tokio::sync::oneshot::Sender<Result<u64, String>>,
    },
    /// Replied to when the cluster has the target number of serving workers:
    /// Ok(count) or Err(reason).
    Scale {
        target: ScaleTarget,
        done: tokio::sync::oneshot::Sender<Result<usize, String>>,
    },
    /// Graceful stop; replied to at once (the CLI then waits for the
    /// primary's pid to be gone).
    Stop {
        done: tokio::sync::oneshot::Sender<()>,
    },
}
