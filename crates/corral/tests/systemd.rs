//! systemd integration on real clusters: socket activation of the primary
//! (descriptors the test passes under `LISTEN_FDS`) and `sd_notify` to a
//! datagram socket the test creates as `NOTIFY_SOCKET`.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::Cluster;

/// `hello` run through `sh` so `LISTEN_PID` is the primary's own pid, with
/// `listener` at descriptor 3.
fn activated(listener: &std::net::TcpListener, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
        .arg("sh")
        .arg(support::hello_binary())
        .args(args)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("RUST_LOG", "info");
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; they put the test's listener at fd 3.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec set, so clear it instead.
            let result = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if result == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

#[test]
fn systemd_socket_activation_serves_the_passed_socket() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(128).unwrap();
    let listener: std::net::TcpListener = socket.into();
    let port = listener.local_addr().unwrap().port();
    // --listen names another port: the activated socket wins.
    let cluster = Cluster::start_command(activated(
        &listener,
        &["--listen", "127.0.0.1:1", "--workers", "2"],
    ));
    assert_eq!(cluster.addr.port(), port, "{}", cluster.banner);
    assert!(
        cluster.stderr().contains("socket web from systemd"),
        "{}",
        cluster.stderr()
    );
    let mut slots = std::collections::BTreeSet::new();
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            if let Ok((slot, _)) = cluster.hello() {
                slots.insert(slot);
            }
            slots.len() == 2
        }),
        "both workers serve the activated port"
    );
    // A stop leaves systemd's socket listening: systemd keeps it, and
    // queues on it, until the service starts again.
    let mut cluster = cluster;
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let _client = std::net::TcpStream::connect(("127.0.0.1", port))
        .expect("the activated socket still listens after the stop");
    let (_queued, _) = listener.accept().expect("the connection queued on it");
}

#[test]
fn systemd_notify_reports_ready_reloading_status_and_stopping() {
    let dir = std::env::temp_dir().join(format!("corral-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let notify = UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut command = support::command(
        &support::hello_binary(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--reload-gate",
            "100ms",
            "--min-uptime",
            "500ms",
        ],
    );
    command.env("NOTIFY_SOCKET", &path);
    let mut cluster = Cluster::start_command(command);
    let mut seen = Vec::new();
    let wait_for = |what: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m| m.contains(what)) {
            let n = notify
                .recv(&mut buf)
                .unwrap_or_else(|err| panic!("no {what}: {err}; got {seen:?}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    wait_for("READY=1", &mut seen);
    wait_for("STATUS=", &mut seen);
    cluster.signal(Signal::SIGHUP);
    wait_for("RELOADING=1", &mut seen);
    let reloading = seen
        .iter()
        .find(|m| m.contains("RELOADING=1"))
        .unwrap()
        .clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    cluster.signal(Signal::SIGTERM);
    wait_for("STOPPING=1", &mut seen);
    assert_eq!(cluster.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
