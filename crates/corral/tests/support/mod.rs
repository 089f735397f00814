//! Starting real clusters of the `hello` example and talking to them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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

/// A running cluster, killed with its whole process group when dropped.
pub struct Cluster {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<Vec<String>>>,
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

    /// Starts a program and waits for its listening line.
    pub fn start_program(program: &std::path::Path, args: &[&str]) -> Cluster {
        let (mut child, stderr) = spawn_program(program, args);
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut first = None;
        let started = wait_until(Duration::from_secs(30), || {
            first = lines.lock().unwrap().first().cloned();
            first.is_some()
        });
        let line = first
            .filter(|_| started)
            .unwrap_or_else(|| panic!("no listening line; stderr:\n{}", stderr.lock().unwrap()));
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        Cluster {
            child,
            addr,
            stderr,
            stdout: lines,
        }
    }

    /// The lines the primary printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the primary");
    }

    /// What the cluster logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The primary's live child processes (its workers).
    pub fn worker_pids(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Waits for the primary to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_child(&mut self.child, limit).unwrap_or_else(|| {
            panic!(
                "the primary did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            )
        })
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

impl Drop for Cluster {
    fn drop(&mut self) {
        // The primary leads its own process group: this reaches every worker.
        let _ = kill(Pid::from_raw(-self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Starts `hello` without waiting for it to listen.
pub fn spawn(args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    spawn_example("hello", args)
}

/// Starts an example without waiting for it to listen.
pub fn spawn_example(name: &str, args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    spawn_program(&example_binary(name), args)
}

/// Starts a program without waiting for it to listen.
pub fn spawn_program(program: &std::path::Path, args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the hello example");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let pipe = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, stderr)
}

pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("poll the child") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
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

/// One process as /proc/PID/stat describes it.
struct ProcessEntry {
    pid: i32,
    zombie: bool,
    parent: i32,
    group: i32,
}

/// Every process on the machine.
fn processes() -> Vec<ProcessEntry> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised command name: state, ppid, pgrp, ...
            let (_, after) = stat.rsplit_once(") ")?;
            let mut fields = after.split_whitespace();
            let zombie = fields.next()? == "Z";
            let parent = fields.next()?.parse().ok()?;
            let group = fields.next()?.parse().ok()?;
            Some(ProcessEntry {
                pid,
                zombie,
                parent,
                group,
            })
        })
        .collect()
}

/// Live (not zombie) child processes of `parent`.
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut children: Vec<i32> = processes()
        .into_iter()
        .filter(|p| p.parent == parent && !p.zombie)
        .map(|p| p.pid)
        .collect();
    children.sort_unstable();
    children
}

pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat
        .rsplit_once(") ")
        .is_some_and(|(_, after)| after.starts_with('Z'))
}

/// Live (not zombie) processes in the process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.group == pgid && !p.zombie)
        .map(|p| p.pid)
        .collect()
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

/// A child process whose whole group is killed when dropped.
pub struct ChildGroup(pub Child);

impl Drop for ChildGroup {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Reads the child's stdout up to its first `listening on http://` line
/// (at most 30 s).
pub fn first_listening_addr(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("listening on http://"));
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("a listening line within 30 s");
    line.split("listening on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .expect("an address in the listening line")
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
