//! `corral run` clusters a program that is not written in Rust: a Python
//! server that takes its socket by systemd's `LISTEN_FDS` convention.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use corral_testkit::{wait_until, Cluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn corral(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_corral"));
    command.args(args);
    command
}

/// Runs the Python server under `corral run` and waits for the listening line.
fn start(workers: &str) -> Cluster {
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/server.py");
    let command = corral(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        workers,
        "--ready-after",
        "300ms",
        "--",
        "python3",
        server,
    ]);
    Cluster::start(command, Duration::from_secs(30))
}

/// The body of `GET path` on a new connection.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned())
}

/// `(slot, pid)` from one request on a new connection.
fn hello(addr: SocketAddr) -> std::io::Result<(String, i32)> {
    let response = get(addr, "/")?;
    let body = response.as_str();
    let rest = body
        .strip_prefix("hello from worker ")
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer {response:?}")))?;
    let (slot, pid) = rest
        .split_once(" (pid ")
        .ok_or_else(|| std::io::Error::other("no pid"))?;
    Ok((
        slot.to_owned(),
        pid.trim_end_matches(')')
            .parse()
            .map_err(std::io::Error::other)?,
    ))
}

#[test]
fn run_clusters_a_socket_activated_program() {
    let cluster = start("2");
    let mut answers = BTreeSet::new();
    assert!(wait_until(Duration::from_secs(20), || {
        if let Ok(answer) = hello(cluster.addr) {
            answers.insert(answer);
        }
        answers
            .iter()
            .map(|(slot, _)| slot.clone())
            .collect::<BTreeSet<_>>()
            .len()
            == 2
    }));

    // A killed worker is replaced in its slot.
    let (slot, victim) = answers.iter().next().cloned().unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        matches!(hello(cluster.addr), Ok((s, pid)) if s == slot && pid != victim)
    }));

    // SIGHUP replaces every worker.
    let before: BTreeSet<i32> = (0..20)
        .filter_map(|_| hello(cluster.addr).ok())
        .map(|(_, pid)| pid)
        .collect();
    cluster.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(30), || {
        let now: BTreeSet<i32> = (0..10)
            .filter_map(|_| hello(cluster.addr).ok())
            .map(|(_, pid)| pid)
            .collect();
        !now.is_empty() && now.is_disjoint(&before)
    }));
}

#[test]
fn run_stops_gracefully_on_sigterm() {
    let mut cluster = start("2");
    hello(cluster.addr).unwrap();
    cluster.signal(Signal::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_refuses_accept_and_pass_modes_clearly() {
    let output = corral(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--balance",
        // Sticky is kernel-steered now, so it applies to programs too.
        "round-robin",
        "--",
        "true",
    ])
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("use --balance reuseport or shared"));
}

#[test]
fn run_needs_a_program() {
    let output = corral(&["run", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn run_reports_a_program_that_keeps_crashing() {
    let output = corral(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--",
        "false",
    ])
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("crash loop"));
}

#[test]
fn run_takes_the_program_its_environment_and_flags_from_a_config_file() {
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/server.py");
    let path = std::env::temp_dir().join(format!("corral-run-config-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "# the ecosystem file of a Python service\n\
             program = \"python3\"\n\
             args = [\"{server}\"]\n\
             env = {{ CORRAL_TEST_GREETING = \"hi from the file\" }}\n\
             listen = \"127.0.0.1:0\"\n\
             workers = 3\n\
             ready-after = \"300ms\"\n"
        ),
    )
    .unwrap();
    // The command line wins over the file: one worker, not three.
    let cluster = Cluster::start(
        corral(&["run", "--config", path.to_str().unwrap(), "--workers", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        get(cluster.addr, "/env/CORRAL_TEST_GREETING").unwrap(),
        "hi from the file"
    );
    let slots: BTreeSet<String> = (0..10)
        .filter_map(|_| hello(cluster.addr).ok())
        .map(|(slot, _)| slot)
        .collect();
    assert_eq!(slots, BTreeSet::from(["0".to_owned()]));
    assert!(cluster.banner.contains("(1 workers"), "{}", cluster.banner);
    drop(cluster);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn run_refuses_flags_that_cannot_apply_to_an_external_program() {
    for (flag, value) in [
        ("--heartbeat-timeout", "2s"),
        ("--max-requests", "100"),
        ("--max-requests-jitter", "10"),
    ] {
        let output = corral(&["run", "-l", "127.0.0.1:0", flag, value, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            err.contains(&format!("{flag} does not apply to `corral run`")),
            "{flag}: {err}"
        );
    }
    let path = std::env::temp_dir().join(format!("corral-run-refuse-{}.toml", std::process::id()));
    std::fs::write(&path, "heartbeat_timeout = \"2s\"\n").unwrap();
    let output = corral(&["run", "--config", path.to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("remove the key from the --config file")
    );

    // --max-memory is measured from /proc, so it stays.
    let help = corral(&["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--max-memory") && !help.contains("--heartbeat-timeout"),
        "{help}"
    );
}

#[test]
fn a_bad_config_file_names_the_key_and_line() {
    let path = std::env::temp_dir().join(format!("corral-run-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nwokers = 2\n").unwrap();
    let output = corral(&["run", "--config", path.to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("line 2: unknown key `wokers`"), "{err}");
}

/// `--drain-delay` under `corral run`: the program has no channel to hear
/// that the node drains, but its `SIGTERM` is held back for the delay, so it
/// keeps answering new connections until then.
#[test]
fn run_holds_the_programs_sigterm_back_for_the_drain_delay() {
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/server.py");
    let command = corral(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--ready-after",
        "300ms",
        "--drain-delay",
        "1500ms",
        "--",
        "python3",
        server,
    ]);
    let mut cluster = Cluster::start(command, Duration::from_secs(30));
    let sigterm = std::time::Instant::now();
    cluster.signal(Signal::SIGTERM);
    let mut served = 0;
    while sigterm.elapsed() < Duration::from_millis(1000) {
        hello(cluster.addr).expect("served during the drain delay");
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = cluster.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "{status:?}; stderr:\n{}",
        cluster.stderr()
    );
    assert!(served >= 5, "only {served} requests during the delay");
    assert!(
        sigterm.elapsed() >= Duration::from_millis(1500),
        "stopped {:?} after SIGTERM, before the delay was over",
        sigterm.elapsed()
    );
}
