//! Load for `bench/chaos.sh`: threads that keep new and keep-alive
//! connections going against one address for a fixed time, each request with
//! a 3 s timeout, and count every failure by kind. Prints one JSON line.
//!
//! Usage: chaos_load HOST:PORT SECONDS THREADS

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: chaos_load HOST:PORT SECONDS THREADS");
        std::process::exit(2)
    };
    let (Some(addr), Some(secs), Some(threads)) = (
        args.first().and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(1).and_then(|a| a.parse::<u64>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        usage()
    };
    let end = Instant::now() + Duration::from_secs(secs);
    let tally: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let tally = tally.clone();
            std::thread::spawn(move || run(addr, end, n % 2 == 1, &tally))
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let tally = tally.lock().unwrap();
    let fields: Vec<String> = tally.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    println!("{{{}}}", fields.join(", "));
}

fn run(
    addr: SocketAddr,
    end: Instant,
    keep_alive: bool,
    tally: &Mutex<BTreeMap<&'static str, u64>>,
) {
    let mut connection: Option<BufReader<TcpStream>> = None;
    while Instant::now() < end {
        let outcome = request(addr, keep_alive, &mut connection);
        *tally.lock().unwrap().entry(outcome).or_default() += 1;
    }
}

/// One request; the outcome's name (`ok` or the kind of failure).
fn request(
    addr: SocketAddr,
    keep_alive: bool,
    connection: &mut Option<BufReader<TcpStream>>,
) -> &'static str {
    if connection.is_none() {
        let stream = match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(stream) => stream,
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => return "connect_refused",
            Err(err) if err.kind() == ErrorKind::TimedOut => return "connect_timeout",
            Err(_) => return "connect_error",
        };
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        let _ = stream.set_nodelay(true);
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection.as_mut().expect("connected");
    let header = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    if write!(
        reader.get_mut(),
        "GET / HTTP/1.1\r\nHost: {addr}\r\n{header}\r\n"
    )
    .is_err()
    {
        *connection = None;
        return "write_error";
    }
    let result = read_response(reader);
    match result {
        Ok(close) => {
            if close || !keep_alive {
                *connection = None;
            }
            "ok"
        }
        Err(kind) => {
            *connection = None;
            kind
        }
    }
}

/// Reads one response; whether the server asked to close.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<bool, &'static str> {
    let classify = |err: std::io::Error| match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
        ErrorKind::ConnectionReset => "reset",
        _ => "read_error",
    };
    let mut line = String::new();
    if reader.read_line(&mut line).map_err(classify)? == 0 {
        return Err("closed_early");
    }
    if line.split_whitespace().nth(1) != Some("200") {
        return Err("bad_status");
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(classify)? == 0 {
            return Err("closed_early");
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let mut body = vec![0; length];
    std::io::Read::read_exact(reader, &mut body).map_err(classify)?;
    Ok(close)
}
