//! The control protocol: newline-delimited JSON over the control socket.
//!
//! On connect the primary sends a [`Response::Hello`] carrying
//! [`PROTOCOL_VERSION`]; the client then sends one [`Request`] line and reads
//! one or more [`Response`] lines until the primary closes the connection (or,
//! for a followed log, for as long as the client wants).

use serde::{Deserialize, Serialize};

/// The version in the hello. It changes only when a message changes meaning;
/// fields may be added without a new version, so readers ignore unknown fields.
///
/// ```
/// assert_eq!(corral::control::PROTOCOL_VERSION, 1);
/// ```
pub const PROTOCOL_VERSION: u32 = 1;

/// What a client asks the primary, one JSON object on one line.
///
/// ```
/// use corral::control::{Request, ScaleTarget};
///
/// let line = serde_json::to_string(&Request::Scale { target: ScaleTarget::By(-1) }).unwrap();
/// assert_eq!(line, r#"{"type":"scale","target":{"by":-1}}"#);
/// let back: Request = serde_json::from_str(r#"{"type":"status"}"#).unwrap();
/// assert_eq!(back, Request::Status);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The cluster's status object (the `/status` JSON); answered by [`Response::Status`].
    Status,
    /// A rolling reload: [`Response::Accepted`], then [`Response::Reloaded`]
    /// once every slot runs the new generation, or [`Response::Error`].
    Reload,
    /// Change the number of workers: [`Response::Accepted`], then
    /// [`Response::Scaled`] once that many serve, or [`Response::Error`].
    Scale {
        /// The new count, or a change to the current one.
        target: ScaleTarget,
    },
    /// A graceful stop: [`Response::Accepted`], then at once [`Response::Stopping`]; the
    /// primary exits once its workers have drained.
    Stop,
    /// The last lines of the workers' output, then [`Response::End`], or, with
    /// `follow`, every new line as it comes.
    Logs {
        /// Only this slot's lines.
        #[serde(default)]
        slot: Option<usize>,
        /// How many of the stored lines to send first (the newest ones).
        lines: usize,
        /// Keep sending new lines.
        #[serde(default)]
        follow: bool,
    },
}

/// The size a [`Request::Scale`] asks for.
///
/// ```
/// use corral::control::ScaleTarget;
/// assert_eq!("4".parse::<ScaleTarget>(), Ok(ScaleTarget::To(4)));
/// assert_eq!("+2".parse::<ScaleTarget>(), Ok(ScaleTarget::By(2)));
/// assert_eq!("-1".parse::<ScaleTarget>(), Ok(ScaleTarget::By(-1)));
/// assert!("0".parse::<ScaleTarget>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleTarget {
    /// Exactly this many workers.
    To(usize),
    /// This many more (or, negative, fewer) than now.
    By(i64),
}

impl std::str::FromStr for ScaleTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wrong = || {
            format!("`{text}` is not a worker count: write N (at least 1), +K or -K, e.g. `corral scale 4` or `corral scale +1`")
        };
        if let Some(delta) = text.strip_prefix('+') {
            return delta
                .parse::<i64>()
                .map(ScaleTarget::By)
                .map_err(|_| wrong());
        }
        if text.starts_with('-') {
            return text
                .parse::<i64>()
                .map(ScaleTarget::By)
                .map_err(|_| wrong());
        }
        match text.parse::<usize>() {
            Ok(0) | Err(_) => Err(wrong()),
            Ok(count) => Ok(ScaleTarget::To(count)),
        }
    }
}

impl std::fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleTarget::To(count) => write!(f, "{count}"),
            ScaleTarget::By(delta) => write!(f, "{delta:+}"),
        }
    }
}

/// What the primary sends, one JSON object per line.
///
/// ```
/// use corral::control::Response;
///
/// let line = r#"{"type":"reloaded","generation":4}"#;
/// let response: Response = serde_json::from_str(line).unwrap();
/// assert_eq!(response, Response::Reloaded { generation: 4 });
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The first line on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the primary.
        protocol: u32,
        /// The cluster's `--name`.
        name: String,
        /// The primary's pid.
        pid: u32,
    },
    /// The status object, the same JSON as the admin address's `/status`.
    Status {
        /// The object itself.
        status: serde_json::Value,
    },
    /// The command was handed to the supervisor; its outcome follows.
    Accepted,
    /// The rolling reload is over: every slot runs this generation.
    Reloaded {
        /// The new generation.
        generation: u64,
    },
    /// The cluster now has this many serving workers.
    Scaled {
        /// The count.
        workers: usize,
    },
    /// The graceful stop has begun; the primary exits once its workers drained.
    Stopping {
        /// The primary's pid, gone once the stop is over.
        pid: u32,
    },
    /// One line a worker wrote.
    Log(LogLine),
    /// A follower fell behind and this many lines were not sent to it.
    Skipped {
        /// How many.
        lines: u64,
    },
    /// The end of a finite answer (logs without follow).
    End,
    /// The request failed; `kind` says how.
    Error {
        /// Why the operation failed or the request was refused.
        kind: ErrorKind,
        /// One sentence for the user.
        message: String,
    },
}

/// Why a [`Response::Error`] was sent.
///
/// ```
/// use corral::control::ErrorKind;
/// assert_eq!(serde_json::to_string(&ErrorKind::Refused).unwrap(), r#""refused""#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The operation ran and did not succeed (a reload that failed or was
    /// rolled back, a scale that could not complete, a cluster that is stopping).
    Failed,
    /// The request could not be understood.
    BadRequest,
    /// The peer is not allowed to use this socket.
    Refused,
}

/// One line of a worker's standard output or standard error.
///
/// ```
/// use corral::control::{LogLine, Stream};
///
/// let line = LogLine { slot: 1, pid: 42, stream: Stream::Stdout, line: "GET /".into() };
/// assert_eq!(line.tagged(), "[worker 1 pid 42] GET /");
/// let own = LogLine { line: "[worker 1 pid 42] INFO ready".into(), ..line };
/// assert_eq!(own.tagged(), "[worker 1 pid 42] INFO ready");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The worker's slot.
    pub slot: usize,
    /// The worker's pid.
    pub pid: u32,
    /// Which of its outputs.
    pub stream: Stream,
    /// The line, without its newline.
    pub line: String,
}

impl LogLine {
    /// The line as the primary forwards it: tagged with slot and pid unless
    /// the worker tagged it itself (corral workers' log lines start with
    /// `[worker `; external programs' lines do not).
    pub fn tagged(&self) -> String {
        if self.line.starts_with(OWN_TAG) {
            self.line.clone()
        } else {
            format!("[worker {} pid {}] {}", self.slot, self.pid, self.line)
        }
    }
}

/// How a corral worker's own log lines start (see `logging.rs`).
pub(crate) const OWN_TAG: &str = "[worker ";

/// A worker's standard output or standard error.
///
/// ```
/// use corral::control::Stream;
/// assert_eq!(serde_json::to_string(&Stream::Stderr).unwrap(), r#""stderr""#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}
