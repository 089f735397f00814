//! The control server against a scripted supervisor: a real Unix socket, real
//! JSON, the real blocking client.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::*;

/// A private directory for one test's sockets.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("corral-control-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.0.join("run").join(format!("{name}.sock"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the scripted supervisor answers, and what it was asked.
#[derive(Clone, Default)]
struct Script {
    reload: Option<Result<u64, String>>,
    scale: Option<Result<usize, String>>,
    seen: Arc<Mutex<Vec<String>>>,
}

struct Running {
    runtime: tokio::runtime::Runtime,
    server: tokio::task::JoinHandle<()>,
    logs: LogBook,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn start(path: &Path, name: &str, script: Script) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = bind(path, name).unwrap();
    let logs = LogBook::with_outputs(100, Box::new(std::io::sink()), Box::new(std::io::sink()));
    let (commands, mut received) = tokio::sync::mpsc::channel(8);
    let seen = script.seen.clone();
    runtime.spawn(async move {
        while let Some(command) = received.recv().await {
            match command {
                ControlCommand::Reload { done } => {
                    script.seen.lock().unwrap().push("reload".into());
                    // A real reload takes a while; the client must wait for it.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    match script.reload.clone() {
                        Some(outcome) => {
                            let _ = done.send(outcome);
                        }
                        None => drop(done),
                    }
                }
                ControlCommand::Scale { target, done } => {
                    script.seen.lock().unwrap().push(format!("scale {target}"));
                    if let Some(outcome) = script.scale.clone() {
                        let _ = done.send(outcome);
                    }
                }
                ControlCommand::Stop { done } => {
                    script.seen.lock().unwrap().push("stop".into());
                    let _ = done.send(());
                }
            }
        }
    });
    let handle = ControlHandle {
        status: Arc::new(|| json!({"name": "web", "workers": [{"slot": 0, "pid": 11}]})),
        commands,
        logs: logs.clone(),
    };
    let server = runtime.spawn(serve(listener, handle));
    Running {
        runtime,
        server,
        logs,
        seen,
    }
}

fn ask(path: &Path, request: Request) -> Vec<Response> {
    let client = Client::connect(path).unwrap();
    client
        .request(&request)
        .unwrap()
        .map(|response| response.unwrap())
        .collect()
}

#[test]
fn hello_names_the_protocol_the_cluster_and_the_primary() {
    let dir = TempDir::new("hello");
    let path = dir.socket("web");
    let _server = start(&path, "web", Script::default());
    let client = Client::connect(&path).unwrap();
    assert_eq!(
        client.hello(),
        &Hello {
            protocol: PROTOCOL_VERSION,
            name: "web".into(),
            pid: std::process::id()
        }
    );

    // The wire format itself, as a script would read it.
    use std::io::{BufRead, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut reader = std::io::BufReader::new(raw.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    let hello: serde_json::Value = serde_json::from_str(&hello).unwrap();
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 1);
    raw.write_all(b"{\"type\":\"status\"}\n").unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["status"]["workers"][0]["pid"], 11);
}

#[test]
fn status_is_the_supervisors_object_verbatim() {
    let dir = TempDir::new("status");
    let path = dir.socket("web");
    let _server = start(&path, "web", Script::default());
    assert_eq!(
        ask(&path, Request::Status),
        [Response::Status {
            status: json!({"name": "web", "workers": [{"slot": 0, "pid": 11}]})
        }]
    );
}

