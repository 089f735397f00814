//! The `corral` verbs against real clusters of the `hello` example: status,
//! reload (healthy, exits at start, dies after ready), scale under load,
//! logs by slot, stop, names side by side.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corral_testkit::{wait_until, Cluster};

/// The built `hello` example of the corral crate (built here if missing).
fn hello_binary() -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    let profile = test_exe.parent().and_then(Path::parent).unwrap();
    let binary = profile.join("examples").join("hello");
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "corral", "--example", "hello"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    binary
}

/// A test's own runtime directory: its clusters' control sockets live there.
struct Runtime {
    dir: PathBuf,
}

impl Runtime {
    fn new(tag: &str) -> Runtime {
        let dir = std::env::temp_dir().join(format!("corral-operate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Runtime { dir }
    }

    fn start(&self, program: &Path, args: &[&str]) -> Cluster {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env("XDG_RUNTIME_DIR", &self.dir);
        Cluster::start(command, Duration::from_secs(30))
    }

    fn corral(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_corral"))
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.dir)
            .output()
            .unwrap()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn status_json(runtime: &Runtime, name: &str) -> serde_json::Value {
    let output = runtime.corral(&["status", "--json", "--name", name]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "unexpected answer {response:?}"
        )));
    }
    Ok(response)
}

/// Puts a copy of `hello` at a path of the test's own, as a deployed service.
fn deploy(dir: &Path, fault: Option<&str>) -> PathBuf {
    let program = dir.join("service");
    let staged = dir.join("service.new");
    std::fs::copy(hello_binary(), &staged).unwrap();
    if let Some(fault) = fault {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&staged)
            .unwrap();
        write!(file, "\n{fault}\n").unwrap();
    }
    std::fs::rename(&staged, &program).unwrap();
    program
}

#[test]
fn operate_status_json_has_the_fixed_shape() {
    let runtime = Runtime::new("status");
    let _cluster = runtime.start(
        &hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--name",
            "shape",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || {
        status_json(&runtime, "shape")["workers"][1]["rss_bytes"].is_u64()
    }));
    let status = status_json(&runtime, "shape");
    assert_eq!(status["name"], "shape");
    assert!(status["pid"].is_u64());
    assert_eq!(status["balance"], "reuseport");
    assert_eq!(status["listen"].as_array().unwrap().len(), 1);
    assert!(status["last_reload"].is_null());
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for (slot, worker) in workers.iter().enumerate() {
        assert_eq!(worker["slot"], slot);
        for field in ["pid", "generation", "restarts"] {
            assert!(worker[field].is_u64(), "{field}: {worker}");
        }
        assert_eq!(worker["state"], "ready");
        assert!(worker["uptime_s"].is_number());
        for field in [
            "last_exit",
            "cpu_percent",
            "rss_bytes",
            "requests_per_s",
            "connections",
            "loop_delay_p99_ms",
            "pool_queued",
        ] {
            assert!(worker.get(field).is_some(), "{field} missing: {worker}");
        }
    }
    // The table names every column.
    let table = stdout(&runtime.corral(&["status", "--name", "shape"]));
    for column in ["slot", "pid", "gen", "state", "restarts"] {
        assert!(table.to_lowercase().contains(column), "{table}");
    }
    // `list` shows it.
    let list = runtime.corral(&["list"]);
    assert!(stdout(&list).contains("shape"), "{}", stdout(&list));
}

#[test]
fn operate_reload_exits_zero_on_a_healthy_build_and_one_on_bad_builds() {
    let runtime = Runtime::new("reload");
    let program = deploy(&runtime.dir, None);
    let cluster = runtime.start(
        &program,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--name",
            "deployed",
            "--reload-gate",
            "300ms",
        ],
    );
    let before: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    let healthy = runtime.corral(&["reload", "--name", "deployed", "--timeout", "60s"]);
    assert_eq!(healthy.status.code(), Some(0), "{}", stderr(&healthy));
    let after: BTreeSet<i32> = cluster.worker_pids().into_iter().collect();
    assert!(before.is_disjoint(&after), "every worker was replaced");
    assert_eq!(
        status_json(&runtime, "deployed")["last_reload"]["outcome"],
        "completed"
    );

    // A build that exits at start (a copy of something that is no corral
    // worker at all: `false`).
    std::fs::copy("/bin/false", runtime.dir.join("service.new")).unwrap();
    std::fs::rename(runtime.dir.join("service.new"), &program).unwrap();
    let broken = runtime.corral(&["reload", "--name", "deployed", "--timeout", "60s"]);
    assert_eq!(broken.status.code(), Some(1), "{}", stderr(&broken));
    assert!(
        stderr(&broken).contains("reload failed"),
        "{}",
        stderr(&broken)
    );
    assert!(get(cluster.addr).is_ok(), "the old generation answers");

    // A build that dies 1.5 s after becoming ready.
    deploy(&runtime.dir, Some("CORRAL-FAULT die-after-ready-ms=1500"));
    let dying = runtime.corral(&["reload", "--name", "deployed", "--timeout", "60s"]);
    assert_eq!(dying.status.code(), Some(1), "{}", stderr(&dying));
    let status = status_json(&runtime, "deployed");
    let outcome = status["last_reload"]["outcome"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(outcome == "failed" || outcome == "rolled_back", "{status}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let status = status_json(&runtime, "deployed");
            status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["generation"] == 2 && w["state"] == "ready")
        }),
        "the workers went back to the healthy generation"
    );
    assert!(get(cluster.addr).is_ok());
}

