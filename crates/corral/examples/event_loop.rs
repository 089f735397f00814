//! One event loop stays responsive while CPU-heavy requests saturate every
//! core, because the heavy work runs on the [`corral::pool::Pool`].
//!
//! A tokio current_thread loop serves `GET /health` and `GET /heavy`
//! (HMAC-SHA256 over thousands of records). A built-in client on another
//! thread keeps enough heavy requests in flight to saturate all cores while
//! a prober times `/health`. The last stdout line is the result as JSON.
//!
//! ```text
//! cargo run --release --example event_loop -- --mode pool --seconds 5
//! cargo run --release --example event_loop -- --mode blocking
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use corral::metrics::EventLoopDelay;
use corral::pool::{default_threads, Pool, PoolError};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    /// Heavy work runs on the CPU pool.
    Pool,
    /// Heavy work runs inline on the event loop.
    Blocking,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value = "pool")]
    mode: Mode,
    /// How long the load runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Records signed per heavy request.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Nice value of the pool threads (0: same priority as the event loop).
    #[arg(long, default_value_t = 10)]
    nice: i32,
}

/// Signs `records` payment records with HMAC-SHA256 and folds the MACs;
/// `bench/peers/piscina/worker.js` does exactly the same work.
fn sign_records(records: usize) -> String {
    type HmacSha256 = Hmac<Sha256>;
    let mut fold = [0u8; 32];
    let mut record = String::with_capacity(64);
    for i in 0..records {
        use std::fmt::Write;
        record.clear();
        let _ = write!(
            record,
            "record-{i:08}|amount={}|currency=EUR",
            i * 7 % 100_000
        );
        let mut mac = HmacSha256::new_from_slice(b"corral-bench-key").expect("any key length");
        mac.update(record.as_bytes());
        for (f, b) in fold.iter_mut().zip(mac.finalize().into_bytes()) {
            *f ^= b;
        }
    }
    fold.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct App {
    pool: Option<Pool>,
    records: usize,
}

async fn heavy(State(app): State<App>) -> Result<String, PoolError> {
    let records = app.records;
    match &app.pool {
        // try_run: a full queue answers 503 + Retry-After instead of piling up.
        Some(pool) => pool.try_run(move || sign_records(records)).await,
        None => Ok(sign_records(records)),
    }
}

struct Load {
    health_us: Histogram<u64>,
    heavy_done: u64,
    elapsed: Duration,
}

/// Drives the server from its own thread and runtime, so the client never
/// competes with the server's event loop for its thread.
fn load(addr: SocketAddr, heavy_in_flight: usize, seconds: u64) -> std::io::Result<Load> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let get = move |path: &'static str| {
            let client = client.clone();
            let uri = format!("http://{addr}{path}");
            async move {
                let response = client.get(uri.parse().expect("valid uri")).await.ok()?;
                let ok = response.status().is_success();
                response.into_body().collect().await.ok()?;
                ok.then_some(())
            }
        };
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let heavy: Vec<_> = (0..heavy_in_flight)
            .map(|_| {
                let get = get.clone();
                tokio::spawn(async move {
                    let mut done = 0u64;
                    while Instant::now() < end {
                        if get("/heavy").await.is_some() {
                            done += 1;
                        }
                    }
                    done
                })
            })
            .collect();
        // Let the heavy load saturate the cores before probing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut health_us = corral_histogram();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while Instant::now() < end {
            tick.tick().await;
            let sent = Instant::now();
            if get("/health").await.is_some() {
                health_us.saturating_record(sent.elapsed().as_micros() as u64);
            }
        }
        let mut heavy_done = 0;
        for task in heavy {
            heavy_done += task.await.unwrap_or(0);
        }
        Ok(Load {
            health_us,
            heavy_done,
            elapsed: start.elapsed(),
        })
    })
}

fn corral_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let threads = default_threads(None);
    let pool = match args.mode {
        Mode::Pool => Some(Pool::builder().threads(threads).nice(args.nice).build()?),
        Mode::Blocking => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (load, loop_delay, stats) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/heavy", get(heavy))
            .with_state(App {
                pool: pool.clone(),
                records: args.records,
            });
        let delay = EventLoopDelay::start();
        let options = corral::net::ServeOptions::default();
        let server = tokio::spawn(corral::net::serve(
            listener,
            app,
            options,
            std::future::pending(),
        ));
        // Twice as many heavy requests as cores keeps every core busy.
        let in_flight = 2 * threads.max(2);
        let seconds = args.seconds;
        let load = tokio::task::spawn_blocking(move || load(addr, in_flight, seconds)).await??;
        server.abort();
        Ok::<_, Box<dyn std::error::Error>>((load, delay.snapshot(), pool.map(|p| p.stats())))
    })?;
    eprintln!("event loop delay: {loop_delay:?}");
    if let Some(stats) = stats {
        eprintln!("pool: {stats:?}");
    }
    let h = &load.health_us;
    let ms = |us: u64| us as f64 / 1000.0;
    let mode = match args.mode {
        Mode::Pool => "pool",
        Mode::Blocking => "blocking",
    };
    println!(
        "{{\"mode\": \"{mode}\", \"health_p50_ms\": {:.2}, \"health_p99_ms\": {:.2}, \"health_max_ms\": {:.2}, \"heavy_per_s\": {:.1}}}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        load.heavy_done as f64 / load.elapsed.as_secs_f64()
    );
    Ok(())
}
