//! `corral list`: the running clusters of this user.

use serde_json::Value;

use crate::failure::Failure;
use crate::format::{table, text, uptime};
use crate::status::{fetch, workers};
use crate::target::discover;

pub(crate) fn list(json: bool) -> Result<(), Failure> {
    let mut clusters: Vec<Value> = Vec::new();
    for found in discover() {
        let name = found.client.hello().name.clone();
        match fetch(found.client) {
            Ok(mut status) => {
                if status["name"].is_null() {
                    status["name"] = Value::String(name);
                }
                clusters.push(status);
            }
            // It stopped between the two looks; it is not running any more.
            Err(err) => eprintln!("corral: skipping {}: {err}", found.path.display()),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&clusters).expect("JSON values serialize")
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|status| {
            let all = workers(status);
            let ready = all.iter().filter(|w| w["state"] == "ready").count();
            let listen: Vec<String> = status["listen"]
                .as_array()
                .map(|addrs| addrs.iter().map(text).collect())
                .unwrap_or_default();
            vec![
                text(&status["name"]),
                text(&status["pid"]),
                format!("{ready}/{}", all.len()),
                listen.join(","),
                uptime(&status["uptime_s"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NAME", "PID", "WORKERS", "LISTEN", "UPTIME"],
            &rows,
            &[1, 2]
        )
    );
    Ok(())
}
