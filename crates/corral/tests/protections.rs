//! Clients that try to pin a worker or the primary, on real clusters of the
//! `hello` example: a held partial PROXY header, slow request heads and
//! bodies, idle keep-alive connections, more connections than the cap, and
//! more connections than the process has descriptors.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{wait_until, Cluster};

/// User plus system CPU time of a process, from /proc/PID/stat.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let (_, after) = stat.rsplit_once(") ").expect("stat format");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection (EOF or reset); how long
/// that took and what it sent.
fn until_closed(stream: &mut TcpStream) -> (Duration, String) {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("still open after {:?}", start.elapsed())
            }
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                panic!("still open after {:?}", start.elapsed())
            }
            Err(_) => break,
        }
    }
    (start.elapsed(), String::from_utf8_lossy(&seen).into_owned())
}

/// `GET /` on a keep-alive connection; the status line.
fn keep_alive_get(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains(')') {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(seen.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn a_held_partial_proxy_header_leaves_the_primary_idle_and_is_closed() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--proxy-protocol",
        "--header-timeout",
        "4s",
    ]);
    let mut held = connect(cluster.addr);
    held.write_all(b"PROXY TCP4 ").unwrap();
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_time(cluster.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(cluster.pid()) - before;
    eprintln!("primary CPU over 2 s with a held partial header: {used:?}");
    // A spinning reader burns the whole 2 s; an idle primary only wakes for
    // heartbeats.
    assert!(
        used < Duration::from_millis(200),
        "the primary used {used:?} of CPU in 2 s while a client held a partial header"
    );
    // Others are still served meanwhile, through a header of their own.
    let stream = connect(cluster.addr);
    let (status, body) = support::request_on(
        stream,
        cluster.addr,
        "/",
        b"PROXY TCP4 10.1.1.1 10.0.0.1 4000 80\r\n",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // --header-timeout closes the held one.
    let (_, sent) = until_closed(&mut held);
    let after = opened.elapsed();
    assert!(sent.is_empty(), "{sent:?}");
    assert!(
        after >= Duration::from_millis(3500) && after < Duration::from_secs(12),
        "closed after {after:?}, not at the 4 s header timeout"
    );
}

/// Watches `stream` from another thread: when (since `started`) the server
/// closed it, and what it sent before.
fn watch(stream: &TcpStream, started: Instant) -> std::thread::JoinHandle<(Duration, String)> {
    let mut stream = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let (_, answer) = until_closed(&mut stream);
        (started.elapsed(), answer)
    })
}

#[test]
fn slow_heads_and_slow_bodies_are_closed_at_the_header_timeout() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--header-timeout",
        "1s",
    ]);
    let addr = cluster.addr;
    let started = Instant::now();
    let silent = connect(addr);
    let mut half_head = connect(addr);
    half_head
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    let mut stalled_body = connect(addr);
    stalled_body
        .write_all(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n0123456789")
        .unwrap();
    let mut trickled_head = connect(addr);
    let mut trickled_body = connect(addr);
    trickled_body
        .write_all(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    // A head and a body that take their time but stay within the limits.
    let mut patient = connect(addr);
    patient
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t")
        .unwrap();
    let watched = [
        ("silent", watch(&silent, started)),
        ("half head", watch(&half_head, started)),
        ("stalled body", watch(&stalled_body, started)),
        ("trickled head", watch(&trickled_head, started)),
        ("trickled body", watch(&trickled_body, started)),
    ];
    let patient_answer = watch(&patient, started);

    // 5 bytes/s: a head that cannot complete in time, a body far below the
    // minimum rate. Writes fail once the server has closed; that is fine.
    let request = b"GET / HTTP/1.1\r\nHost: test\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for (i, byte) in request.iter().enumerate().take(15) {
        let _ = trickled_head.write_all(&[*byte]);
        let _ = trickled_body.write_all(b"x");
        match i {
            2 => patient
                .write_all(b"est\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
                .unwrap(),
            4 => patient.write_all(b"body").unwrap(),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, answer) = patient_answer.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("received 4 bytes\n"), "{answer:?}");
    for (name, watcher) in watched {
        let (closed, answer) = watcher.join().unwrap();
        assert!(!answer.contains("200 OK"), "{name}: answered {answer:?}");
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&closed),
            "{name}: closed after {closed:?} with --header-timeout 1s"
        );
    }
    // The closings were the timeouts, not the worker going away.
    assert_eq!(cluster.hello().unwrap().0, 0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--header-timeout",
        "1s",
        "--idle-timeout",
        "3s",
    ]);
    let mut stream = connect(cluster.addr);
    assert!(keep_alive_get(&mut stream).unwrap().contains("200"));
    // Idle past the header timeout, within the idle one: still open.
    std::thread::sleep(Duration::from_millis(1800));
    assert!(keep_alive_get(&mut stream).unwrap().contains("200"));
    let (idle, answer) = until_closed(&mut stream);
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        (Duration::from_millis(2500)..Duration::from_millis(5000)).contains(&idle),
        "closed after {idle:?} idle"
    );
}

