//! Reading an OpenMetrics exposition with Prometheus' own parser: the
//! Python client's strict one (`prometheus_client.openmetrics.parser`), so a
//! test checks `/metrics` the way a scraper reads it, not with a parser of
//! our own that could share our mistakes.

use std::io::Write;
use std::process::{Command, Stdio};

/// Parses stdin and prints the families as JSON (values as text: JSON has
/// no NaN or Inf).
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
print(json.dumps([
    {"name": f.name, "type": f.type,
     "samples": [{"name": s.name, "labels": s.labels, "value": str(s.value)} for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]))
"#;

/// Whether `python3` with `prometheus_client` is installed (`.ci/run`
/// installs it).
pub fn parser_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The families of `exposition` as a JSON array of
/// `{"name", "type", "samples": [{"name", "labels", "value"}]}`, or the
/// parser's complaint.
pub fn parse(exposition: &str) -> Result<String, String> {
    let mut python = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot start python3: {err}"))?;
    python
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .map_err(|err| format!("cannot write to the parser: {err}"))?;
    let output = python
        .wait_with_output()
        .map_err(|err| format!("the parser's output: {err}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