#[test]
fn garbage_is_answered_with_a_bad_request() {
    let dir = TempDir::new("garbage");
    let path = dir.socket("web");
    let _server = start(&path, "web", Script::default());
    use std::io::{BufRead, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut reader = std::io::BufReader::new(raw.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    raw.write_all(b"{\"type\":\"restart-everything\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let answer: Response = serde_json::from_str(&line).unwrap();
    assert!(
        matches!(&answer, Response::Error { kind: ErrorKind::BadRequest, message } if message.contains("restart-everything")),
        "{answer:?}"
    );
}

#[test]
fn reload_waits_for_the_outcome() {
    let dir = TempDir::new("reload");
    let path = dir.socket("web");
    let script = Script {
        reload: Some(Ok(4)),
        ..Script::default()
    };
    let server = start(&path, "web", script);
    let started = std::time::Instant::now();
    assert_eq!(
        ask(&path, Request::Reload),
        [Response::Accepted, Response::Reloaded { generation: 4 }]
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(*server.seen.lock().unwrap(), ["reload"]);
}

#[test]
fn a_failed_reload_and_a_lost_one_are_errors() {
    let dir = TempDir::new("reload-fail");
    let path = dir.socket("web");
    let script = Script {
        reload: Some(Err(
            "slot 0 exited at start with status 3; rolled back".into()
        )),
        ..Script::default()
    };
    let _server = start(&path, "web", script);
    assert_eq!(
        ask(&path, Request::Reload),
        [
            Response::Accepted,
            Response::Error {
                kind: ErrorKind::Failed,
                message: "slot 0 exited at start with status 3; rolled back".into()
            }
        ]
    );

    let path = dir.socket("lost");
    let _server = start(&path, "lost", Script::default());
    let answers = ask(&path, Request::Reload);
    assert!(
        matches!(&answers[..], [Response::Accepted, Response::Error { kind: ErrorKind::Failed, message }] if message.contains("without an outcome")),
        "{answers:?}"
    );
}

#[test]
fn scale_passes_the_target_and_the_outcome() {
    let dir = TempDir::new("scale");
    let path = dir.socket("web");
    let script = Script {
        scale: Some(Ok(3)),
        ..Script::default()
    };
    let server = start(&path, "web", script);
    assert_eq!(
        ask(
            &path,
            Request::Scale {
                target: ScaleTarget::By(-1)
            }
        ),
        [Response::Accepted, Response::Scaled { workers: 3 }]
    );
    assert_eq!(*server.seen.lock().unwrap(), ["scale -1"]);

    let path = dir.socket("small");
    let script = Script {
        scale: Some(Err("a cluster keeps at least 1 worker".into())),
        ..Script::default()
    };
    let _server = start(&path, "small", script);
    let answers = ask(
        &path,
        Request::Scale {
            target: ScaleTarget::By(-5),
        },
    );
    assert!(matches!(
        &answers[..],
        [
            Response::Accepted,
            Response::Error {
                kind: ErrorKind::Failed,
                ..
            }
        ]
    ));
}

#[test]
fn stop_is_answered_with_the_pid_to_wait_for() {
    let dir = TempDir::new("stop");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());
    assert_eq!(
        ask(&path, Request::Stop),
        [
            Response::Accepted,
            Response::Stopping {
                pid: std::process::id()
            }
        ]
    );
    assert_eq!(*server.seen.lock().unwrap(), ["stop"]);
}

#[test]
fn a_supervisor_that_is_gone_fails_commands_clearly() {
    let dir = TempDir::new("gone");
    let path = dir.socket("web");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (commands, received) = tokio::sync::mpsc::channel(1);
    drop(received);
    let handle = ControlHandle {
        status: Arc::new(|| json!({})),
        commands,
        logs: LogBook::with_outputs(10, Box::new(std::io::sink()), Box::new(std::io::sink())),
    };
    let server = runtime.spawn(serve(bind(&path, "web").unwrap(), handle));
    let answers = ask(&path, Request::Reload);
    assert!(
        matches!(&answers[..], [Response::Error { kind: ErrorKind::Failed, message }] if message.contains("shutting down")),
        "{answers:?}"
    );
    server.abort();
}

fn feed(server: &Running, slot: usize, pid: u32, text: &'static str) {
    let logs = server.logs.clone();
    server
        .runtime
        .block_on(logs.pump(slot, pid, Stream::Stdout, text.as_bytes()));
}

fn log_texts(answers: &[Response]) -> Vec<String> {
    answers
        .iter()
        .filter_map(|answer| match answer {
            Response::Log(line) => Some(line.tagged()),
            _ => None,
        })
        .collect()
}

#[test]
fn logs_send_the_newest_lines_of_the_asked_slot() {
    let dir = TempDir::new("logs");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());
    feed(&server, 0, 100, "a0\nb0\nc0\n");
    feed(&server, 1, 101, "a1\nb1\n");
    let answers = ask(
        &path,
        Request::Logs {
            slot: Some(1),
            lines: 10,
            follow: false,
        },
    );
    assert_eq!(
        log_texts(&answers),
        ["[worker 1 pid 101] a1", "[worker 1 pid 101] b1"]
    );
    assert_eq!(answers.last(), Some(&Response::End));
    let answers = ask(
        &path,
        Request::Logs {
            slot: None,
            lines: 2,
            follow: false,
        },
    );
    assert_eq!(
        log_texts(&answers),
        ["[worker 1 pid 101] a1", "[worker 1 pid 101] b1"]
    );
}

#[test]
fn followed_logs_carry_new_lines_once_each() {
    let dir = TempDir::new("follow");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());
    feed(&server, 0, 100, "old\n");
    let client = Client::connect(&path).unwrap();
    let mut answers = client
        .request(&Request::Logs {
            slot: Some(0),
            lines: 5,
            follow: true,
        })
        .unwrap();
    answers.deadline(Duration::from_secs(10));
    let first = answers.next_response().unwrap().unwrap();
    assert!(matches!(&first, Response::Log(line) if line.line == "old"));
    feed(&server, 1, 101, "other slot\n");
    feed(&server, 0, 100, "new\n");
    let next = answers.next_response().unwrap().unwrap();
    assert!(
        matches!(&next, Response::Log(line) if line.line == "new"),
        "{next:?}"
    );
}

#[test]
fn the_directory_is_0700_and_the_socket_0600() {
    let dir = TempDir::new("modes");
    let path = dir.socket("web");
    let _server = start(&path, "web", Script::default());
    let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
    let socket_mode = std::fs::symlink_metadata(&path).unwrap().mode() & 0o777;
    assert_eq!((dir_mode, socket_mode), (0o700, 0o600));
    // Nothing is left beside the socket (the temporary name is gone).
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["web.sock"]);
}

