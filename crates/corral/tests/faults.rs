//! The bad days, on real clusters of the `hello` example: a bad deploy, a
//! crash storm, spawn errors under fd pressure, a dead primary, signals
//! nobody expected, scaling under load and a message flood. Each test first
//! proves its scenario really happened (the worker was killed, the
//! descriptors ran out), then what the supervisor made of it.

mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use support::Cluster;

/// A private copy of `hello` at a path the test owns, as a deployed service.
struct Deployment {
    dir: PathBuf,
    program: PathBuf,
}

impl Deployment {
    fn new(tag: &str) -> Deployment {
        let dir = std::env::temp_dir().join(format!("corral-faults-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("service");
        std::fs::copy(support::hello_binary(), &program).unwrap();
        Deployment { dir, program }
    }

    /// Puts a build that dies `ms` after becoming ready at the program's
    /// path, renamed over it as a deploy does.
    fn deploy_bad_build(&self, ms: u64) {
        let staged = self.dir.join("service.new");
        std::fs::copy(support::hello_binary(), &staged).unwrap();
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&staged)
            .unwrap();
        write!(file, "\nCORRAL-FAULT die-after-ready-ms={ms}\n").unwrap();
        drop(file);
        std::fs::rename(&staged, &self.program).unwrap();
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status(admin: SocketAddr) -> Value {
    let (code, body) = support::get_once(admin, "/status").expect("GET /status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("status JSON")
}

fn worker_generations(status: &Value) -> Vec<u64> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["generation"].as_u64().unwrap())
        .collect()
}

/// A background client that keeps asking and counts connection refusals
/// (the port closed) and other failures.
struct Prober {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, r, o) = (stop.clone(), refused.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {}
                    Ok(stream) => {
                        if let Ok((200, _)) = support::request_on(stream, addr, "/", b"") {
                            o.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Prober {
            stop,
            refused,
            ok,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.refused.load(Ordering::SeqCst),
            self.ok.load(Ordering::SeqCst),
        )
    }
}

fn start_deployed(deployment: &Deployment, extra: &[&str]) -> Cluster {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Cluster::start_program(&deployment.program, &args)
}

#[test]
fn fault_a_bad_deploy_fails_the_reload_and_the_pinned_build_keeps_serving() {
    let deployment = Deployment::new("bad-deploy");
    let cluster = start_deployed(&deployment, &[]);
    let admin = cluster.admin_addr();
    let prober = Prober::start(cluster.addr);
    deployment.deploy_bad_build(1500);
    cluster.signal(Signal::SIGHUP);
    // The new worker of slot 0 dies within the 2 s gate: the reload fails
    // there, slot 1 never moves.
    assert!(
        support::wait_until(Duration::from_secs(20), || {
            status(admin)["last_reload"]["outcome"] == "failed"
        }),
        "{}",
        cluster.stderr()
    );
    let log = cluster.stderr();
    assert!(
        log.contains("dies 1500 ms after becoming ready"),
        "the bad build ran: {log}"
    );
    assert!(log.contains("reload failed"), "{log}");
    let after = status(admin);
    assert_eq!(after["last_reload"]["generation"], 2);
    assert!(after["last_reload"]["reason"]
        .as_str()
        .unwrap()
        .contains("slot 0"));
    assert!(support::wait_until(Duration::from_secs(10), || {
        let status = status(admin);
        worker_generations(&status) == [1, 1]
            && status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "ready")
    }));

    // Binary pinning: a crash restart runs generation 1 again, not the bad
    // file now at the path (which would die 1.5 s after becoming ready).
    let victim = status(admin)["workers"][1]["pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(support::wait_until(Duration::from_secs(10), || {
        let status = status(admin);
        let worker = &status["workers"][1];
        worker["pid"].as_i64() != Some(victim as i64) && worker["state"] == "ready"
    }));
    let restarted = status(admin)["workers"][1]["pid"].as_i64().unwrap() as i32;
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        support::process_alive(restarted),
        "the restart ran the bad build"
    );
    assert_eq!(worker_generations(&status(admin)), [1, 1]);
    assert!(support::process_alive(cluster.pid()));
    let (refused, ok) = prober.finish();
    assert_eq!(refused, 0, "the port was closed at some point");
    assert!(ok > 20, "only {ok} requests answered");
}