#[test]
fn operate_scale_under_load_fails_no_request() {
    let runtime = Runtime::new("scale");
    for balance in ["reuseport", "round-robin"] {
        let name = format!("scale-{balance}");
        let cluster = runtime.start(
            &hello_binary(),
            &[
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--name",
                &name,
                "--balance",
                balance,
            ],
        );
        let addr = cluster.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let load: Vec<_> = (0..4)
            .map(|_| {
                let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match get(addr) {
                            Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                            Err(err) => {
                                eprintln!("{err}");
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                    }
                })
            })
            .collect();
        for (target, expected) in [("4", 4), ("1", 1), ("+1", 2)] {
            let output = runtime.corral(&["scale", target, "--name", &name]);
            assert_eq!(
                output.status.code(),
                Some(0),
                "scale {target}: {}",
                stderr(&output)
            );
            assert_eq!(
                status_json(&runtime, &name)["workers"]
                    .as_array()
                    .unwrap()
                    .len(),
                expected,
                "after scale {target}"
            );
            assert!(wait_until(Duration::from_secs(10), || cluster
                .worker_pids()
                .len()
                == expected));
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::SeqCst);
        for thread in load {
            thread.join().unwrap();
        }
        assert_eq!(
            failed.load(Ordering::SeqCst),
            0,
            "{balance}: failed requests while scaling"
        );
        assert!(done.load(Ordering::SeqCst) > 50);
    }
}

#[test]
fn operate_logs_by_slot_and_stop_leaves_nothing_running() {
    let runtime = Runtime::new("logs");
    let mut cluster = runtime.start(
        &hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--name",
            "logged",
        ],
    );
    let workers = cluster.worker_pids();
    let output = runtime.corral(&["logs", "--name", "logged", "--slot", "1", "--lines", "50"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let lines = stdout(&output);
    assert!(!lines.trim().is_empty());
    for line in lines.lines() {
        assert!(line.contains("worker 1"), "a line not of slot 1: {line}");
        assert!(!line.contains("worker 0"), "{line}");
    }
    let stop = runtime.corral(&["stop", "--name", "logged", "--timeout", "30s"]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    assert_eq!(cluster.wait_exit(Duration::from_secs(10)).code(), Some(0));
    for pid in workers {
        assert!(!corral_testkit::process_alive(pid));
    }
    // Gone from the list, and the verbs say there is no such cluster.
    let missing = runtime.corral(&["status", "--name", "logged"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn operate_two_names_side_by_side_and_the_same_name_refused() {
    let runtime = Runtime::new("names");
    let _a = runtime.start(
        &hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--name",
            "alpha",
        ],
    );
    let _b = runtime.start(
        &hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--name",
            "beta",
        ],
    );
    let list = stdout(&runtime.corral(&["list"]));
    assert!(list.contains("alpha") && list.contains("beta"), "{list}");
    // With two running, a verb without a name lists them and fails.
    let ambiguous = runtime.corral(&["status"]);
    assert_eq!(ambiguous.status.code(), Some(2));
    assert!(
        stderr(&ambiguous).contains("alpha"),
        "{}",
        stderr(&ambiguous)
    );
    // The socket is the owner's only.
    let socket = runtime.dir.join("corral").join("alpha.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(runtime.dir.join("corral"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // A second live cluster named alpha is a clear error.
    let second = Command::new(hello_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--name",
            "alpha",
        ])
        .env("XDG_RUNTIME_DIR", &runtime.dir)
        .output()
        .unwrap();
    assert_ne!(second.status.code(), Some(0));
    let message = stderr(&second);
    assert!(message.contains("alpha"), "{message}");
    assert!(
        message.contains("already running") || message.contains("already"),
        "{message}"
    );
}

#[test]
fn operate_user_nobody_runs_the_workers_as_nobody() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "skipped: operate_user_nobody_runs_the_workers_as_nobody (needs root to switch users)"
        );
        return;
    }
    let runtime = Runtime::new("user");
    let cluster = runtime.start(
        &hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--name",
            "dropped",
            "--user",
            "nobody",
        ],
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let workers = cluster.worker_pids();
    assert_eq!(workers.len(), 2);
    for pid in workers {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .map(|field| field.parse::<u32>().unwrap())
            .collect::<Vec<_>>();
        assert!(
            uid.iter().all(|&id| id == nobody),
            "worker {pid} has uids {uid:?}"
        );
        // It shows under its program's name, not the pinned descriptor's number.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "hello");
    }
    // The primary stays root (it owns the sockets) and the workers serve.
    let primary = std::fs::read_to_string(format!("/proc/{}/status", cluster.pid())).unwrap();
    assert!(
        primary.lines().any(|line| line.starts_with("Uid:\t0\t")),
        "{primary}"
    );
    assert!(get(cluster.addr).is_ok());
}
