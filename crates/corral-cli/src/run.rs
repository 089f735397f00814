//! `corral run`: cluster a program that is not a corral worker.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::failure::Failure;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    cluster: corral::ClusterArgs,

    /// How long a started program must stay up to count as ready.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::parse_duration)]
    ready_after: Duration,

    /// The program to run, and its arguments (after `--`); a --config file may name them instead.
    #[arg(trailing_var_arg = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

/// Flags of corral workers that mean nothing for an external program, and why.
const WORKER_ONLY: &[(&str, &str, &str)] = &[
    (
        "heartbeat_timeout",
        "heartbeat-timeout",
        "an external program sends no heartbeats; corral watches it by its exit",
    ),
    (
        "max_requests",
        "max-requests",
        "corral does not see an external program's requests, so it cannot count them",
    ),
    (
        "max_requests_jitter",
        "max-requests-jitter",
        "corral does not see an external program's requests, so it cannot count them",
    ),
    (
        "proxy_protocol",
        "proxy-protocol",
        "the program reads its connections itself, PROXY header included",
    ),
    (
        "header_timeout",
        "header-timeout",
        "the program reads its requests itself; set its own header timeout",
    ),
    (
        "idle_timeout",
        "idle-timeout",
        "the program keeps its own connections; set its own keep-alive timeout",
    ),
    (
        "max_connections",
        "max-connections",
        "the program accepts its own connections; set its own connection limit",
    ),
];

/// `corral run --help` lists only the flags that apply.
pub(crate) fn hide_worker_only_flags(command: clap::Command) -> clap::Command {
    command.mut_subcommand("run", |run| {
        WORKER_ONLY.iter().fold(run, |run, (id, _, _)| {
            run.mut_arg(*id, |arg| arg.hide(true))
        })
    })
}

pub(crate) fn run(mut args: RunArgs, matches: &ArgMatches) -> Result<(), Failure> {
    let mut from_file = corral::ProgramSpec::default();
    let mut file_keys: Vec<String> = Vec::new();
    if let Some(path) = args.cluster.config.clone() {
        let mut file = corral::ConfigFile::load(&path).map_err(usage)?;
        from_file = file.take_program().map_err(usage)?;
        file_keys = file.keys().map(|key| key.replace('_', "-")).collect();
        file.apply(&mut args, matches).map_err(usage)?;
    }
    refuse_worker_only(matches, &file_keys)?;

    // A program on the command line replaces the file's, arguments and all.
    let (program, program_args): (OsString, Vec<OsString>) = match args.program.split_first() {
        Some((program, rest)) => (program.clone(), rest.to_vec()),
        None => match from_file.program.take() {
            Some(program) => (
                program.into(),
                from_file.args.iter().map(OsString::from).collect(),
            ),
            None => {
                return Err(Failure::Usage(
                    "no program to run; write `corral run [OPTIONS] -- PROGRAM [ARGS...]`, or name `program` in the --config file".into(),
                ))
            }
        },
    };
    for (key, value) in &from_file.env {
        // Before any thread exists: the workers inherit the primary's environment.
        std::env::set_var(key, value);
    }
    let name = args.cluster.name.clone().unwrap_or_else(|| {
        Path::new(&program)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "corral".to_owned())
    });
    args.cluster
        .builder()
        .name(name)
        .ready_after(args.ready_after)
        .run_command(&program, &program_args)
        .map_err(|err| Failure::Failed(err.to_string()))
}

fn usage(err: corral::Error) -> Failure {
    Failure::Usage(err.to_string())
}

/// Accepting these and doing nothing would let a user believe they protect
/// the service; they are refused instead, from the command line or the file.
fn refuse_worker_only(matches: &ArgMatches, file_keys: &[String]) -> Result<(), Failure> {
    for (id, flag, why) in WORKER_ONLY {
        let on_command_line = matches.value_source(id) == Some(ValueSource::CommandLine);
        if on_command_line || file_keys.iter().any(|key| key == flag) {
            let place = if on_command_line {
                "remove the flag"
            } else {
                "remove the key from the --config file"
            };
            return Err(Failure::Usage(format!(
                "--{flag} does not apply to `corral run`: {why}; {place}"
            )));
        }
    }
    Ok(())
}