#[test]
fn fault_a_build_that_dies_after_the_gate_is_rolled_back_slot_by_slot() {
    let deployment = Deployment::new("rollback");
    let cluster = start_deployed(&deployment, &["--reload-gate", "200ms"]);
    let admin = cluster.admin_addr();
    let first_pids: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    let prober = Prober::start(cluster.addr);
    deployment.deploy_bad_build(1500);
    cluster.signal(Signal::SIGHUP);
    assert!(
        support::wait_until(Duration::from_secs(30), || {
            status(admin)["last_reload"]["outcome"] == "rolled_back"
        }),
        "{}",
        cluster.stderr()
    );
    let log = cluster.stderr();
    // Both slots had moved before the new generation died.
    assert!(
        log.contains("rolling 1 slots back") || log.contains("rolling 2 slots back"),
        "{log}"
    );
    assert!(log.contains("rolled back to generation 1"), "{log}");
    assert!(support::wait_until(Duration::from_secs(15), || {
        let status = status(admin);
        worker_generations(&status) == [1, 1]
            && status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "ready")
    }));
    let now: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    assert!(
        now.is_disjoint(&first_pids),
        "rolled-back workers are new processes of generation 1"
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        worker_generations(&status(admin)),
        [1, 1],
        "it stays rolled back"
    );
    assert!(support::process_alive(cluster.pid()));
    let (refused, ok) = prober.finish();
    assert_eq!(refused, 0);
    assert!(ok > 20);
}

#[test]
fn fault_a_crash_storm_after_serving_never_ends_the_primary_and_the_slot_comes_back() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = cluster.admin_addr();
    // Five quick kill -9s of slot 1's worker, as a chaos run does.
    let mut killed = 0;
    for _ in 0..8 {
        let status = status(admin);
        if status["slots"][1]["gave_up"] == true {
            break;
        }
        let Some(pid) = status["slots"][1]["worker"]["pid"].as_i64() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
        support::wait_until(Duration::from_secs(5), || {
            let s = self::status(admin);
            s["slots"][1]["gave_up"] == true
                || s["slots"][1]["worker"]["pid"]
                    .as_i64()
                    .is_some_and(|p| p != pid)
        });
    }
    assert!(killed >= 5, "only {killed} kills");
    let given_up = status(admin);
    assert_eq!(given_up["slots"][1]["state"], "given_up", "{given_up}");
    let retry = given_up["slots"][1]["next_retry_s"].as_f64().unwrap();
    assert!(retry > 0.0 && retry <= 30.0, "next retry in {retry} s");
    assert!(cluster.stderr().contains("crash loop"));
    // The primary serves on with slot 0 ...
    for _ in 0..20 {
        let (slot, _) = cluster.hello().expect("slot 0 answers");
        assert_eq!(slot, 0);
    }
    // ... and tries slot 1 again on its own, no SIGHUP needed.
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            status(admin)["slots"][1]["state"] == "serving"
        }),
        "{}",
        cluster.stderr()
    );
    assert!(cluster.stderr().contains("retrying the slot given up on"));
    assert!(support::process_alive(cluster.pid()));
}

#[test]
fn fault_spawn_errors_under_fd_pressure_back_off_and_are_not_a_crash_loop() {
    support::raise_own_fd_limit();
    let limit = 48;
    let cluster = support::start_with_fd_limit(
        limit,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let admin = cluster.admin_addr();
    // Idle connections to the admin page, which the primary itself holds,
    // until it has no descriptor left.
    let mut idle = Vec::new();
    let exhausted = support::wait_until(Duration::from_secs(10), || {
        for _ in 0..8 {
            if let Ok(stream) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) {
                idle.push(stream);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        support::open_fds(cluster.pid()) as u64 >= limit
    });
    assert!(
        exhausted,
        "the primary has {} fds",
        support::open_fds(cluster.pid())
    );
    let victim = cluster.worker_pids()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            cluster.stderr().matches("not counted as a crash").count() >= 5
        }),
        "{}",
        cluster.stderr()
    );
    assert!(cluster.stderr().contains("Too many open files"));
    assert!(
        !cluster.stderr().contains("crash loop"),
        "{}",
        cluster.stderr()
    );
    drop(idle);
    // Descriptors free again: the slot is refilled on its own.
    assert!(
        support::wait_until(Duration::from_secs(15), || cluster.worker_pids().len() == 2),
        "{}",
        cluster.stderr()
    );
    assert!(support::wait_until(Duration::from_secs(10), || {
        status(admin)["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|slot| slot["state"] == "serving")
    }));
}

