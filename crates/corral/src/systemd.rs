//! systemd integration: `sd_notify` readiness and status messages, and the
//! listening sockets of socket activation.
//!
//! Written by hand rather than with a crate: the notify protocol is one
//! datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`, and socket activation is
//! three environment variables; the crates that wrap them (`sd-notify`,
//! `listenfd`) add nothing we would use and lack the `LISTEN_FDNAMES` + pid
//! checks together.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service
/// manager. Without `NOTIFY_SOCKET` (not started by systemd with
/// `Type=notify`) it does nothing and returns `Ok(false)`.
pub(crate) fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy();
    let address = if let Some(name) = socket.strip_prefix('@') {
        abstract_address(name)?
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(&*socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={socket} is neither a path nor an @abstract name"),
        ));
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(state.as_bytes(), &address)?;
    Ok(true)
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket addresses exist only on Linux",
    ))
}

/// Logs a failed notification instead of failing the cluster over it.
fn send(state: &str) {
    if let Err(err) = notify(state) {
        tracing::warn!("sd_notify({}): {err}", state.replace('\n', " "));
    }
}

/// The service is up (the listening line was printed).
pub(crate) fn ready() {
    send("READY=1");
}

/// A reload begins; follow with [`ready`] once it is over. systemd wants the
/// monotonic clock with it (`Type=notify-reload`).
pub(crate) fn reloading() {
    send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// The graceful stop begins.
pub(crate) fn stopping() {
    send("STOPPING=1");
}

/// A one-line summary for `systemctl status`.
pub(crate) fn status(line: &str) {
    // A newline would start another assignment.
    send(&format!("STATUS={}", line.replace('\n', " ")));
}

/// Tells the watchdog the supervisor is alive.
pub(crate) fn watchdog() {
    send("WATCHDOG=1");
}

/// How often to call [`watchdog`]: half of `WATCHDOG_USEC`, as
/// `sd_watchdog_enabled(3)` advises; `None` when no watchdog is set for this
/// process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog every `interval` for as long as the task runs. Spawn it
/// on the supervisor's (single-threaded) runtime: a supervisor whose event
/// loop is stuck stops pinging, and systemd restarts the service.
pub(crate) async fn watchdog_loop(interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        watchdog();
    }
}

/// The one-line summary for [`status`], from the status object of
/// interfaces.md: `4/4 workers ready · generation 3 · 5120 req/s`, plus the
/// last reload when it did not complete.
pub(crate) fn status_line(status: &serde_json::Value) -> String {
    let workers = status["workers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ready = workers.iter().filter(|w| w["state"] == "ready").count();
    let generation = workers
        .iter()
        .filter_map(|w| w["generation"].as_u64())
        .max();
    // fold, not sum: an empty f64 sum is -0.0, printed "-0".
    let rate = workers
        .iter()
        .filter_map(|w| w["requests_per_s"].as_f64())
        .fold(0.0, |total, rate| total + rate);
    let mut line = format!("{ready}/{} workers ready", workers.len());
    if let Some(generation) = generation {
        line.push_str(&format!(" · generation {generation}"));
    }
    line.push_str(&format!(" · {rate:.0} req/s"));
    let reload = &status["last_reload"];
    if let Some(outcome) = reload["outcome"].as_str().filter(|o| *o != "completed") {
        line.push_str(&format!(" · last reload {}", outcome.replace('_', " ")));
        if let Some(reason) = reload["reason"].as_str() {
            line.push_str(&format!(": {reason}"));
        }
    }
    line
}

fn monotonic_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

/// A socket systemd passed us, with its `FileDescriptorName=` if it has one.
#[derive(Debug)]
pub(crate) struct ListenFd {
    pub fd: OwnedFd,
    pub name: Option<String>,
}

/// The first descriptor of socket activation.
const SD_LISTEN_FDS_START: RawFd = 3;

/// The sockets handed over by socket activation (`LISTEN_FDS` descriptors from
/// fd 3, named by `LISTEN_FDNAMES`), empty when there are none or they are
/// meant for another process (`LISTEN_PID`). Takes them: the variables are
/// removed, so the workers never see them (they get their own), and the
/// descriptors made close-on-exec. Call it once, early, before threads start.
pub(crate) fn listen_fds() -> io::Result<Vec<ListenFd>> {
    let found = listen_fds_from(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::env::var("LISTEN_FDNAMES").ok().as_deref(),
        std::process::id(),
    );
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    let (count, names) = match found? {
        Some(found) => found,
        None => return Ok(Vec::new()),
    };
    let mut fds = Vec::with_capacity(count);
    for index in 0..count {
        let raw = SD_LISTEN_FDS_START + index as RawFd;
        // SAFETY: fcntl on a descriptor number only reads its flags.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
            return Err(io::Error::other(format!(
                "LISTEN_FDS={count} but descriptor {raw} is not open; check the socket unit"
            )));
        }
        // SAFETY: systemd passed these descriptors to this process (LISTEN_PID
        // is ours) and nothing else in it owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        fds.push(ListenFd {
            fd,
            name: names.get(index).cloned().filter(|n| !n.is_empty()),
        });
    }
    Ok(fds)
}