#[test]
fn a_live_cluster_of_the_same_name_is_refused_and_a_stale_socket_replaced() {
    let dir = TempDir::new("names");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());
    let err = bind(&path, "web").unwrap_err().to_string();
    assert!(
        err.contains("`web` is already running") && err.contains("corral stop --name web"),
        "{err}"
    );
    // Another name beside it is fine.
    let _other = start(&dir.socket("api"), "api", Script::default());
    drop(server);

    // A socket whose primary died without cleaning up (SIGKILL).
    let path = dir.socket("stale");
    let orphan = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(orphan);
    assert!(path.exists());
    let _server = start(&path, "stale", Script::default());
    assert_eq!(Client::connect(&path).unwrap().hello().name, "stale");
}

#[test]
fn a_regular_file_in_the_way_is_not_deleted() {
    let dir = TempDir::new("file");
    let path = dir.socket("web");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "precious").unwrap();
    assert!(bind(&path, "web").is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn the_socket_is_removed_when_the_server_ends() {
    let dir = TempDir::new("cleanup");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());
    assert!(path.exists());
    server.server.abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!path.exists());
}

#[test]
fn a_too_long_path_or_bad_name_is_a_clear_error() {
    let long = PathBuf::from(format!("/tmp/{}/x.sock", "d".repeat(120)));
    let err = bind(&long, "x").unwrap_err().to_string();
    assert!(err.contains("--control"), "{err}");
    let err = bind(Path::new("/tmp/x.sock"), "../etc")
        .unwrap_err()
        .to_string();
    assert!(err.contains("--name"), "{err}");
}

/// Runs a client as `nobody` and returns the first line the server sent it
/// (or the connect error).
fn connect_as_nobody(path: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (uid, gid) = (nobody.uid, nobody.gid);
    let mut command = std::process::Command::new("/usr/bin/perl");
    command
        .arg("-MIO::Socket::UNIX")
        .arg("-e")
        .arg(r#"my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or do { print "connect: $!\n"; exit 0 }; print scalar <$s>;"#)
        .arg(path);
    // SAFETY: setgroups/setgid/setuid are async-signal-safe syscalls.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setgroups(&[]).map_err(std::io::Error::from)?;
            nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
            nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_client_of_another_uid_is_refused() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: running a client as nobody needs root");
        return;
    }
    let dir = TempDir::new("nobody");
    let path = dir.socket("web");
    let server = start(&path, "web", Script::default());

    // The modes alone keep nobody out...
    let answer = connect_as_nobody(&path);
    assert!(answer.contains("Permission denied"), "{answer}");

    // ...and with them loosened by mistake, the uid check still does.
    let parent = path.parent().unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answer = connect_as_nobody(&path);
    let answer: Response =
        serde_json::from_str(answer.trim()).unwrap_or_else(|err| panic!("{err}: {answer}"));
    assert!(
        matches!(&answer, Response::Error { kind: ErrorKind::Refused, message } if message.contains("uid 65534")),
        "{answer:?}"
    );
    // Nothing reached the supervisor.
    assert!(server.seen.lock().unwrap().is_empty());
}
