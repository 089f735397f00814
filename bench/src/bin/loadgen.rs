//! A small HTTP/1.1 load generator whose connections come from many loopback
//! addresses (127.0.0.2, 127.0.0.3, ...), which wrk cannot do: sticky
//! balancing hashes the client address, so a one-address load would put every
//! connection on one worker and measure nothing about the balancer.
//!
//! Usage: loadgen ADDR SECONDS CONNECTIONS SOURCES keep-alive|new-connection [PATH]
//! Prints: `requests_per_s=N p50_ms=N p99_ms=N errors=N`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Run {
    addr: SocketAddr,
    path: String,
    keep_alive: bool,
    stop: AtomicBool,
    errors: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!(
            "usage: loadgen ADDR SECONDS CONNECTIONS SOURCES keep-alive|new-connection [PATH]"
        );
        std::process::exit(2);
    }
    let parse = |i: usize, what: &str| -> u64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("loadgen: {what} must be a number, not {:?}", args[i]);
            std::process::exit(2)
        })
    };
    let addr: SocketAddr = args[0].parse().unwrap_or_else(|_| {
        eprintln!("loadgen: {:?} is not HOST:PORT", args[0]);
        std::process::exit(2)
    });
    let (seconds, connections, sources) = (
        parse(1, "SECONDS"),
        parse(2, "CONNECTIONS"),
        parse(3, "SOURCES").clamp(1, 250),
    );
    let run = Arc::new(Run {
        addr,
        path: args.get(5).cloned().unwrap_or_else(|| "/".to_owned()),
        keep_alive: args[4] == "keep-alive",
        stop: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        latencies: Mutex::new(Histogram::new(3).expect("histogram")),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let total: u64 = runtime.block_on(async {
        let clients: Vec<_> = (0..connections)
            .map(|n| {
                let source = Ipv4Addr::new(127, 0, 0, 2 + (n % sources) as u8);
                tokio::spawn(client(run.clone(), source))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        run.stop.store(true, Ordering::SeqCst);
        let mut total = 0;
        for client in clients {
            total += client.await.unwrap_or(0);
        }
        total
    });
    let elapsed = started.elapsed().as_secs_f64();
    let latencies = run.latencies.lock().expect("histogram lock");
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "requests_per_s={:.0} p50_ms={:.2} p99_ms={:.2} errors={}",
        total as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        run.errors.load(Ordering::SeqCst)
    );
}

/// One connection's loop; returns how many requests it completed.
async fn client(run: Arc<Run>, source: Ipv4Addr) -> u64 {
    let mut done = 0;
    let mut local = Histogram::<u64>::new(3).expect("histogram");
    let mut stream: Option<BufReader<TcpStream>> = None;
    while !run.stop.load(Ordering::Relaxed) {
        if stream.is_none() {
            match connect(source, run.addr).await {
                Ok(s) => stream = Some(BufReader::new(s)),
                Err(_) => {
                    run.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let start = Instant::now();
        let Some(conn) = stream.as_mut() else {
            continue;
        };
        match exchange(conn, &run).await {
            Ok(close) => {
                done += 1;
                let _ = local.record(start.elapsed().as_micros() as u64);
                if close || !run.keep_alive {
                    stream = None;
                }
            }
            Err(_) => {
                run.errors.fetch_add(1, Ordering::Relaxed);
                stream = None;
            }
        }
    }
    if let Ok(mut all) = run.latencies.lock() {
        let _ = all.add(&local);
    }
    done
}

async fn connect(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends one request and reads its answer; true if the server closes after it.
async fn exchange(conn: &mut BufReader<TcpStream>, run: &Run) -> std::io::Result<bool> {
    let connection = if run.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\n\r\n",
        run.path, run.addr
    );
    conn.get_mut().write_all(request.as_bytes()).await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 || !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("bad or missing answer"));
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await?;
    Ok(close)
}
