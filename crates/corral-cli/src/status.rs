//! `corral status`: every worker of one cluster, as a table or as the JSON
//! status object.

use corral::control::{Client, Request, Response};
use serde_json::Value;

use crate::failure::Failure;
use crate::format::{bytes, fixed, table, text, uptime};
use crate::target::Target;

pub(crate) fn status(target: &Target, json: bool) -> Result<(), Failure> {
    let status = fetch(target.connect()?)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("a JSON value serializes")
        );
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// The status object of the cluster `client` is connected to.
pub(crate) fn fetch(client: Client) -> Result<Value, Failure> {
    let mut answers = client.request(&Request::Status)?;
    match answers.next_response()? {
        Some(Response::Status { status }) => Ok(status),
        Some(Response::Error { message, .. }) => Err(Failure::Failed(message)),
        Some(other) => Err(Failure::Failed(format!(
            "the cluster answered {other:?} to a status request"
        ))),
        None => Err(Failure::Failed(
            "the cluster closed the connection without a status (is it stopping?)".into(),
        )),
    }
}

/// The table `corral status` prints.
pub(crate) fn render(status: &Value) -> String {
    let mut out = String::new();
    let listen: Vec<String> = status["listen"]
        .as_array()
        .map(|addrs| addrs.iter().map(text).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "{} (pid {}) · {} · up {} · balance {}\n\n",
        text(&status["name"]),
        text(&status["pid"]),
        if listen.is_empty() {
            "not listening".to_owned()
        } else {
            format!("listening on {}", listen.join(", "))
        },
        uptime(&status["uptime_s"]),
        text(&status["balance"]),
    ));
    let header = [
        "SLOT",
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
    ];
    let rows: Vec<Vec<String>> = workers(status)
        .iter()
        .map(|worker| {
            vec![
                text(&worker["slot"]),
                text(&worker["pid"]),
                text(&worker["generation"]),
                text(&worker["state"]),
                uptime(&worker["uptime_s"]),
                text(&worker["restarts"]),
                text(&worker["last_exit"]),
                fixed(&worker["cpu_percent"], 1),
                bytes(&worker["rss_bytes"]),
                fixed(&worker["requests_per_s"], 1),
                text(&worker["connections"]),
                match fixed(&worker["loop_delay_p99_ms"], 1).as_str() {
                    "-" => "-".to_owned(),
                    ms => format!("{ms} ms"),
                },
                text(&worker["pool_queued"]),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows, &[0, 1, 2, 5, 7, 8, 9, 10, 11, 12]));
    out.push('\n');
    out.push_str(&format!(
        "last reload: {}\n",
        last_reload(&status["last_reload"])
    ));
    if let Some(line) = stopping(status) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Says so while the cluster is stopping (older primaries send no field).
fn stopping(status: &Value) -> Option<String> {
    if status["stopping"] != Value::Bool(true) {
        return None;
    }
    Some(match status["drain_delay_left_s"].as_f64() {
        Some(left) => format!(
            "stopping: the node is draining; workers still serve for {left:.1} s (--drain-delay)"
        ),
        None => "stopping: workers are draining".to_owned(),
    })
}

pub(crate) fn workers(status: &Value) -> Vec<Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

fn last_reload(reload: &Value) -> String {
    if reload.is_null() {
        return "none yet".to_owned();
    }
    let mut line = text(&reload["outcome"]).replace('_', " ");
    if !reload["generation"].is_null() {
        line.push_str(&format!(" (generation {})", text(&reload["generation"])));
    }
    if !reload["reason"].is_null() {
        line.push_str(&format!(": {}", text(&reload["reason"])));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stopping_cluster_says_so_with_its_drain_delay() {
        let table = [
            (json!({"stopping": false}), None),
            (json!({}), None),
            (
                json!({"stopping": true, "drain_delay_left_s": 4.5}),
                Some(
                    "stopping: the node is draining; workers still serve for 4.5 s (--drain-delay)",
                ),
            ),
            (
                json!({"stopping": true, "drain_delay_left_s": null}),
                Some("stopping: workers are draining"),
            ),
        ];
        for (status, expected) in table {
            assert_eq!(stopping(&status).as_deref(), expected, "{status}");
        }
    }

    #[test]
    fn the_table_shows_every_field_of_a_worker() {
        let status = json!({
            "name": "payments", "pid": 4100, "balance": "reuseport", "uptime_s": 3700,
            "listen": ["127.0.0.1:8080"],
            "workers": [
                {"slot": 0, "pid": 4101, "generation": 3, "state": "ready", "uptime_s": 12.5,
                 "restarts": 1, "last_exit": "killed by signal 9", "cpu_percent": 48.0,
                 "rss_bytes": 6553600, "requests_per_s": 5120.0, "connections": 12,
                 "loop_delay_p99_ms": 1.2, "pool_queued": 0},
                {"slot": 1, "pid": 4102, "generation": 3, "state": "starting", "uptime_s": null,
                 "restarts": 0, "last_exit": null, "cpu_percent": null, "rss_bytes": null,
                 "requests_per_s": null, "connections": null, "loop_delay_p99_ms": null,
                 "pool_queued": null}
            ],
            "last_reload": {"outcome": "rolled_back", "generation": 3, "reason": "slot 0 died"}
        });
        let out = render(&status);
        assert!(out.starts_with("payments (pid 4100) · listening on 127.0.0.1:8080 · up 1h 01m · balance reuseport\n"), "{out}");
        let row = out.lines().find(|l| l.contains("4101")).unwrap();
        for cell in [
            "ready",
            "12s",
            "killed by signal 9",
            "48.0",
            "6.2 MiB",
            "5120.0",
            "12",
            "1.2 ms",
        ] {
            assert!(row.contains(cell), "{cell} missing from {row}");
        }
        assert!(out
            .lines()
            .any(|l| l.contains("4102") && l.contains("starting")));
        assert!(
            out.contains("last reload: rolled back (generation 3): slot 0 died"),
            "{out}"
        );
    }
}
