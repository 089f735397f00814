//! Running the real, clustered `payments` binary in tests (through
//! `corral_testkit`: its own process group, killed with every worker when the
//! [`Cluster`] is dropped, even when a test fails half-way) and talking to it
//! on a chosen connection.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Debug builds of the binary start slowly on a loaded machine; this bounds
/// the wait for the `listening on` line, it is not an expected duration.
const START_LIMIT: Duration = Duration::from_secs(120);

// Not every test binary uses all of them.
#[allow(unused_imports)]
pub use corral_testkit::{group_members, process_alive, wait_until, Cluster};

/// `payments --listen 127.0.0.1:0 --workers 2 --data-dir DIR EXTRA...`,
/// returned once every worker is ready (the primary printed its line). The
/// whole process group dies with the returned [`Cluster`].
pub fn start(data_dir: &Path, extra: &[&str]) -> Cluster {
    start_on("127.0.0.1", data_dir, extra)
}

/// As [`start`], listening on `host` (another loopback address stands for
/// another machine) on a free port.
pub fn start_on(host: &str, data_dir: &Path, extra: &[&str]) -> Cluster {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
    command
        .args([
            "--listen",
            &format!("{host}:0"),
            "--workers",
            "2",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info");
    Cluster::start(command, START_LIMIT)
}

/// Reports `test` as skipped and why. Written to the process's stderr
/// itself, past the test harness's capture, so a skip is always seen.
pub fn report_skipped(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {test} ({reason})");
}

/// The value of the environment variable `var`, or `None` once `test` has
/// been reported skipped for its absence.
pub fn env_or_skip(test: &str, var: &str) -> Option<String> {
    let value = std::env::var(var).ok().filter(|v| !v.is_empty());
    if value.is_none() {
        report_skipped(test, &format!("{var} not set"));
    }
    value
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
    pub fn upgrade_to_websocket(self, path: &str) -> BufReader<TcpStream> {
        self.websocket(path).0
    }

    /// As [`upgrade_to_websocket`](Self::upgrade_to_websocket), also
    /// returning the `101` answer's headers.
    pub fn websocket(mut self, path: &str) -> (BufReader<TcpStream>, Vec<(String, String)>) {
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
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("handshake headers");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        (self.stream, headers)
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

pub mod nginx;

#[path = "../signing/mod.rs"]
mod signing;
// Not every test binary signs lines.
#[allow(unused_imports)]
pub use signing::{secret, sign, HEADER as CSV_HEADER};

/// A correctly signed settlement line.
pub fn signed_line(id: &str, merchant: &str, amount: u64, currency: &str) -> String {
    signing::line(id, merchant, &amount.to_string(), currency)
}

/// Reads one unfragmented server text frame (servers do not mask).
pub fn read_text_frame(stream: &mut BufReader<TcpStream>) -> String {
    try_read_text_frame(stream).expect("a text frame")
}

/// As [`read_text_frame`], with the read's error (e.g. the socket's read
/// timeout passing) returned.
pub fn try_read_text_frame(stream: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    assert_eq!(head[0], 0x81, "a final text frame");
    let length = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; length as usize];
    stream.read_exact(&mut payload)?;
    Ok(String::from_utf8(payload).expect("utf-8"))
}
