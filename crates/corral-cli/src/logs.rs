//! `corral logs`: the workers' recent output, tagged with slot and pid.

use std::io::Write;

use corral::control::{Request, Response};

use crate::failure::Failure;
use crate::target::Target;

pub(crate) fn logs(
    target: &Target,
    slot: Option<usize>,
    lines: usize,
    follow: bool,
) -> Result<(), Failure> {
    let client = target.connect()?;
    let mut answers = client.request(&Request::Logs {
        slot,
        lines,
        follow,
    })?;
    let stdout = std::io::stdout();
    loop {
        match answers.next_response()? {
            Some(Response::Log(line)) => {
                let mut out = stdout.lock();
                let _ = writeln!(out, "{}", line.tagged());
                // Followed lines should show up as they come, even in a pipe.
                if follow {
                    let _ = out.flush();
                }
            }
            Some(Response::Skipped { lines }) => {
                eprintln!("corral: {lines} lines skipped (this reader fell behind)");
            }
            Some(Response::End) => return Ok(()),
            Some(Response::Error { message, .. }) => return Err(Failure::Failed(message)),
            Some(_) => continue,
            None if follow => {
                eprintln!("corral: the cluster closed the connection (it stopped)");
                return Ok(());
            }
            None => {
                return Err(Failure::Failed(
                    "the cluster closed the connection before sending every line".into(),
                ))
            }
        }
    }
}
