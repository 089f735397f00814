//! `corral`: cluster any program on every core.
//!
//! ```text
//! corral run -w max -l :8080 -- python3 server.py
//! ```
//!
//! The program gets its listening sockets by systemd's socket-activation
//! convention (descriptors 3, 4, ..., `LISTEN_FDS`, `LISTEN_PID`) and its slot
//! in `CORRAL_INSTANCE`; corral supervises it like any of its own workers.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Cluster a network service on every core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PROGRAM as a supervised cluster sharing the --listen sockets.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    cluster: corral::ClusterArgs,

    /// How long a started program must stay up to count as ready.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    ready_after: Duration,

    /// The program to run, and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("`{text}` is not a duration ({err}); write e.g. 1s or 500ms"))
}

fn main() -> ExitCode {
    let Command::Run(args) = Cli::parse().command;
    let Some((program, program_args)) = args.program.split_first() else {
        eprintln!("corral: no program to run; write `corral run [OPTIONS] -- PROGRAM [ARGS...]`");
        return ExitCode::from(2);
    };
    let result = args
        .cluster
        .builder()
        .ready_after(args.ready_after)
        .run_command(program, program_args);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("corral: {err}");
            ExitCode::FAILURE
        }
    }
}