/// The parsing of [`listen_fds`]: `None` when socket activation does not
/// apply to process `pid`, else the count and names.
fn listen_fds_from(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> io::Result<Option<(usize, Vec<String>)>> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(None);
    }
    let count: usize = listen_fds.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS={listen_fds} is not a count of descriptors"),
        )
    })?;
    let names: Vec<String> = match names {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => Vec::new(),
    };
    if !names.is_empty() && names.len() != count {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "LISTEN_FDNAMES names {} sockets but LISTEN_FDS={count}",
                names.len()
            ),
        ));
    }
    Ok(Some((count, names)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// The environment is process-wide; these tests take turns with it.
    static ENV: Mutex<()> = Mutex::new(());

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notify_reaches_a_path_socket_with_each_message() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let path = std::env::temp_dir().join(format!("corral-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);

        ready();
        assert_eq!(receive(&socket), "READY=1");
        reloading();
        let reload = receive(&socket);
        let mut lines = reload.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reload:?}"));
        let diff = monotonic_usec().abs_diff(usec);
        assert!(
            diff < 5_000_000,
            "MONOTONIC_USEC is {diff} µs off the clock"
        );
        stopping();
        assert_eq!(receive(&socket), "STOPPING=1");
        status("2 workers\nready");
        assert_eq!(receive(&socket), "STATUS=2 workers ready");
        watchdog();
        assert_eq!(receive(&socket), "WATCHDOG=1");

        std::env::remove_var("NOTIFY_SOCKET");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::linux::net::SocketAddrExt;
        let name = format!("corral-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(notify("READY=1").unwrap());
        assert_eq!(receive(&socket), "READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
    }

    #[test]
    fn the_status_line_sums_the_cluster_up() {
        let status = serde_json::json!({
            "workers": [
                {"state": "ready", "generation": 3, "requests_per_s": 100.4},
                {"state": "starting", "generation": 4, "requests_per_s": null},
            ],
            "last_reload": {"outcome": "rolled_back", "generation": 4, "reason": "slot 1 died at start"}
        });
        assert_eq!(
            status_line(&status),
            "1/2 workers ready · generation 4 · 100 req/s · last reload rolled back: slot 1 died at start"
        );
        assert_eq!(
            status_line(&serde_json::json!({"workers": [], "last_reload": null})),
            "0/0 workers ready · 0 req/s"
        );
    }

    #[test]
    fn the_watchdog_loop_pings_on_its_interval() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let path =
            std::env::temp_dir().join(format!("corral-watchdog-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // The first ping is at once, then one per interval: about 6 in 520 ms.
        runtime.block_on(async {
            let _ = tokio::time::timeout(
                Duration::from_millis(520),
                watchdog_loop(Duration::from_millis(100)),
            )
            .await;
        });
        std::env::remove_var("NOTIFY_SOCKET");
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = socket.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            pings += 1;
        }
        // A loaded machine may delay a tick, never add one.
        assert!((3..=6).contains(&pings), "{pings} pings");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").unwrap());
        std::env::set_var("NOTIFY_SOCKET", "relative/path");
        assert!(notify("READY=1").is_err());
        std::env::remove_var("NOTIFY_SOCKET");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_us() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("WATCHDOG_USEC", "10000000");
        std::env::remove_var("WATCHDOG_PID");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(5)));
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(5)));
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var("WATCHDOG_PID");
        std::env::remove_var("WATCHDOG_USEC");
        assert_eq!(watchdog_interval(), None);
    }

    #[test]
    fn listen_fds_parsing_checks_the_pid_and_the_names() {
        assert_eq!(listen_fds_from(None, None, None, 7).unwrap(), None);
        assert_eq!(
            listen_fds_from(Some("8"), Some("2"), None, 7).unwrap(),
            None
        );
        assert_eq!(
            listen_fds_from(Some("7"), Some("2"), None, 7).unwrap(),
            Some((2, vec![]))
        );
        assert_eq!(
            listen_fds_from(Some("7"), Some("2"), Some("http:admin"), 7).unwrap(),
            Some((2, vec!["http".to_owned(), "admin".to_owned()]))
        );
        assert!(listen_fds_from(Some("7"), Some("2"), Some("http"), 7).is_err());
        assert!(listen_fds_from(Some("7"), Some("two"), None, 7).is_err());
    }

    /// The real thing: a child process gets a listening socket at fd 3 the
    /// way systemd passes it, and the test harness re-runs this test in it.
    #[test]
    fn listen_fds_takes_inherited_sockets() {
        const CHILD: &str = "CORRAL_TEST_LISTEN_FDS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let fds = listen_fds().unwrap();
            assert_eq!(fds.len(), 1);
            assert_eq!(fds[0].name.as_deref(), Some("web"));
            assert_eq!(fds[0].fd.as_raw_fd(), 3);
            let flags = nix::fcntl::fcntl(&fds[0].fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(nix::fcntl::FdFlag::from_bits_truncate(flags)
                .contains(nix::fcntl::FdFlag::FD_CLOEXEC));
            assert!(std::env::var_os("LISTEN_FDS").is_none());
            let listener = std::net::TcpListener::from(fds.into_iter().next().unwrap().fd);
            let addr = listener.local_addr().unwrap();
            let expected: std::net::SocketAddr =
                std::env::var("EXPECTED_ADDR").unwrap().parse().unwrap();
            assert_eq!(addr, expected);
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let source = listener.as_raw_fd();
        // LISTEN_PID must be the child's pid, known only after fork: run the
        // test binary through `sh -c 'LISTEN_PID=$$ exec ...'`, whose exec
        // keeps the pid, as corral's own spawn does.
        let mut wrapped = std::process::Command::new("/bin/sh");
        wrapped
            .arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
            .arg("sh")
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "systemd::tests::listen_fds_takes_inherited_sockets",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("EXPECTED_ADDR", addr.to_string())
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "web");
        use std::os::unix::process::CommandExt;
        // SAFETY: dup2 and fcntl are async-signal-safe; `source` was opened before the fork.
        unsafe {
            wrapped.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec set.
                if source == 3 && libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if source != 3 && libc::dup2(source, 3) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = wrapped.output().unwrap();
        assert!(
            output.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("1 passed"));
    }
}
