//! The admin dashboard as a browser shows it: Debian's Chromium, headless,
//! loads `/` from a real cluster, runs the page's script against `/status`
//! for a few (virtual) seconds and dumps the DOM it rendered.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Cluster;

fn chromium_installed() -> bool {
    Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// What the page showed: its rows' cells, its totals line, and what the
/// browser said on stderr (console messages and script errors).
struct Capture {
    rows: Vec<Vec<String>>,
    totals: String,
    console: String,
}

/// Loads the dashboard and dumps its DOM after `budget_ms` of virtual time
/// (the page refreshes every second; network waits do not use the budget).
fn capture(admin: SocketAddr, budget_ms: u64) -> Capture {
    let profile = std::env::temp_dir().join(format!(
        "corral-dashboard-{}-{}",
        std::process::id(),
        budget_ms
    ));
    let browser = Command::new("chromium")
        .args([
            "--headless",
            // Chromium's sandbox refuses to run as root (CI runs as root).
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(format!("http://{admin}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let pid = browser.id();
    // Bounded: a browser that hangs fails the test instead of stalling it.
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if !support::process_alive(pid as i32) {
                return false;
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        true
    });
    let output = browser.wait_with_output().expect("chromium's output");
    let timed_out = watchdog.join().unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let console = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !timed_out && output.status.success(),
        "chromium failed ({:?}): {console}",
        output.status
    );
    let body = between(&dom, "<tbody id=\"rows\">", "</tbody>")
        .unwrap_or_else(|| panic!("no rows in the page:\n{dom}"));
    let rows = body
        .split("<tr>")
        .filter(|row| row.contains("<td"))
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| text_of(cell.split_once('>').map_or("", |(_, rest)| rest)))
                .collect()
        })
        .collect();
    let totals = between(&dom, "<p id=\"totals\">", "</p>")
        .map(text_of)
        .unwrap_or_default();
    Capture {
        rows,
        totals,
        console,
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(&text[from..to])
}

/// A cell's text, tags dropped (up to the cell's end).
fn text_of(html: &str) -> String {
    let html = html.split("</td>").next().unwrap_or("");
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.trim().to_owned()
}

/// The header cells of the page, to find columns by name.
const COLUMNS: [&str; 15] = [
    "slot",
    "pid",
    "gen",
    "state",
    "uptime s",
    "restarts",
    "last exit",
    "CPU %",
    "RSS MiB",
    "req/s",
    "req/s, last minute",
    "conns",
    "loop p99 ms",
    "pool queued",
    "draining",
];

fn column(name: &str) -> usize {
    COLUMNS.iter().position(|c| *c == name).unwrap()
}

fn number(cell: &str) -> f64 {
    cell.parse()
        .unwrap_or_else(|_| panic!("{cell:?} is not a number"))
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = support::get_once(admin, "/status").unwrap();
    serde_json::from_str(&body).unwrap()
}

fn no_script_errors(capture: &Capture) {
    for line in capture.console.lines() {
        assert!(
            !(line.contains("Uncaught") || line.contains("CONSOLE") && line.contains("rror")),
            "the page's script failed: {line}"
        );
    }
}

#[test]
fn dashboard_shows_a_row_per_worker_and_figures_that_move_under_load() {
    let test = "dashboard_shows_a_row_per_worker_and_figures_that_move_under_load";
    if !chromium_installed() {
        eprintln!("skipped: {test} (chromium not installed)");
        return;
    }
    let cluster = Cluster::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = cluster.admin_addr();
    let pids: BTreeSet<String> = cluster
        .worker_pids()
        .iter()
        .map(|pid| pid.to_string())
        .collect();
    assert_eq!(pids.len(), 2);

    // Idle: a row per worker, with its pid, nothing served (once both
    // workers' first figures are in).
    assert!(support::wait_until(Duration::from_secs(10), || {
        let status = status(admin);
        let workers = status["workers"].as_array().unwrap();
        workers.len() == 2 && workers.iter().all(|w| w["rss_bytes"].as_u64() > Some(0))
    }));
    let idle = capture(admin, 2500);
    no_script_errors(&idle);
    assert_eq!(idle.rows.len(), 2, "rows: {:?}", idle.rows);
    let shown: BTreeSet<String> = idle
        .rows
        .iter()
        .map(|row| row[column("pid")].clone())
        .collect();
    assert_eq!(shown, pids, "the pids /proc knows");
    let reported: BTreeSet<String> = status(admin)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].to_string())
        .collect();
    assert_eq!(shown, reported, "the pids /status reports");
    for (slot, row) in idle.rows.iter().enumerate() {
        assert_eq!(row.len(), COLUMNS.len(), "{row:?}");
        assert_eq!(row[column("slot")], slot.to_string());
        assert_eq!(row[column("state")], "ready");
        // Empty until the primary has two samples to tell a rate from.
        let rps = &row[column("req/s")];
        assert!(rps.is_empty() || number(rps) == 0.0, "{row:?}");
        assert!(number(&row[column("RSS MiB")]) > 0.0, "{row:?}");
        assert!(
            row[column("req/s, last minute")]
                .chars()
                .all(|bar| bar == '▁'),
            "{row:?}"
        );
    }
    assert!(idle.totals.contains(" 0.0 req/s"), "{}", idle.totals);

    // Under a bounded load (two clients, a connection per request so the
    // kernel spreads them over both workers, at most 60 s), once the primary
    // has figures for both workers.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, sent, addr) = (stop.clone(), sent.clone(), cluster.addr);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if matches!(support::get_once(addr, "/work?us=200"), Ok((200, _))) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let loaded = support::wait_until(Duration::from_secs(20), || {
        let status = status(admin);
        let workers = status["workers"].as_array().unwrap();
        workers.len() == 2
            && workers.iter().all(|w| {
                w["requests_per_s"].as_f64().unwrap_or(0.0) > 0.0
                    && w["cpu_percent"].as_f64().unwrap_or(0.0) > 0.0
            })
    });
    let busy = if loaded {
        Some(capture(admin, 3500))
    } else {
        None
    };
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let busy = busy.unwrap_or_else(|| {
        panic!(
            "the load never reached both workers ({} requests sent): {}",
            sent.load(Ordering::Relaxed),
            status(admin)
        )
    });
    no_script_errors(&busy);
    assert_eq!(busy.rows.len(), 2, "rows: {:?}", busy.rows);
    let mut total_rps = 0.0;
    for row in &busy.rows {
        assert!(pids.contains(&row[column("pid")]), "{row:?}");
        let rps = number(&row[column("req/s")]);
        assert!(rps > 0.0, "req/s under load: {row:?}");
        total_rps += rps;
        assert!(
            number(&row[column("CPU %")]) > 0.0,
            "CPU % under load: {row:?}"
        );
        assert!(
            row[column("req/s, last minute")]
                .chars()
                .any(|bar| bar != '▁'),
            "the sparkline rises: {row:?}"
        );
    }
    assert_ne!(busy.totals, idle.totals);
    assert!(
        !busy.totals.contains(" 0.0 req/s"),
        "totals under load: {}",
        busy.totals
    );
    assert!(total_rps > 0.0);
}
