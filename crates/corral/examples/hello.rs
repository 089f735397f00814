//! The smallest clustered HTTP service: every worker answers with its slot and
//! pid, plus routes that burn CPU or block the event loop, for benchmarks and
//! for showing the supervisor at work.
//!
//! ```text
//! cargo run --release -p corral --example hello -- --listen 127.0.0.1:8080 --workers max
//! curl http://127.0.0.1:8080/          # hello from worker 1 (pid 4242)
//! curl 'http://127.0.0.1:8080/work?us=200'
//! curl 'http://127.0.0.1:8080/block?ms=8000'   # the primary replaces the hung worker
//! curl 'http://127.0.0.1:8080/notify?text=hi'  # the primary prints: worker 0 says "hi"
//! curl --data-binary @file http://127.0.0.1:8080/echo   # received N bytes
//! kill -HUP <primary pid>              # rolling reload, no failed request
//! ```
//!
//! With `--admin 127.0.0.1:9090`, `curl 127.0.0.1:9090/metrics` shows the
//! application's own `hello_greetings_total` next to corral's figures, one
//! series per slot.

use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use corral::metrics::prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "corral's hello-world cluster")]
struct Cli {
    #[command(flatten)]
    cluster: corral::ClusterArgs,

    /// Misbehave on purpose, to watch the supervisor handle it.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Fault {
    /// Every worker exits with status 1 as soon as it starts (a crash loop).
    CrashOnStart,
    /// Only slot 1's workers exit at start: slot 1 is given up on, the
    /// others keep serving all the traffic.
    #[value(name = "crash-slot-1")]
    CrashSlot1,
    /// Workers never start serving (the ready timeout catches them).
    NeverReady,
    /// The first worker of slot 0 writes garbage on its IPC channel once ready.
    IpcGarbage,
}

#[derive(Deserialize)]
struct WorkParams {
    us: Option<u64>,
}

#[derive(Deserialize)]
struct BlockParams {
    ms: Option<u64>,
}

fn main() -> corral::Result<()> {
    let cli = Cli::parse();
    let fault = cli.fault;
    cli.cluster
        .builder()
        .on_message(|slot, message| match message.decode::<String>() {
            // Long texts are cut so a flood of big messages stays readable.
            Ok(text) if text.len() > 80 => {
                let cut: String = text.chars().take(60).collect();
                println!(
                    "hello: worker {slot} says {cut:?}... ({} bytes)",
                    text.len()
                )
            }
            Ok(text) => println!("hello: worker {slot} says {text:?}"),
            Err(err) => eprintln!("hello: unreadable message from worker {slot}: {err}"),
        })
        .run(move |worker| async move {
            match fault {
                Some(Fault::CrashOnStart) => {
                    eprintln!("hello: crashing at start, as asked by --fault crash-on-start");
                    std::process::exit(1);
                }
                Some(Fault::CrashSlot1) if worker.slot() == 1 => {
                    eprintln!("hello: slot 1 crashing at start, as asked by --fault crash-slot-1");
                    std::process::exit(1);
                }
                Some(Fault::NeverReady) => std::future::pending::<()>().await,
                _ => {}
            }
            let greeting = format!(
                "hello from worker {} (pid {})",
                worker.slot(),
                std::process::id()
            );
            let greetings = Counter::<u64>::default();
            worker.register_metrics(|registry| {
                registry.register(
                    "hello_greetings",
                    "Requests answered on /",
                    greetings.clone(),
                )
            });
            let app = Router::new()
                .route(
                    "/",
                    get(move || async move {
                        greetings.inc();
                        greeting
                    }),
                )
                .route("/work", get(work))
                .route("/block", get(block))
                .route("/notify", get(notify).with_state(worker.clone()))
                .route("/echo", post(echo));
            if let Some(ms) = baked_fault() {
                // Counted from about when it becomes ready (serve starts at once).
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    eprintln!(
                        "hello: this build dies {ms} ms after becoming ready (baked-in fault)"
                    );
                    std::process::exit(1);
                });
            }
            if matches!(fault, Some(Fault::IpcGarbage))
                && worker.slot() == 0
                && worker.generation() == 0
            {
                // Ready first (the listener's first call tells the primary), then garbage.
                drop(worker.listener());
                write_ipc_garbage();
            }
            worker.serve(app).await
        })
}

/// Marks a "bad build": a copy of this binary with this line appended
/// (`CORRAL-FAULT die-after-ready-ms=1500`) dies that long after becoming
/// ready. Tests deploy it the way an operator deploys a build, by putting a
/// file at the program's path, then watch the reload gate and rollback.
const BAKED_FAULT: &str = "CORRAL-FAULT die-after-ready-ms=";

fn baked_fault() -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open("/proc/self/exe").ok()?;
    file.seek(SeekFrom::End(-64)).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let at = tail.rfind(BAKED_FAULT)? + BAKED_FAULT.len();
    tail[at..].trim().parse().ok()
}

/// Burns about `us` microseconds of CPU on the event loop.
async fn work(Query(params): Query<WorkParams>) -> String {
    let budget = Duration::from_micros(params.us.unwrap_or(0).min(10_000_000));
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rounds: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        rounds += 1;
    }
    format!(
        "worked {} us ({rounds} rounds, {x:x})\n",
        start.elapsed().as_micros()
    )
}

#[derive(Deserialize)]
struct NotifyParams {
    text: String,
}

/// Sends `text` to the primary, which prints it.
async fn notify(
    axum::extract::State(worker): axum::extract::State<corral::Worker>,
    Query(params): Query<NotifyParams>,
) -> String {
    match worker.send(&params.text) {
        Ok(()) => "sent\n".to_owned(),
        Err(err) => format!("not sent: {err}\n"),
    }
}

/// Reads the whole request body and says how long it was (for tests of
/// slow uploads).
async fn echo(body: axum::body::Bytes) -> String {
    format!("received {} bytes\n", body.len())
}

/// Blocks the whole event loop, as a careless synchronous call would.
async fn block(Query(params): Query<BlockParams>) -> String {
    let ms = params.ms.unwrap_or(1000).min(600_000);
    std::thread::sleep(Duration::from_millis(ms));
    format!("blocked the event loop for {ms} ms\n")
}

/// Writes bytes that are not a valid frame straight onto the worker's IPC
/// socket (descriptor 3), bypassing corral, as a buggy native library might.
fn write_ipc_garbage() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: descriptor 3 is the worker's IPC socket, owned by corral for the
    // life of the process; ManuallyDrop keeps us from closing it.
    let mut socket = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(3) });
    let _ = socket.write_all(b"\xff\xff\xff\xffthis is not a frame");
}