#[test]
fn fault_a_dead_primary_leaves_no_port_squatter() {
    let port = corral_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--listen",
        listen.as_str(),
        "--workers",
        "2",
        "--shutdown-timeout",
        "2s",
        "--heartbeat-timeout",
        "60s",
    ];
    let mut cluster = Cluster::start(&args);
    let workers = cluster.worker_pids();
    assert_eq!(workers.len(), 2);
    // Block both event loops for a minute.
    let addr = cluster.addr;
    let blockers: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || support::get_once(addr, "/block?ms=60000")))
        .collect();
    let blocked = support::wait_until(Duration::from_secs(10), || {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        support::request_on(stream, addr, "/", b"").is_err()
    });
    assert!(blocked, "the loops never blocked");
    // kill -9 the primary alone: the workers are orphans with blocked loops.
    kill(Pid::from_raw(cluster.pid()), Signal::SIGKILL).unwrap();
    cluster.wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        workers.iter().all(|&pid| support::process_alive(pid)),
        "the orphans are there at first"
    );
    assert!(
        support::wait_until(Duration::from_secs(3), || workers
            .iter()
            .all(|&pid| !support::process_alive(pid))),
        "orphans still alive after 3 s"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(3));
    // The same command binds the port again.
    let again = Cluster::start(&args);
    assert_eq!(again.addr.port(), port);
    assert!(again.hello().is_ok());
    drop(blockers);
}

#[test]
fn fault_signals_without_a_meaning_are_logged_and_ignored() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let workers: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    for signal in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
        Signal::SIGWINCH,
        Signal::SIGALRM,
        Signal::SIGQUIT,
    ] {
        cluster.signal(signal);
        let name = signal.as_str();
        assert!(
            support::wait_until(Duration::from_secs(5), || cluster
                .stderr()
                .contains(&format!("{name} received"))),
            "{name}: {}",
            cluster.stderr()
        );
    }
    assert!(support::process_alive(cluster.pid()));
    assert_eq!(
        cluster.worker_pids().into_iter().collect::<BTreeSet<_>>(),
        workers
    );
    assert!(cluster.hello().is_ok());
}

/// Keeps new and keep-alive connections going; counts every failure.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for keep_alive in [false, true, false, true] {
            let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                let mut client = support::KeepAliveClient::new(addr);
                while !stop.load(Ordering::SeqCst) {
                    let result = if keep_alive {
                        client.get("/")
                    } else {
                        support::get_once(addr, "/")
                    };
                    match result {
                        Ok((200, _)) => done.fetch_add(1, Ordering::SeqCst),
                        other => {
                            eprintln!("failed request: {other:?}");
                            failures.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            }));
        }
        Load {
            stop,
            failures,
            done,
            threads,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        (
            self.failures.load(Ordering::SeqCst),
            self.done.load(Ordering::SeqCst),
        )
    }
}

fn serving_workers(admin: SocketAddr) -> usize {
    let status = status(admin);
    let slots = status["slots"].as_array().unwrap();
    if slots.iter().all(|slot| slot["state"] == "serving") {
        slots.len()
    } else {
        0
    }
}

