//! How long a killed worker takes to be replaced and serving: kill -9 the only
//! worker of a `hello` cluster, then time a request sent right after the kill
//! until it is answered by the new pid (with `reuseport` the request waits in
//! the slot's queue for the replacement). Prints the median of many.
//!
//! Usage: respawn_time PATH_TO_HELLO [ROUNDS]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn main() {
    let mut args = std::env::args().skip(1);
    let hello = args
        .next()
        .expect("usage: respawn_time PATH_TO_HELLO [ROUNDS]");
    let rounds: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(50);
    let mut primary = Command::new(hello)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--min-uptime",
            "1ms",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hello");
    let mut stdout = BufReader::new(primary.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("listening line");
    let addr: SocketAddr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("address in the listening line");

    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let victim = pid_of(addr);
        let start = Instant::now();
        kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill the worker");
        loop {
            let pid = pid_of(addr);
            if pid != victim {
                break;
            }
        }
        samples.push(start.elapsed());
        // Let the slot count as stable so back-off does not grow between rounds.
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(primary.id() as i32), Signal::SIGTERM);
    let _ = primary.wait();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "respawn: rounds={rounds} median_ms={:.1} p90_ms={:.1} max_ms={:.1}",
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(samples[samples.len() - 1])
    );
}

/// The pid named in the answer to `GET /`, retrying until one arrives.
fn pid_of(addr: SocketAddr) -> i32 {
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr) {
            let _ = write!(
                stream,
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut response = String::new();
            if stream.read_to_string(&mut response).is_ok() {
                if let Some(pid) = response
                    .split("(pid ")
                    .nth(1)
                    .and_then(|rest| rest.split(')').next())
                    .and_then(|pid| pid.parse().ok())
                {
                    return pid;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
