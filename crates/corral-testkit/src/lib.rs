//! Running real clusters in tests: a program started in its own process group
//! (so one signal reaches the primary and every worker, and nothing outlives
//! the test), its log collected, its `listening on http://...` line awaited,
//! and the processes it leaves looked up in /proc.

pub mod openmetrics;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running cluster that printed its listening line. Dropping it kills the
/// whole process group and waits until no member is left.
pub struct Cluster {
    child: Child,
    /// The first listening address.
    pub addr: SocketAddr,
    /// The primary's first listening line.
    pub banner: String,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<Vec<String>>>,
    reaped: Option<ExitStatus>,
}

impl Cluster {
    /// Starts `command` (in its own process group, output captured) and
    /// waits at most `limit` for a stdout line naming
    /// `listening on http://HOST:PORT`. Workers' own output reaches stdout
    /// through the primary, so that line need not be the first.
    pub fn start(command: Command, limit: Duration) -> Cluster {
        let (mut child, stderr) = spawn(command);
        let stdout = collect_lines(child.stdout.take().expect("piped stdout"));
        let mut first = None;
        let started = wait_until(limit, || {
            first = stdout
                .lock()
                .unwrap()
                .iter()
                .find(|line| listening_addr(line).is_some())
                .cloned();
            first.is_some()
        });
        let mut cluster = Cluster {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            banner: String::new(),
            stderr,
            stdout,
            reaped: None,
        };
        let banner = first
            .filter(|_| started)
            .unwrap_or_else(|| panic!("no listening line; stderr:\n{}", cluster.stderr()));
        cluster.addr = listening_addr(&banner).expect("a line chosen for its address");
        cluster.banner = banner;
        cluster
    }

    /// The admin address the primary logged when started with
    /// `--admin HOST:0` (waits up to 30 s for the line).
    pub fn admin_addr(&self) -> SocketAddr {
        let mut found = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                found = self.stderr().lines().find_map(|line| {
                    let rest = line.split("admin: http://").nth(1)?;
                    rest.split('/').next()?.parse().ok()
                });
                found.is_some()
            }),
            "no admin address logged:\n{}",
            self.stderr()
        );
        found.expect("found above")
    }

    /// The primary's pid, which is also the process group id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://HOST:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends `signal` to the primary only.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the primary");
    }

    /// What the cluster logged on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The lines the primary printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The primary's live children (its workers).
    pub fn worker_pids(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Waits at most `limit` for the primary to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.reaped {
            return status;
        }
        let status = wait_child(&mut self.child, limit).unwrap_or_else(|| {
            panic!(
                "the primary did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            )
        });
        self.reaped = Some(status);
        status
    }

    /// `kill -9` the whole group (primary and every worker at once), reap
    /// the primary and wait until no process of the group is left.
    pub fn kill_all(&mut self) {
        let _ = kill(Pid::from_raw(-self.pid()), Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(30));
        assert!(
            wait_until(Duration::from_secs(30), || group_members(self.pid())
                .is_empty()),
            "processes left in group {}: {:?}",
            self.pid(),
            group_members(self.pid())
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.pid()), Signal::SIGKILL);
        if self.reaped.is_none() {
            let _ = self.child.wait();
        }
        // Orphaned workers are reaped by init; wait for them so the next test
        // starts from a clean slate.
        wait_until(Duration::from_secs(10), || {
            group_members(self.pid()).is_empty()
        });
    }
}

/// Starts `command` in its own process group with stdin closed, stdout piped
/// (left to the caller) and stderr collected into the returned log.
pub fn spawn(mut command: Command) -> (Child, Arc<Mutex<String>>) {
    isolate_control_sockets(&mut command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the program under test");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let pipe = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, log)
}

/// Gives the program a runtime directory of its own (unless the test chose
/// one), so clusters of one program started by tests running in parallel
/// do not meet on one control socket name.
fn isolate_control_sockets(command: &mut Command) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let chosen = command.get_envs().any(|(key, _)| key == "XDG_RUNTIME_DIR");
    if chosen {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "corral-test-run-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    if std::fs::create_dir_all(&dir).is_ok() {
        command.env("XDG_RUNTIME_DIR", dir);
    }
}

/// A child whose whole process group is killed when dropped.
pub struct ChildGroup(pub Child);

impl Drop for ChildGroup {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Collects a pipe's lines as they arrive.
fn collect_lines(pipe: ChildStdout) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// The address in a `... listening on http://HOST:PORT ...` line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.split("listening on http://")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reads the child's stdout up to its first listening line (at most 30 s).
pub fn first_listening_addr(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| listening_addr(&line));
        let _ = tx.send(addr);
    });
    rx.recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("a listening line within 30 s")
}

/// Waits at most `limit` for `child` to exit.
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

/// One process as /proc/PID/stat describes it.
struct ProcessEntry {
    pid: i32,
    zombie: bool,
    parent: i32,
    group: i32,
}

/// Every process on the machine.
fn processes() -> Vec<ProcessEntry> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|process| entry(process.stat().ok()?))
        .collect()
}

/// One process, if it exists.
fn process(pid: i32) -> Option<ProcessEntry> {
    entry(procfs::process::Process::new(pid).ok()?.stat().ok()?)
}

fn entry(stat: procfs::process::Stat) -> Option<ProcessEntry> {
    Some(ProcessEntry {
        pid: stat.pid,
        zombie: stat.state == 'Z',
        parent: stat.ppid,
        group: stat.pgrp,
    })
}

/// Live (not zombie) children of `parent`, sorted.
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut children: Vec<i32> = processes()
        .into_iter()
        .filter(|p| p.parent == parent && !p.zombie)
        .map(|p| p.pid)
        .collect();
    children.sort_unstable();
    children
}

/// Live (not zombie) processes in the process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.group == pgid && !p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// Whether `pid` is alive (a zombie counts as dead).
pub fn process_alive(pid: i32) -> bool {
    process(pid).is_some_and(|p| !p.zombie)
}

/// A free loopback port for a server a test must start, or start again, on
/// a port it names itself. It lies below the kernel's ephemeral range, so
/// neither another test's `bind(0)` nor the source port of its outgoing
/// connections can take it while the server is down (a port from `bind(0)`
/// can be taken in between, which made restarts on it flaky).
pub fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = ephemeral_start.saturating_sub(12_000).max(1024);
    for _ in 0..1000 {
        let port = rand::random_range(low..ephemeral_start);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{ephemeral_start}");
}