#[test]
fn fault_sigttin_and_sigttou_scale_under_load_without_failures() {
    for balance in ["round-robin", "least-conn"] {
        let cluster = Cluster::start(&[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--balance",
            balance,
            "--admin",
            "127.0.0.1:0",
        ]);
        let admin = cluster.admin_addr();
        let load = Load::start(cluster.addr);
        cluster.signal(Signal::SIGTTIN);
        assert!(support::wait_until(
            Duration::from_secs(10),
            || serving_workers(admin) == 3
        ));
        assert_eq!(cluster.worker_pids().len(), 3);
        std::thread::sleep(Duration::from_millis(300));
        cluster.signal(Signal::SIGTTOU);
        assert!(support::wait_until(
            Duration::from_secs(10),
            || serving_workers(admin) == 2
        ));
        cluster.signal(Signal::SIGTTOU);
        assert!(support::wait_until(
            Duration::from_secs(10),
            || serving_workers(admin) == 1
        ));
        // Never below one.
        cluster.signal(Signal::SIGTTOU);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(serving_workers(admin), 1);
        assert!(support::wait_until(Duration::from_secs(10), || cluster
            .worker_pids()
            .len()
            == 1));
        let (failures, done) = load.finish();
        assert_eq!(failures, 0, "{balance}: failed requests while scaling");
        assert!(done > 100, "{balance}: only {done} requests");
    }
}

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn fault_a_message_flood_stays_bounded_and_the_workers_keep_answering() {
    let cluster = Cluster::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let addr = cluster.addr;
    let text = "x".repeat(16 * 1024);
    let path = format!("/notify?text={text}");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (stop, sent, refused, path) =
                (stop.clone(), sent.clone(), refused.clone(), path.clone());
            std::thread::spawn(move || {
                let mut client = support::KeepAliveClient::new(addr);
                while !stop.load(Ordering::SeqCst) {
                    match client.get(&path) {
                        Ok((200, body)) if body.starts_with("sent") => {
                            sent.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok((200, _)) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut peak = 0;
    let mut slowest = Duration::ZERO;
    // 30 s: the old unbounded queues grew 35 MB/s, so any leak would show.
    while started.elapsed() < Duration::from_secs(30) {
        let pids: Vec<i32> = std::iter::once(cluster.pid())
            .chain(cluster.worker_pids())
            .collect();
        peak = pids
            .iter()
            .map(|&pid| rss_bytes(pid))
            .max()
            .unwrap()
            .max(peak);
        let asked = Instant::now();
        assert!(
            cluster.hello().is_ok(),
            "a plain request failed during the flood"
        );
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    for flooder in flooders {
        flooder.join().unwrap();
    }
    let sent = sent.load(Ordering::SeqCst);
    // Hundreds of 16 KiB messages at least (the old code grew 35 MB/s).
    assert!(sent > 300, "the flood never happened ({sent} messages)");
    assert!(peak < 64 << 20, "a process reached {} MiB", peak >> 20);
    assert!(
        slowest < Duration::from_secs(1),
        "a plain request took {slowest:?}"
    );
    eprintln!(
        "flood: {sent} messages sent, {} refused as queue-full, peak RSS {} MiB, slowest plain request {slowest:?}",
        refused.load(Ordering::SeqCst),
        peak >> 20
    );
}

#[test]
fn fault_an_fd_spike_does_not_stop_intake_for_good() {
    support::raise_own_fd_limit();
    for balance in ["reuseport", "round-robin", "least-conn"] {
        let cluster = support::start_with_fd_limit(
            1024,
            &[
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--balance",
                balance,
            ],
        );
        let addr = cluster.addr;
        let mut idle = Vec::new();
        for _ in 0..2100 {
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                idle.push(stream);
            }
        }
        // The scenario happened: someone ran out of descriptors (accept:
        // EMFILE; receiving passed descriptors: ENOBUFS or EMFILE), or the
        // workers' connection cap (derived from the same limit) held them off.
        assert!(
            support::wait_until(Duration::from_secs(10), || {
                let log = cluster.stderr();
                log.contains("Too many open files")
                    || log.contains("No buffer space available")
                    || log.contains("connections open (--max-connections)")
            }),
            "{balance}: {} idle connections and no fd exhaustion:\n{}",
            idle.len(),
            cluster.stderr()
        );
        drop(idle);
        let closed = Instant::now();
        let recovered = support::wait_until(Duration::from_secs(5), || {
            (0..10).all(|_| cluster.hello().is_ok())
        });
        assert!(
            recovered,
            "{balance}: not serving {:?} after the spike:\n{}",
            closed.elapsed(),
            cluster.stderr()
        );
        assert!(support::process_alive(cluster.pid()));
    }
}
