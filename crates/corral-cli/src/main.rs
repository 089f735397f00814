//! `corral`: cluster any program on every core, and operate running clusters.
//!
//! ```text
//! corral run -w max -l :8080 -- python3 server.py
//! corral list
//! corral status --name server
//! corral reload
//! corral scale +1
//! corral logs --slot 1 -f
//! corral monit
//! corral stop
//! ```
//!
//! `run` starts the program as a supervised cluster: it gets its listening
//! sockets by systemd's socket-activation convention (descriptors 3, 4, ...,
//! `LISTEN_FDS`, `LISTEN_PID`) and its slot in `CORRAL_INSTANCE`. Every other
//! verb talks to a running cluster over its control socket.

mod failure;
mod format;
mod list;
mod logs;
mod monit;
mod operate;
mod run;
mod status;
mod target;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use target::Target;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Cluster a network service on every core, and operate it",
    after_help = "Exit status: 0 done; 1 the operation failed (the reason on stderr); 2 usage error or no such cluster."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PROGRAM as a supervised cluster sharing the --listen sockets.
    #[command(
        override_usage = "corral run [OPTIONS] -- PROGRAM [ARGS]...\n       corral run --config FILE [OPTIONS]"
    )]
    Run(Box<run::RunArgs>),
    /// The running clusters of this user: name, pid, workers, listen addresses, uptime.
    List {
        /// Print a JSON array of the clusters' status objects.
        #[arg(long)]
        json: bool,
    },
    /// Every worker of a cluster: state, restarts, CPU, memory, requests, event loop, pool.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status object as JSON (the admin address's /status).
        #[arg(long)]
        json: bool,
    },
    /// Rolling reload: replace every worker with the new build, one slot at a time.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Give up waiting after this long (e.g. 2m); the reload goes on.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Change the number of workers: N, +K or -K; waits until that many serve.
    Scale {
        #[command(flatten)]
        target: Target,
        /// The new count (e.g. 4), or a change (+1, -2).
        #[arg(value_name = "N|+K|-K", allow_hyphen_values = true)]
        count: corral::control::ScaleTarget,
        /// Give up waiting after this long; the scaling goes on.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Graceful stop: the workers drain, then the primary exits.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Give up waiting for the primary to exit after this long.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// The workers' recent output, each line tagged with slot and pid.
    Logs {
        #[command(flatten)]
        target: Target,
        /// Only this slot's lines.
        #[arg(long, value_name = "N")]
        slot: Option<usize>,
        /// How many of the newest lines to show.
        #[arg(long, value_name = "N", default_value_t = 50)]
        lines: usize,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
    },
    /// A live terminal view: a row per worker, req/s sparklines and the log tail (q quits).
    Monit {
        #[command(flatten)]
        target: Target,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("`{text}` is not a duration ({err}); write e.g. 1s or 500ms"))
}

fn main() -> ExitCode {
    let mut command = run::hide_worker_only_flags(Cli::command());
    let matches = command.get_matches_mut();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.format(&mut command).exit());
    if !matches!(cli.command, Command::Run(_)) {
        restore_sigpipe();
    }
    let outcome = match cli.command {
        Command::Run(args) => {
            let run_matches = matches
                .subcommand_matches("run")
                .expect("clap matched the run subcommand");
            run::run(*args, run_matches)
        }
        Command::List { json } => list::list(json),
        Command::Status { target, json } => status::status(&target, json),
        Command::Reload { target, timeout } => operate::reload(&target, timeout),
        Command::Scale {
            target,
            count,
            timeout,
        } => operate::scale(&target, count, timeout),
        Command::Stop { target, timeout } => operate::stop(&target, timeout),
        Command::Logs {
            target,
            slot,
            lines,
            follow,
        } => logs::logs(&target, slot, lines, follow),
        Command::Monit { target } => monit::monit(&target),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// The reading verbs are used in pipes (`corral logs | head`): a closed pipe
/// ends them quietly, as it does other commands. Not for `run`, whose
/// primary must outlive a reader of its output going away.
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default has no
    // preconditions; no other thread exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
