//! Load for `bench/chaos.sh` and `bench/kill_loss.sh`: threads that keep new
//! and keep-alive connections going against one address for a fixed time,
//! each request with a 3 s timeout, and count every failure by kind. Prints
//! one JSON line.
//!
//! Usage: chaos_load HOST:PORT SECONDS THREADS [--sources N] [--proxy-protocol] [--retry-stale] [--mark FILE]
//!
//! - `--sources N`: thread `i` connects from 127.0.0.(2 + i % N), so that
//!   sticky balancing, which hashes the client address, spreads the threads
//!   over the workers.
//! - `--proxy-protocol`: each connection starts with a PROXY v1 header naming
//!   a client address of its own thread (192.0.2.(1 + i)).
//! - `--retry-stale`: a request on a kept-alive connection that fails before
//!   a byte of the response (the server closed the idle connection) is
//!   retried once on a new connection, as HTTP clients do; counted once.
//! - `--mark FILE`: FILE holds a Unix time in milliseconds, written while the
//!   load runs (just before a `kill -9`); the outcomes are then counted
//!   separately for requests started before and after it, and the failures
//!   are listed with their start time relative to the mark.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TIMEOUT: Duration = Duration::from_secs(3);

/// How thread `i` connects.
#[derive(Clone, Copy)]
struct Client {
    addr: SocketAddr,
    keep_alive: bool,
    source: Option<Ipv4Addr>,
    proxy_from: Option<Ipv4Addr>,
    retry_stale: bool,
}

/// One request's start (Unix ms) and outcome.
type Outcome = (u64, &'static str);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: chaos_load HOST:PORT SECONDS THREADS [--sources N] [--proxy-protocol] [--retry-stale] [--mark FILE]"
        );
        std::process::exit(2)
    };
    let (Some(addr), Some(secs), Some(threads)) = (
        args.first().and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(1).and_then(|a| a.parse::<u64>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        usage()
    };
    let (mut sources, mut proxy, mut mark, mut retry_stale) = (None, false, None, false);
    let mut rest = args.iter().skip(3);
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--sources" => {
                sources = Some(
                    rest.next()
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| (1..=250).contains(n))
                        .unwrap_or_else(|| usage()),
                )
            }
            "--proxy-protocol" => proxy = true,
            "--retry-stale" => retry_stale = true,
            "--mark" => mark = Some(rest.next().unwrap_or_else(|| usage()).clone()),
            _ => usage(),
        }
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let outcomes = outcomes.clone();
            let client = Client {
                addr,
                keep_alive: n % 2 == 1,
                source: sources.map(|count| Ipv4Addr::new(127, 0, 0, 2 + (n % count) as u8)),
                proxy_from: proxy.then(|| Ipv4Addr::new(192, 0, 2, 1 + (n % 250) as u8)),
                retry_stale,
            };
            std::thread::spawn(move || {
                let mine = run(client, end);
                outcomes.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let outcomes = outcomes.lock().unwrap();
    let Some(mark) = mark else {
        println!("{{{}}}", fields(&tally(outcomes.iter())));
        return;
    };
    let mark: u64 = match std::fs::read_to_string(&mark) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("chaos_load: --mark {mark}: {text:?} is not a Unix time in milliseconds");
            std::process::exit(2)
        }),
        Err(err) => {
            eprintln!("chaos_load: --mark {mark}: cannot read it ({err}); write the time before the load ends");
            std::process::exit(2)
        }
    };
    let before = tally(outcomes.iter().filter(|(start, _)| *start < mark));
    let after = tally(outcomes.iter().filter(|(start, _)| *start >= mark));
    let mut failures: Vec<String> = outcomes
        .iter()
        .filter(|(_, outcome)| *outcome != "ok")
        .map(|(start, outcome)| format!("[{}, \"{outcome}\"]", *start as i64 - mark as i64))
        .collect();
    failures.sort();
    println!(
        "{{\"before\": {{{}}}, \"after\": {{{}}}, \"failures_ms_from_mark\": [{}]}}",
        fields(&before),
        fields(&after),
        failures.join(", ")
    );
}

fn tally<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> BTreeMap<&'static str, u64> {
    let mut tally = BTreeMap::new();
    for (_, outcome) in outcomes {
        *tally.entry(*outcome).or_default() += 1;
    }
    tally
}

fn fields(tally: &BTreeMap<&'static str, u64>) -> String {
    let fields: Vec<String> = tally.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    fields.join(", ")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn run(client: Client, end: Instant) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut connection: Option<BufReader<TcpStream>> = None;
    while Instant::now() < end {
        let start = unix_ms();
        outcomes.push((start, request(client, &mut connection)));
    }
    outcomes
}

fn connect(client: Client) -> std::io::Result<TcpStream> {
    let Some(source) = client.source else {
        return TcpStream::connect_timeout(&client.addr, TIMEOUT);
    };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&client.addr.into(), TIMEOUT)?;
    Ok(socket.into())
}

/// One request; the outcome's name (`ok` or the kind of failure).
fn request(client: Client, connection: &mut Option<BufReader<TcpStream>>) -> &'static str {
    let reused = connection.is_some();
    let outcome = attempt(client, connection);
    // A kept-alive connection the server closed while it was idle fails
    // before a byte of the response; HTTP clients retry such an idempotent
    // request once on a new connection (RFC 9110, 9.2.2), and so does this.
    if client.retry_stale
        && reused
        && matches!(outcome, "stale_closed" | "stale_reset" | "stale_write")
    {
        return attempt(client, connection);
    }
    match outcome {
        "stale_closed" => "closed_early",
        "stale_reset" => "reset",
        "stale_write" => "write_error",
        other => other,
    }
}

/// One try; `stale_*` when the connection failed before any response byte.
fn attempt(client: Client, connection: &mut Option<BufReader<TcpStream>>) -> &'static str {
    let (addr, keep_alive) = (client.addr, client.keep_alive);
    if connection.is_none() {
        let mut stream = match connect(client) {
            Ok(stream) => stream,
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => return "connect_refused",
            Err(err) if err.kind() == ErrorKind::TimedOut => return "connect_timeout",
            Err(_) => return "connect_error",
        };
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        let _ = stream.set_nodelay(true);
        if let Some(from) = client.proxy_from {
            let port = stream.local_addr().map(|a| a.port()).unwrap_or(1);
            let header = format!("PROXY TCP4 {from} {} {port} {}\r\n", addr.ip(), addr.port());
            if stream.write_all(header.as_bytes()).is_err() {
                return "write_error";
            }
        }
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
        return "stale_write";
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
    match reader.read_line(&mut line) {
        Ok(0) => return Err("stale_closed"),
        Err(err) if err.kind() == ErrorKind::ConnectionReset && line.is_empty() => {
            return Err("stale_reset")
        }
        Err(err) => return Err(classify(err)),
        Ok(_) => {}
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