#[test]
fn above_max_connections_a_connection_waits_in_the_queue_and_is_served_later() {
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--max-connections",
        "5",
    ]);
    let mut open: Vec<TcpStream> = (0..5).map(|_| connect(cluster.addr)).collect();
    for stream in &mut open {
        assert!(keep_alive_get(stream).unwrap().contains("200"));
    }
    let mut sixth = connect(cluster.addr);
    sixth
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    sixth
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut buf = [0u8; 256];
    match sixth.read(&mut buf) {
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the sixth connection was not held back: {other:?}"),
    }
    assert_eq!(
        support::accept_queue_len(cluster.addr.port()),
        1,
        "the sixth connection should wait in the kernel's accept queue"
    );
    drop(open.pop());
    let waited = Instant::now();
    sixth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (_, answer) = until_closed(&mut sixth);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        waited.elapsed() < Duration::from_secs(2),
        "{:?}",
        waited.elapsed()
    );
    assert!(cluster.stderr().contains("--max-connections"));
}

/// `count` connections that send nothing, opened without waiting: those
/// beyond the accept queue keep retrying their handshake.
fn idle_connections(addr: SocketAddr, count: usize) -> Vec<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    (0..count)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            match socket.connect(&addr.into()) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(err) => panic!("connect: {err}"),
            }
            socket
        })
        .collect()
}

/// A new connection's `GET /` answered, retried until `limit`; how long it took.
fn answered_within(addr: SocketAddr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            support::request_on(s, addr, "/", b"")
        });
        if matches!(attempt, Ok((200, _))) {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
fn out_of_descriptors_the_worker_keeps_serving_and_recovers() {
    support::raise_own_fd_limit();
    // A cap above the descriptor limit, so the worker really runs out.
    let cluster = support::start_with_fd_limit(
        1024,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--max-connections",
            "100000",
        ],
    );
    let worker = cluster.worker_pids()[0];
    let mut regular = connect(cluster.addr);
    assert!(keep_alive_get(&mut regular).unwrap().contains("200"));

    let idle = idle_connections(cluster.addr, 2100);
    assert!(
        wait_until(Duration::from_secs(10), || cluster
            .stderr()
            .contains("Too many open files")),
        "the worker never ran out of descriptors; it has {} open; stderr:\n{}",
        support::open_fds(worker),
        cluster.stderr()
    );
    let fds = support::open_fds(worker);
    eprintln!("worker out of descriptors: {fds} open (limit 1024)");
    assert!(fds >= 1000, "the worker has only {fds} descriptors open");
    // Out of descriptors, it goes on serving the connections it has, and
    // stays alive (heartbeats go on).
    for _ in 0..20 {
        assert!(keep_alive_get(&mut regular).unwrap().contains("200"));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cluster.worker_pids(),
        vec![worker],
        "the worker was replaced"
    );

    drop(idle);
    let took = answered_within(cluster.addr, Duration::from_secs(5));
    eprintln!("a new client answered {took:?} after 2,100 idle connections closed");
    assert!(
        took.is_some(),
        "no new client answered within 5 s of the idle ones closing; stderr:\n{}",
        cluster.stderr()
    );
    assert!(keep_alive_get(&mut regular).unwrap().contains("200"));
    assert!(
        wait_until(Duration::from_secs(5), || cluster
            .stderr()
            .contains("accepting again")),
        "{}",
        cluster.stderr()
    );
}

#[test]
fn the_default_connection_cap_keeps_the_worker_inside_its_descriptors() {
    support::raise_own_fd_limit();
    let cluster = support::start_with_fd_limit(
        1024,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--header-timeout",
            "2s",
        ],
    );
    // 1024 descriptors less an eighth of them.
    assert!(
        cluster.stderr().contains("--max-connections 896"),
        "{}",
        cluster.stderr()
    );
    let idle = idle_connections(cluster.addr, 2100);
    let workers = cluster.worker_pids();
    let mut most = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        most = workers
            .iter()
            .map(|&pid| support::open_fds(pid))
            .max()
            .unwrap()
            .max(most);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("most descriptors a capped worker held: {most} (cap 896, limit 1024)");
    assert!(
        (896..1024).contains(&most),
        "a worker held {most} descriptors (cap 896, limit 1024)"
    );
    assert!(
        !cluster.stderr().contains("Too many open files"),
        "{}",
        cluster.stderr()
    );
    // Another client is answered: the header timeout closed the idle
    // connections that held the places, and keeps closing those queued after them.
    let mut other = connect(cluster.addr);
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (waited, answer) = until_closed(&mut other);
    eprintln!("another client answered in {waited:?} after 3 s of 2,100 idle connections");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "after {waited:?}: {answer:?}"
    );
    let closed_by_server = |idle: &[socket2::Socket]| {
        idle.iter()
            .filter(|socket| {
                let mut byte = [std::mem::MaybeUninit::uninit()];
                !matches!(socket.recv(&mut byte), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || closed_by_server(&idle)
            == idle.len()),
        "only {} of {} idle connections were closed by the header timeout",
        closed_by_server(&idle),
        idle.len()
    );
    drop(idle);
}
