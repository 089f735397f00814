//! Starting real clusters of the `hello` example and talking to them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use corral_testkit::{
    first_listening_addr, group_members, listening_addr, process_alive, wait_child, wait_until,
    ChildGroup,
};

/// The built `hello` example.
pub fn hello_binary() -> PathBuf {
    example_binary("hello")
}

/// A built example (cargo builds examples before running tests; build it
/// here if it is missing, e.g. under a filtered build).
pub fn example_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("test executable path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory");
    let binary = profile_dir.join("examples").join(name);
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "corral", "--example", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the {name} example failed");
    }
    binary
}

/// A running cluster of an example, killed with its whole process group
/// when dropped; everything of [`corral_testkit::Cluster`] plus requests.
pub struct Cluster(corral_testkit::Cluster);

impl std::ops::Deref for Cluster {
    type Target = corral_testkit::Cluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Cluster {
    /// Starts `hello` with these arguments and waits for its
    /// `listening on http://...` line.
    pub fn start(args: &[&str]) -> Cluster {
        Self::start_example("hello", args)
    }

    /// Starts the named example and waits for its listening line.
    pub fn start_example(name: &str, args: &[&str]) -> Cluster {
        Self::start_program(&example_binary(name), args)
    }

    /// Starts a prepared command (e.g. with a resource limit) and waits for
    /// its listening line.
    pub fn start_command(command: Command) -> Cluster {
        Cluster(corral_testkit::Cluster::start(
            command,
            Duration::from_secs(30),
        ))
    }

    /// Starts a program and waits for its listening line.
    pub fn start_program(program: &Path, args: &[&str]) -> Cluster {
        Cluster(corral_testkit::Cluster::start(
            command(program, args),
            Duration::from_secs(30),
        ))
    }

    /// `GET path` on a new connection.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        get_once(self.addr, path)
    }

    /// The `(slot, pid)` a `GET /` was answered by.
    pub fn hello(&self) -> std::io::Result<(usize, i32)> {
        let (status, body) = self.get("/")?;
        parse_hello(status, &body)
    }
}

pub fn command(program: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args).env(
        "RUST_LOG",
        std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
    );
    command
}

/// Starts `hello` without waiting for it to listen; its process group is
/// killed when the returned [`ChildGroup`] is dropped.
pub fn spawn(args: &[&str]) -> (ChildGroup, Arc<Mutex<String>>) {
    spawn_example("hello", args)
}

/// Starts an example without waiting for it to listen.
pub fn spawn_example(name: &str, args: &[&str]) -> (ChildGroup, Arc<Mutex<String>>) {
    let (child, log) = corral_testkit::spawn(command(&example_binary(name), args));
    (ChildGroup(child), log)
}

/// One HTTP/1.1 request on its own connection.
pub fn get_once(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    request_on(stream, addr, path, b"")
}

/// A connection to `addr` from the loopback address `source` (all of
/// 127.0.0.0/8 is loopback on Linux), so each test client has its own IP.
pub fn connect_from(source: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// Sends `preamble` (e.g. a PROXY protocol header) then `GET path` on `stream`.
pub fn request_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    preamble: &[u8],
) -> std::io::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(preamble)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    parse_response(&response)
}

pub fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let bad = || std::io::Error::other(format!("malformed response: {response:?}"));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    let body = response.split("\r\n\r\n").nth(1).ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

pub fn parse_hello(status: u16, body: &str) -> std::io::Result<(usize, i32)> {
    // "hello from worker SLOT (pid PID)"
    let bad = || std::io::Error::other(format!("unexpected answer {status}: {body:?}"));
    if status != 200 {
        return Err(bad());
    }
    let rest = body.strip_prefix("hello from worker ").ok_or_else(bad)?;
    let (slot, rest) = rest.split_once(" (pid ").ok_or_else(bad)?;
    let pid = rest.strip_suffix(')').ok_or_else(bad)?;
    Ok((
        slot.parse().map_err(|_| bad())?,
        pid.parse().map_err(|_| bad())?,
    ))
}

/// An HTTP/1.1 client that keeps its connection open between requests, never
/// retries, and reconnects only when the server says `Connection: close`:
/// any reset or early close counts as a failed request.
pub struct KeepAliveClient {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    pub connections: u64,
}

impl KeepAliveClient {
    pub fn new(addr: SocketAddr) -> Self {
        KeepAliveClient {
            addr,
            stream: None,
            connections: 0,
        }
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.stream = Some(BufReader::new(stream));
            self.connections += 1;
        }
        let result = self.exchange(path);
        match &result {
            Ok((_, _, close)) if !*close => {}
            _ => self.stream = None,
        }
        result.map(|(status, body, _)| (status, body))
    }

    fn exchange(&mut self, path: &str) -> std::io::Result<(u16, String, bool)> {
        let addr = self.addr;
        let reader = self.stream.as_mut().expect("connected");
        write!(
            reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )?;
        let mut status_line = String::new();
        if reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the response",
            ));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection")
                    && value.eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
    }
}

/// Connections waiting in the accept queues of the listening sockets on
/// `port` (IPv4), from /proc/net/tcp: for a listening socket the "rx_queue"
/// column is its accept backlog.
pub fn accept_queue_len(port: u16) -> u64 {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    let port_hex = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
            if !local.ends_with(&port_hex) || *state != "0A" {
                return None;
            }
            let rx = queues.split(':').nth(1)?;
            u64::from_str_radix(rx, 16).ok()
        })
        .sum()
}

/// Lets this test process hold thousands of sockets (soft limit up to the hard one).
pub fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= 5000,
        "this test needs 5000 descriptors; raise the hard limit (ulimit -Hn) above {hard}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// `hello` with `args` and a descriptor limit of `limit` (soft and hard) for
/// the primary and its workers, as a small container would have.
pub fn start_with_fd_limit(limit: u64, args: &[&str]) -> Cluster {
    use std::os::unix::process::CommandExt;
    let mut command = command(&hello_binary(), args);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                .map_err(std::io::Error::from)
        });
    }
    Cluster::start_command(command)
}

/// How many descriptors a process has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}
