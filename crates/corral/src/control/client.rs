//! The client side of the control protocol, as the `corral` command uses it:
//! blocking, one connection per request.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::{ErrorKind, Request, Response, PROTOCOL_VERSION};

/// How long a primary gets to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a cluster's control socket, after the primary's hello.
///
/// ```no_run
/// use corral::control::{Client, Request, Response};
///
/// let path = corral::control::socket_path("payments", None);
/// let client = Client::connect(&path)?;
/// println!("primary pid {}", client.hello().pid);
/// for response in client.request(&Request::Status)? {
///     if let Response::Status { status } = response? {
///         println!("{status}");
///     }
/// }
/// # Ok::<(), corral::control::ClientError>(())
/// ```
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    hello: Hello,
}

/// Who answered: the primary's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The primary's control protocol version.
    pub protocol: u32,
    /// The cluster's name.
    pub name: String,
    /// The primary's pid.
    pub pid: u32,
}

/// Why talking to a cluster failed.
///
/// ```
/// use corral::control::{Client, ClientError};
///
/// let err = Client::connect(std::path::Path::new("/nonexistent/x.sock")).unwrap_err();
/// assert!(matches!(err, ClientError::NotRunning { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No primary listens there.
    #[error("no cluster is running at {}", path.display())]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// The socket or the primary turned this user away.
    #[error("{message}")]
    Refused {
        /// Why, for the user.
        message: String,
    },
    /// The other side does not speak this protocol.
    #[error("{0}")]
    Protocol(String),
    /// The primary closed the connection before the answer was complete.
    #[error("the cluster closed the control connection before answering (did the primary exit?)")]
    Closed,
    /// No answer in time.
    #[error("no answer from the cluster within {0:?}")]
    Timeout(Duration),
    /// Any other I/O error.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
}

impl Client {
    /// Connects and reads the hello.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    path: path.to_owned(),
                }
            }
            io::ErrorKind::PermissionDenied => ClientError::Refused {
                message: format!(
                    "permission denied on {}: the control socket is its owner's only; run corral as that user",
                    path.display()
                ),
            },
            _ => ClientError::Io(err),
        })?;
        let mut reader = BufReader::new(stream);
        let hello = match read_response(&mut reader, Some(HELLO_TIMEOUT))? {
            Some(Response::Hello {
                protocol,
                name,
                pid,
            }) => Hello {
                protocol,
                name,
                pid,
            },
            Some(Response::Error {
                kind: ErrorKind::Refused,
                message,
            }) => return Err(ClientError::Refused { message }),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "{} answered {other:?} instead of a hello; is it a corral control socket?",
                    path.display()
                )))
            }
            None => return Err(ClientError::Closed),
        };
        if hello.protocol != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "cluster `{}` speaks control protocol {}, this corral speaks {PROTOCOL_VERSION}; use the corral command of the same release",
                hello.name, hello.protocol
            )));
        }
        Ok(Client { reader, hello })
    }

    /// The primary's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Sends `request`; the answers follow, until the primary closes the connection.
    pub fn request(mut self, request: &Request) -> Result<Responses, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line)?;
        Ok(Responses {
            reader: self.reader,
            deadline: None,
        })
    }
}

/// The answers to one request. Iterating ends when the primary closes the
/// connection.
#[derive(Debug)]
pub struct Responses {
    reader: BufReader<UnixStream>,
    deadline: Option<(Instant, Duration)>,
}

impl Responses {
    /// Fails reading with [`ClientError::Timeout`] once `limit` has passed from now.
    ///
    /// ```no_run
    /// # use corral::control::{Client, Request};
    /// # let client = Client::connect(std::path::Path::new("/tmp/x.sock"))?;
    /// let mut answers = client.request(&Request::Reload)?;
    /// answers.deadline(std::time::Duration::from_secs(120));
    /// # Ok::<(), corral::control::ClientError>(())
    /// ```
    pub fn deadline(&mut self, limit: Duration) {
        self.deadline = Some((Instant::now() + limit, limit));
    }

    /// The next answer, or `None` once the primary closed the connection.
    pub fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        let timeout = match self.deadline {
            None => None,
            Some((deadline, limit)) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(ClientError::Timeout(limit)),
            },
        };
        read_response(&mut self.reader, timeout).map_err(|err| match (err, self.deadline) {
            (ClientError::Timeout(_), Some((_, limit))) => ClientError::Timeout(limit),
            (err, _) => err,
        })
    }
}

impl Iterator for Responses {
    type Item = Result<Response, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_response().transpose()
    }
}

fn read_response(
    reader: &mut BufReader<UnixStream>,
    timeout: Option<Duration>,
) -> Result<Option<Response>, ClientError> {
    reader.get_ref().set_read_timeout(timeout)?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ClientError::Timeout(timeout.unwrap_or_default()))
        }
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    if !line.ends_with('\n') {
        return Err(ClientError::Closed);
    }
    serde_json::from_str(line.trim_end())
        .map(Some)
        .map_err(|err| {
            ClientError::Protocol(format!(
                "an answer that is not control protocol ({err}): {}",
                line.trim_end()
            ))
        })
}
