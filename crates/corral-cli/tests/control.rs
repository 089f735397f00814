//! The `corral` verbs, run as the real binary against a scripted primary: a
//! real Unix socket speaking the control protocol from `corral::control`.
//! (The server half inside the primary is tested in the library; the lead's
//! end-to-end tests run both against real clusters.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral::control::{ErrorKind, LogLine, Request, Response, ScaleTarget, Stream};
use serde_json::{json, Value};

/// A directory standing in for `$XDG_RUNTIME_DIR`, so the verbs see only
/// this test's clusters.
struct Runtime(PathBuf);

impl Runtime {
    fn new(test: &str) -> Runtime {
        let dir =
            std::env::temp_dir().join(format!("corral-cli-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("corral")).unwrap();
        Runtime(dir)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.0.join("corral").join(format!("{name}.sock"))
    }

    /// A scripted primary named `name` on this runtime's socket, answering at once.
    fn fake(&self, name: &str, pid: u32, script: Box<Script>) -> Fake {
        Fake::start(&self.socket(name), name, pid, Duration::ZERO, script)
    }

    fn corral(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_corral"));
        command.args(args).env("XDG_RUNTIME_DIR", &self.0);
        command
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Script = dyn Fn(&Request) -> Vec<Response> + Send + Sync;

/// A scripted primary: says hello as `name`/`pid`, records each request and
/// answers it with the script's lines, `pause` apart. A followed log request
/// is held open after its lines, as a real primary does.
struct Fake {
    path: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Fake {
    fn start(path: &Path, name: &str, pid: u32, pause: Duration, script: Box<Script>) -> Fake {
        let listener = UnixListener::bind(path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::from(script);
        let (seen, stopping, name) = (requests.clone(), stop.clone(), name.to_owned());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (seen, script, name, stopping) =
                    (seen.clone(), script.clone(), name.clone(), stopping.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &name, pid, pause, &*script, &seen, &stopping);
                });
            }
        });
        Fake {
            path: path.to_owned(),
            requests,
            stop,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(
    mut stream: UnixStream,
    name: &str,
    pid: u32,
    pause: Duration,
    script: &Script,
    seen: &Mutex<Vec<Request>>,
    stopping: &AtomicBool,
) -> std::io::Result<()> {
    let hello = Response::Hello {
        protocol: corral::control::PROTOCOL_VERSION,
        name: name.to_owned(),
        pid,
    };
    writeln!(stream, "{}", serde_json::to_string(&hello).unwrap())?;
    let mut line = String::new();
    if BufReader::new(stream.try_clone()?).read_line(&mut line)? == 0 {
        return Ok(());
    }
    let request: Request = serde_json::from_str(&line).unwrap();
    seen.lock().unwrap().push(request.clone());
    for (index, answer) in script(&request).into_iter().enumerate() {
        if index > 0 {
            std::thread::sleep(pause);
        }
        writeln!(stream, "{}", serde_json::to_string(&answer).unwrap())?;
    }
    if matches!(request, Request::Logs { follow: true, .. }) {
        while !stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn status_object(name: &str) -> Value {
    json!({
        "name": name, "pid": 4100, "balance": "reuseport", "uptime_s": 75.0,
        "listen": ["127.0.0.1:8080"],
        "workers": [
            {"slot": 0, "pid": 4101, "generation": 3, "state": "ready", "uptime_s": 12.5,
             "restarts": 1, "last_exit": "killed by signal 9", "cpu_percent": 48.0,
             "rss_bytes": 6553600, "requests_per_s": 5120.0, "connections": 12,
             "loop_delay_p99_ms": 1.2, "pool_queued": 0},
            {"slot": 1, "pid": 4102, "generation": 3, "state": "starting", "uptime_s": 0.4,
             "restarts": 0, "last_exit": null, "cpu_percent": null, "rss_bytes": null,
             "requests_per_s": null, "connections": null, "loop_delay_p99_ms": null,
             "pool_queued": null}
        ],
        "last_reload": {"outcome": "completed", "generation": 3, "reason": null}
    })
}

fn log(slot: usize, pid: u32, text: &str) -> Response {
    Response::Log(LogLine {
        slot,
        pid,
        stream: Stream::Stdout,
        line: text.to_owned(),
    })
}

/// A primary that answers everything like a healthy cluster.
fn healthy(name: &str) -> Box<Script> {
    let name = name.to_owned();
    Box::new(move |request| match request {
        Request::Status => vec![Response::Status {
            status: status_object(&name),
        }],
        Request::Reload => vec![Response::Accepted, Response::Reloaded { generation: 4 }],
        Request::Scale { target } => vec![
            Response::Accepted,
            Response::Scaled {
                workers: match target {
                    ScaleTarget::To(n) => *n,
                    ScaleTarget::By(k) => (2 + k) as usize,
                },
            },
        ],
        Request::Stop => vec![Response::Accepted, Response::Stopping { pid: 4100 }],
        Request::Logs { slot, follow, .. } => {
            let mut lines: Vec<Response> =
                [log(0, 4101, "zero says hi"), log(1, 4102, "one says hi")]
                    .into_iter()
                    .filter(|line| match (line, slot) {
                        (Response::Log(line), Some(slot)) => line.slot == *slot,
                        _ => true,
                    })
                    .collect();
            if !follow {
                lines.push(Response::End);
            }
            lines
        }
    })
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn status_json_is_the_status_object_verbatim() {
    let runtime = Runtime::new("status-json");
    let _web = runtime.fake("web", 4100, healthy("web"));
    let output = runtime.corral(&["status", "--json", "--name", "web"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(printed, status_object("web"));
}

#[test]
fn status_prints_a_row_per_worker() {
    let runtime = Runtime::new("status-table");
    let path = runtime.socket("web");
    let _web = Fake::start(&path, "web", 4100, Duration::ZERO, healthy("web"));
    let output = runtime.corral(&["status", "--control", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    let header = out.lines().find(|l| l.starts_with("SLOT")).unwrap();
    for column in [
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "CPU%",
        "RSS",
        "REQ/S",
        "CONNS",
        "LOOP P99",
        "POOL Q",
    ] {
        assert!(header.contains(column), "{column} missing: {header}");
    }
    let first = out.lines().find(|l| l.contains("4101")).unwrap();
    assert!(
        first.contains("killed by signal 9") && first.contains("6.2 MiB"),
        "{first}"
    );
    assert!(out
        .lines()
        .any(|l| l.contains("4102") && l.contains("starting")));
    assert!(
        out.contains("last reload: completed (generation 3)"),
        "{out}"
    );
}

#[test]
fn with_no_name_the_one_running_cluster_is_used_and_several_are_listed() {
    let runtime = Runtime::new("resolve");
    let output = runtime.corral(&["status"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no cluster of this user is running"),
        "{}",
        stderr(&output)
    );

    let _web = runtime.fake("web", 4100, healthy("web"));
    let output = runtime.corral(&["status", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("\"web\""));

    let _api = runtime.fake("api", 4200, healthy("api"));
    let output = runtime.corral(&["reload"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("2 clusters are running (api, web)") && err.contains("--name"),
        "{err}"
    );

    let output = runtime.corral(&["status", "--name", "nope"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no cluster named `nope` is running"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn list_shows_every_live_cluster_and_removes_stale_sockets() {
    let runtime = Runtime::new("list");
    let _web = runtime.fake("web", 4100, healthy("web"));
    let _api = runtime.fake("api", 4200, healthy("api"));
    let stale = runtime.socket("gone");
    drop(UnixListener::bind(&stale).unwrap());

    let output = runtime.corral(&["list"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("UPTIME"),
        "{out}"
    );
    assert_eq!(lines.len(), 3, "{out}");
    for name in ["web", "api"] {
        let row = lines.iter().find(|l| l.starts_with(name)).unwrap();
        for cell in ["4100", "1/2", "127.0.0.1:8080", "1m 15s"] {
            assert!(row.contains(cell), "{cell} missing: {row}");
        }
    }
    assert!(!stale.exists(), "the stale socket was left");

    let output = runtime.corral(&["list", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(listed.len(), 2);
}

#[test]
fn reload_blocks_until_done_and_exits_0() {
    let runtime = Runtime::new("reload");
    let web = Fake::start(
        &runtime.socket("web"),
        "web",
        4100,
        Duration::from_millis(400),
        healthy("web"),
    );
    let started = Instant::now();
    let output = runtime.corral(&["reload", "--name", "web"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(
        stdout(&output).contains("generation 4"),
        "{}",
        stdout(&output)
    );
    assert_eq!(web.requests(), [Request::Reload]);
}

#[test]
fn a_failed_reload_exits_1_with_the_reason() {
    let runtime = Runtime::new("reload-fail");
    let _web = runtime.fake("web", 4100, Box::new(|_| {
            vec![
                Response::Accepted,
                Response::Error {
                    kind: ErrorKind::Failed,
                    message: "slot 0's new worker exited with status 3 at start; rolled back to generation 3".into(),
                },
            ]
        }),
    );
    let output = runtime.corral(&["reload"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("rolled back to generation 3"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn reload_gives_up_waiting_after_its_timeout() {
    let runtime = Runtime::new("reload-timeout");
    let _web = Fake::start(
        &runtime.socket("web"),
        "web",
        4100,
        Duration::from_secs(3),
        healthy("web"),
    );
    let started = Instant::now();
    let output = runtime.corral(&["reload", "--timeout", "300ms"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        stderr(&output).contains("not over after 300ms"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_primary_that_dies_mid_reload_fails_it() {
    let runtime = Runtime::new("reload-dies");
    let _web = runtime.fake("web", 4100, Box::new(|_| vec![Response::Accepted]));
    let output = runtime.corral(&["reload"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("closed the connection"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn scale_sends_absolute_and_relative_targets() {
    let runtime = Runtime::new("scale");
    let web = runtime.fake("web", 4100, healthy("web"));
    for (arg, expected) in [("4", "4 workers"), ("+2", "4 workers"), ("-1", "1 workers")] {
        let output = runtime.corral(&["scale", arg]);
        assert_eq!(output.status.code(), Some(0), "{arg}: {}", stderr(&output));
        assert!(
            stdout(&output).contains(expected),
            "{arg}: {}",
            stdout(&output)
        );
    }
    assert_eq!(
        web.requests(),
        [
            Request::Scale {
                target: ScaleTarget::To(4)
            },
            Request::Scale {
                target: ScaleTarget::By(2)
            },
            Request::Scale {
                target: ScaleTarget::By(-1)
            },
        ]
    );
    let output = runtime.corral(&["scale", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(web.requests().len(), 3);
}

#[test]
fn a_scale_that_cannot_complete_exits_1() {
    let runtime = Runtime::new("scale-fail");
    let _web = runtime.fake(
        "web",
        4100,
        Box::new(|_| {
            vec![
                Response::Accepted,
                Response::Error {
                    kind: ErrorKind::Failed,
                    message: "a cluster keeps at least 1 worker".into(),
                },
            ]
        }),
    );
    let output = runtime.corral(&["scale", "-5"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("at least 1 worker"));
}

#[test]
fn stop_waits_for_the_primary_to_be_gone() {
    let runtime = Runtime::new("stop");
    // The "primary" is a process that exits a little after being told to stop.
    let mut primary = Command::new("sleep").arg("0.7").spawn().unwrap();
    let pid = primary.id();
    let reaper = std::thread::spawn(move || primary.wait());
    let _web = runtime.fake(
        "web",
        pid,
        Box::new(move |_| vec![Response::Accepted, Response::Stopping { pid }]),
    );
    let started = Instant::now();
    let output = runtime.corral(&["stop"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(stdout(&output).contains("stopped `web`"));
    reaper.join().unwrap().unwrap();

    // One that does not exit in time.
    let mut stubborn = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = stubborn.id();
    let _api = runtime.fake(
        "api",
        pid,
        Box::new(move |_| vec![Response::Accepted, Response::Stopping { pid }]),
    );
    let output = runtime.corral(&["stop", "--name", "api", "--timeout", "300ms"]);
    stubborn.kill().unwrap();
    stubborn.wait().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("still running after 300ms"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn logs_show_only_the_asked_slot_tagged() {
    let runtime = Runtime::new("logs");
    let web = runtime.fake("web", 4100, healthy("web"));
    let output = runtime.corral(&["logs", "--slot", "1", "--lines", "5"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "[worker 1 pid 4102] one says hi\n");
    assert_eq!(
        web.requests(),
        [Request::Logs {
            slot: Some(1),
            lines: 5,
            follow: false
        }]
    );
}

#[test]
fn followed_logs_print_lines_as_they_come() {
    let runtime = Runtime::new("logs-follow");
    let _web = Fake::start(
        &runtime.socket("web"),
        "web",
        4100,
        Duration::from_millis(200),
        healthy("web"),
    );
    let mut child = runtime
        .command(&["logs", "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "[worker 0 pid 4101] zero says hi"
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "[worker 1 pid 4102] one says hi"
    );
    // Still following: it has not exited.
    assert!(child.try_wait().unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_refusing_primary_is_reported() {
    let runtime = Runtime::new("refused");
    let path = runtime.socket("web");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let refusal = Response::Error {
                kind: ErrorKind::Refused,
                message:
                    "refused: uid 1000 may not control cluster `web`; run corral as uid 0 or root"
                        .into(),
            };
            let _ = writeln!(stream, "{}", serde_json::to_string(&refusal).unwrap());
        }
    });
    let output = runtime.corral(&["status", "--name", "web"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("may not control cluster `web`"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn another_user_cannot_reach_the_socket() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: running corral as nobody needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let runtime = Runtime::new("nobody");
    // The modes the primary creates: the directory 0700, the socket 0600.
    let path = runtime.socket("web");
    let _web = Fake::start(&path, "web", 4100, Duration::ZERO, healthy("web"));
    std::fs::set_permissions(
        runtime.0.join("corral"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&runtime.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let mut command = runtime.command(&["status", "--control", path.to_str().unwrap()]);
    // SAFETY: setgroups/setgid/setuid are async-signal-safe syscalls.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setgroups(&[]).map_err(std::io::Error::from)?;
            nix::unistd::setgid(nobody.gid).map_err(std::io::Error::from)?;
            nix::unistd::setuid(nobody.uid).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("permission denied"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn monit_shows_a_row_per_worker_and_quits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is not installed");
        return;
    }
    let runtime = Runtime::new("monit");
    let path = runtime.socket("web");
    let _web = Fake::start(&path, "web", 4100, Duration::ZERO, healthy("web"));
    let session = format!("corral-monit-{}", std::process::id());
    let done = runtime.0.join("monit-exit");
    let script = format!(
        "XDG_RUNTIME_DIR={} {} monit; echo $? > {}",
        runtime.0.display(),
        env!("CARGO_BIN_EXE_corral"),
        done.display()
    );
    // A private tmux server, so the test neither sees nor disturbs others.
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .unwrap()
    };
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "30",
        &script,
    ]);
    assert!(started.status.success(), "{}", stderr(&started));
    let screen = || stdout(&tmux(&["capture-pane", "-p", "-t", &session]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut shown = String::new();
    while Instant::now() < deadline {
        shown = screen();
        if shown.contains("4101") && shown.contains("4102") && shown.contains("one says hi") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows: Vec<&str> = shown
        .lines()
        .filter(|l| l.contains("410") && l.contains("   "))
        .collect();
    let quit = || {
        tmux(&["send-keys", "-t", &session, "q"]);
    };
    if !(shown.contains("4101") && shown.contains("4102") && shown.contains("one says hi")) {
        quit();
        tmux(&["kill-server"]);
        panic!("monit never showed both workers and the log tail:\n{shown}");
    }
    assert!(
        rows.iter()
            .any(|r| r.contains("4101") && r.contains("ready") && r.contains("5120.0")),
        "{shown}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("4102") && r.contains("starting")),
        "{shown}"
    );
    assert!(
        shown.contains("corral monit · web (pid 4100) · 2 workers"),
        "{shown}"
    );
    quit();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = std::fs::read_to_string(&done).unwrap_or_default();
    tmux(&["kill-server"]);
    assert_eq!(code.trim(), "0", "monit did not quit on q");
}
