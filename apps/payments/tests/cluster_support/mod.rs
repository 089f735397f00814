//! Running the real, clustered `payments` binary in tests: start it in its own
//! process group, find its address, stop or kill it, and talk to it on a
//! chosen connection. Everything the binary starts dies with the group when a
//! [`Cluster`] is dropped, even when a test fails half-way.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Debug builds of the binary start slowly on a loaded machine; this bounds
/// the wait for the `listening on` line, it is not an expected duration.
const START_LIMIT: Duration = Duration::from_secs(120);

/// A running `payments` cluster (primary + workers, one process group).
pub struct Cluster {
    child: Child,
    pub addr: SocketAddr,
    /// The `listening on` line as printed.
    pub banner: String,
    stderr: Arc<Mutex<String>>,
    reaped: Option<ExitStatus>,
}

impl Cluster {
    /// `payments --listen 127.0.0.1:0 --workers 2 --data-dir DIR EXTRA...`,
    /// returned once every worker is ready (the primary printed its line).
    pub fn start(data_dir: &Path, extra: &[&str]) -> Cluster {
        let mut child = Command::new(env!("CARGO_BIN_EXE_payments"))
            .args(["--listen", "127.0.0.1:0", "--workers", "2", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so one signal to -pgid reaches every worker.
            .process_group(0)
            .spawn()
            .expect("start the payments binary");
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
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut cluster = Cluster {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            banner: String::new(),
            stderr,
            reaped: None,
        };
        let banner = rx.recv_timeout(START_LIMIT).unwrap_or_else(|_| {
            panic!(
                "payments printed no listening line; stderr:\n{}",
                cluster.stderr()
            )
        });
        cluster.addr = banner
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line: {banner:?}"));
        cluster.banner = banner;
        cluster
    }

    /// The primary's pid, which is also the process group id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://HOST:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// What the cluster logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The primary's live children (its workers).
    pub fn worker_pids(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Send `signal` to the primary only.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the primary");
    }

    /// Wait for the primary to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.reaped {
            return status;
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the primary") {
                self.reaped = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the primary did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the whole group (primary and every worker, at once), reap
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
        // (or a restart on the same data directory) starts from a clean slate.
        wait_until(Duration::from_secs(10), || {
            group_members(self.pid()).is_empty()
        });
    }
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

/// `(pid, state, ppid, pgrp)` of every process, from /proc.
fn processes() -> Vec<(i32, String, i32, i32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is parenthesised and may hold spaces; the fields
        // after it are: state, ppid, pgrp, ...
        let Some((_, after)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().take(3).collect();
        if let [state, ppid, pgrp] = f[..] {
            if let (Ok(ppid), Ok(pgrp)) = (ppid.parse(), pgrp.parse()) {
                out.push((pid, state.to_owned(), ppid, pgrp));
            }
        }
    }
    out
}

/// Live (not zombie) children of `parent`.
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, state, ppid, _)| *ppid == parent && state != "Z")
        .map(|(pid, ..)| pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Live (not zombie) processes of the process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, state, _, pgrp)| *pgrp == pgid && state != "Z")
        .map(|(pid, ..)| pid)
        .collect()
}

/// One HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One keep-alive HTTP/1.1 connection. reqwest pools connections out of
/// sight; the idempotency race needs to know which worker served each
/// request, so it asks `/health` and then races on that same connection.
pub struct Conn {
    stream: BufReader<TcpStream>,
    host: SocketAddr,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(stream),
            host: addr,
        })
    }

    /// Send one request and read its whole answer (Content-Length framed,
    /// which is what the service sends for every route used here).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;

        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the answer",
            ));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_owned(), value.trim().to_owned());
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                }
                headers.push((name, value));
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body)?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Upgrades this connection to a WebSocket on `path` and returns the raw
    /// stream, positioned after the `101` answer.
    pub fn upgrade_to_websocket(mut self, path: &str) -> BufReader<TcpStream> {
        let handshake = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.host
        );
        self.stream
            .get_mut()
            .write_all(handshake.as_bytes())
            .expect("send the handshake");
        let mut status = String::new();
        self.stream
            .read_line(&mut status)
            .expect("handshake answer");
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("handshake headers");
            if line.trim_end().is_empty() {
                break;
            }
        }
        self.stream
    }

    /// The worker slot serving this connection, from `/health`.
    pub fn slot(&mut self) -> u64 {
        let answer = self
            .request("GET", "/health", &[], b"")
            .expect("GET /health");
        assert_eq!(answer.status, 200);
        answer.json()["worker"].as_u64().expect("worker slot")
    }
}

/// The demo merchants' secrets (as in merchants.demo.toml), written out here
/// so the tests do not trust the crate's own copy.
pub fn secret(merchant: &str) -> &'static str {
    match merchant {
        "acme" => "acme-demo-secret-5f2b9c",
        "globex" => "globex-demo-secret-81d0e4",
        "initech" => "initech-demo-secret-c73a16",
        _ => "not-a-merchant",
    }
}

/// Lower-case hex HMAC-SHA256 of `id|merchant|amount|currency`, computed
/// here independently of the service's signing code.
pub fn sign(secret: &str, id: &str, merchant: &str, amount: &str, currency: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(format!("{id}|{merchant}|{amount}|{currency}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A correctly signed settlement line.
pub fn signed_line(id: &str, merchant: &str, amount: u64, currency: &str) -> String {
    let amount = amount.to_string();
    let sig = sign(secret(merchant), id, merchant, &amount, currency);
    format!("{id},{merchant},{amount},{currency},{sig}")
}

pub const CSV_HEADER: &str = "id,merchant_id,amount,currency,signature";

/// Reads one unfragmented server text frame (servers do not mask).
pub fn read_text_frame(stream: &mut BufReader<TcpStream>) -> String {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("frame head");
    assert_eq!(head[0], 0x81, "a final text frame");
    let length = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).expect("length");
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).expect("length");
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; length as usize];
    stream.read_exact(&mut payload).expect("payload");
    String::from_utf8(payload).expect("utf-8")
}
