//! The verbs that change a cluster, each blocking until the change is over:
//! `reload`, `scale` and `stop`.

use std::time::{Duration, Instant};

use corral::control::{ClientError, Request, Response, ScaleTarget};

use crate::failure::Failure;
use crate::target::Target;

pub(crate) fn reload(target: &Target, timeout: Option<Duration>) -> Result<(), Failure> {
    let client = target.connect()?;
    let name = client.hello().name.clone();
    eprintln!("corral: reloading `{name}`, one slot at a time...");
    match command(client, &Request::Reload, timeout, "reload")? {
        Response::Reloaded { generation } => {
            println!("reloaded `{name}`: every slot runs generation {generation}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub(crate) fn scale(
    target: &Target,
    count: ScaleTarget,
    timeout: Option<Duration>,
) -> Result<(), Failure> {
    let client = target.connect()?;
    let name = client.hello().name.clone();
    match command(
        client,
        &Request::Scale { target: count },
        timeout,
        "scaling",
    )? {
        Response::Scaled { workers } => {
            println!("scaled `{name}`: {workers} workers serving");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub(crate) fn stop(target: &Target, timeout: Option<Duration>) -> Result<(), Failure> {
    let client = target.connect()?;
    let name = client.hello().name.clone();
    let started = Instant::now();
    let pid = match command(client, &Request::Stop, timeout, "stop")? {
        Response::Stopping { pid } => pid,
        other => return Err(unexpected(other)),
    };
    eprintln!("corral: stopping `{name}` (pid {pid}); its workers are draining...");
    loop {
        if gone(pid) {
            println!("stopped `{name}`");
            return Ok(());
        }
        if let Some(limit) = timeout {
            if started.elapsed() >= limit {
                return Err(Failure::Failed(format!(
                    "`{name}` (pid {pid}) is still running after {}; its workers may still be draining (--shutdown-timeout)",
                    humantime::format_duration(limit)
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a command and waits for its outcome: the answer after
/// [`Response::Accepted`], or the failure.
fn command(
    client: corral::control::Client,
    request: &Request,
    timeout: Option<Duration>,
    what: &str,
) -> Result<Response, Failure> {
    let mut answers = client.request(request)?;
    if let Some(limit) = timeout {
        answers.deadline(limit);
    }
    loop {
        match answers.next_response() {
            Ok(Some(Response::Accepted)) => continue,
            Ok(Some(Response::Error { message, .. })) => return Err(Failure::Failed(message)),
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => {
                return Err(Failure::Failed(format!(
                    "the cluster closed the connection before the {what} was over (did the primary exit?)"
                )))
            }
            Err(ClientError::Timeout(limit)) => {
                return Err(Failure::Failed(format!(
                    "the {what} is not over after {}; it goes on in the cluster (`corral status` shows it)",
                    humantime::format_duration(limit)
                )))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

fn unexpected(answer: Response) -> Failure {
    Failure::Failed(format!(
        "the cluster answered {answer:?}, which this corral does not expect"
    ))
}

/// True once `pid` has exited (a zombie its parent has not reaped counts as gone).
fn gone(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        match procfs::process::Process::new(pid as i32).and_then(|process| process.stat()) {
            Err(_) => true,
            Ok(stat) => matches!(stat.state, 'Z' | 'X'),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err()
    }
}
