//! `--config FILE`: the flags of a clustered program written down in TOML,
//! the analog of PM2's ecosystem file.
//!
//! The keys are the long flags (`workers = 4`, `heartbeat-timeout = "5s"`,
//! `listen = ["127.0.0.1:8080", "[::1]:8080"]`; `_` may stand for `-`). Each
//! value is handed to the flag's own clap parser, so the file accepts exactly
//! what the command line accepts, for every flag of the program (its own
//! included) without a second list of them to keep in step. A flag given on
//! the command line wins over the file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

use crate::error::{Error, Result};

/// A parsed `--config FILE`, ready to fill in the flags the command line left out.
///
/// Most programs call [`ClusterArgs::parse_with_config`](crate::ClusterArgs::parse_with_config)
/// instead; this is for parsers with subcommands, where the flags live in a
/// subcommand's matches.
///
/// ```
/// use clap::{CommandFactory, FromArgMatches, Parser};
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     cluster: corral::ClusterArgs,
/// }
///
/// let matches = Cli::command().get_matches_from(["app", "--workers", "3"]);
/// let mut cli = Cli::from_arg_matches(&matches).unwrap();
/// let file = corral::ConfigFile::parse("app.toml", "workers = 8\nlisten = \"127.0.0.1:0\"\n").unwrap();
/// file.apply(&mut cli.cluster, &matches).unwrap();
/// assert_eq!(cli.cluster.workers, corral::Workers::Fixed(3)); // the flag won
/// assert_eq!(cli.cluster.listen, ["127.0.0.1:0"]);            // the file filled in
/// ```
#[derive(Debug, Clone)]
pub struct ConfigFile {
    origin: PathBuf,
    text: String,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// As written in the file.
    key: String,
    span: Range<usize>,
    value: toml::Value,
}

/// What a config file says `corral run` runs: the keys `program`, `args` and `env`.
///
/// ```
/// let mut file = corral::ConfigFile::parse(
///     "web.toml",
///     "program = \"python3\"\nargs = [\"server.py\"]\nenv = { PYTHONUNBUFFERED = \"1\" }\n",
/// )
/// .unwrap();
/// let run = file.take_program().unwrap();
/// assert_eq!(run.program.as_deref(), Some("python3"));
/// assert_eq!(run.args, ["server.py"]);
/// assert_eq!(run.env, [("PYTHONUNBUFFERED".to_owned(), "1".to_owned())]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramSpec {
    /// The program to run.
    pub program: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables set in its environment.
    pub env: Vec<(String, String)>,
}

impl ConfigFile {
    /// Reads and parses the TOML file at `path`.
    ///
    /// ```
    /// let err = corral::ConfigFile::load("/nonexistent.toml").unwrap_err();
    /// assert!(err.to_string().contains("/nonexistent.toml"));
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<ConfigFile> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::Config(format!(
                "cannot read the config file {} (--config): {err}",
                path.display()
            ))
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`; `origin` names the file in error messages.
    ///
    /// ```
    /// let err = corral::ConfigFile::parse("app.toml", "workers = 2\nworkers = 3\n").unwrap_err();
    /// assert!(err.to_string().starts_with("config file app.toml, line 2:"));
    /// ```
    pub fn parse(origin: impl AsRef<Path>, text: &str) -> Result<ConfigFile> {
        let origin = origin.as_ref().to_owned();
        let table: std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
            toml::from_str(text).map_err(|err| {
                let line = err.span().map(|span| line_of(text, span.start));
                // toml's message is one line; its Display adds a code excerpt.
                let message = err.message().trim_end().to_owned();
                match line {
                    Some(line) => Error::Config(format!(
                        "config file {}, line {line}: {message}",
                        origin.display()
                    )),
                    None => Error::Config(format!("config file {}: {message}", origin.display())),
                }
            })?;
        let mut entries: Vec<Entry> = table
            .into_iter()
            .map(|(key, value)| Entry {
                span: key.span(),
                key: key.into_inner(),
                value: value.into_inner(),
            })
            .collect();
        entries.sort_by_key(|entry| entry.span.start);
        Ok(ConfigFile {
            origin,
            text: text.to_owned(),
            entries,
        })
    }

    /// Removes and returns the keys only `corral run` understands.
    pub fn take_program(&mut self) -> Result<ProgramSpec> {
        let mut spec = ProgramSpec::default();
        if let Some(entry) = self.take("program") {
            spec.program = Some(match entry.value {
                toml::Value::String(program) => program,
                _ => return Err(self.error(&entry, "`program` is the program to run, a string")),
            });
        }
        if let Some(entry) = self.take("args") {
            spec.args = match &entry.value {
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| scalar(item).ok_or(()))
                    .collect::<std::result::Result<_, ()>>()
                    .map_err(|()| self.error(&entry, "`args` is a list of strings"))?,
                _ => {
                    return Err(
                        self.error(&entry, "`args` is a list of strings, e.g. [\"server.py\"]")
                    )
                }
            };
        }
        if let Some(entry) = self.take("env") {
            spec.env = match &entry.value {
                toml::Value::Table(table) => table
                    .iter()
                    .map(|(key, value)| scalar(value).map(|value| (key.clone(), value)).ok_or(()))
                    .collect::<std::result::Result<_, ()>>()
                    .map_err(|()| self.error(&entry, "`env` maps names to strings"))?,
                _ => {
                    return Err(self.error(
                        &entry,
                        "`env` is a table, e.g. env = { RUST_LOG = \"info\" }",
                    ))
                }
            };
        }
        Ok(spec)
    }

    /// The keys the file sets, as written, in file order.
    ///
    /// ```
    /// let file = corral::ConfigFile::parse("app.toml", "workers = 2\nmax_memory = \"1G\"\n").unwrap();
    /// assert_eq!(file.keys().collect::<Vec<_>>(), ["workers", "max_memory"]);
    /// ```
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|entry| entry.key.as_str())
    }

    fn take(&mut self, key: &str) -> Option<Entry> {
        let index = self.entries.iter().position(|entry| entry.key == key)?;
        Some(self.entries.remove(index))
    }

    /// Sets every flag of `target` that the file names and the command line
    /// (`matches`, which `target` was parsed from) did not give.
    ///
    /// An unknown key, a value of the wrong type or one the flag's parser
    /// rejects is an error naming the key and its line.
    pub fn apply<T: clap::Args>(&self, target: &mut T, matches: &ArgMatches) -> Result<()> {
        self.apply_with(T::augment_args(Command::new("config")), target, matches)
    }

    /// [`apply`](Self::apply) with the whole parser's command, so the
    /// program's own flags can be set from the file too.
    pub(crate) fn apply_with(
        &self,
        command: Command,
        target: &mut impl clap::FromArgMatches,
        matches: &ArgMatches,
    ) -> Result<()> {
        // The flags as a parser of the file's values alone: no defaults (they
        // would overwrite what the command line set) and nothing required.
        let command = command
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true)
            .subcommand_required(false)
            .arg_required_else_help(false)
            .mut_args(|arg| {
                arg.default_value(None)
                    .default_missing_value(None)
                    .required(false)
            });
        let mut tokens: Vec<String> = Vec::new();
        for entry in &self.entries {
            let flag = entry.key.replace('_', "-");
            let Some(arg) = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(flag.as_str()) && flag != "config")
            else {
                let keys: Vec<&str> = command
                    .get_arguments()
                    .filter_map(|arg| arg.get_long())
                    .filter(|long| *long != "config")
                    .collect();
                return Err(self.error(
                    entry,
                    &format!(
                        "unknown key `{}`; the keys are the long flags: {}",
                        entry.key,
                        keys.join(", ")
                    ),
                ));
            };
            let given = matches.value_source(arg.get_id().as_str());
            if matches!(
                given,
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let mine = self.tokens(entry, &flag, arg.get_action())?;
            // One flag at a time first, so an error names its own line.
            if let Err(err) = command.clone().try_get_matches_from(&mine) {
                return Err(self.error(entry, &format!("`{}`: {}", entry.key, clap_reason(&err))));
            }
            tokens.extend(mine);
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let from_file = command.try_get_matches_from(&tokens).map_err(|err| {
            Error::Config(format!(
                "config file {}: {}",
                self.origin.display(),
                clap_reason(&err)
            ))
        })?;
        target.update_from_arg_matches(&from_file).map_err(|err| {
            Error::Config(format!(
                "config file {}: {}",
                self.origin.display(),
                clap_reason(&err)
            ))
        })
    }

    /// The command-line spelling of one entry.
    fn tokens(&self, entry: &Entry, flag: &str, action: &ArgAction) -> Result<Vec<String>> {
        let wrong = |what: &str| self.error(entry, &format!("`{}` {what}", entry.key));
        match action {
            ArgAction::SetTrue | ArgAction::SetFalse => match entry.value {
                toml::Value::Boolean(on) => {
                    let wanted = matches!(action, ArgAction::SetTrue);
                    Ok(if on == wanted {
                        vec![format!("--{flag}")]
                    } else {
                        vec![]
                    })
                }
                _ => Err(wrong("is a switch: write true or false")),
            },
            ArgAction::Count => match entry.value {
                toml::Value::Integer(times) if times >= 0 => {
                    Ok(vec![format!("--{flag}"); times as usize])
                }
                _ => Err(wrong("is a count: write a whole number")),
            },
            ArgAction::Append => {
                let items: Vec<&toml::Value> = match &entry.value {
                    toml::Value::Array(items) => items.iter().collect(),
                    single => vec![single],
                };
                items
                    .into_iter()
                    .map(|item| {
                        scalar(item)
                            .map(|value| format!("--{flag}={value}"))
                            .ok_or_else(|| wrong("takes strings or numbers, or a list of them"))
                    })
                    .collect()
            }
            _ => match scalar(&entry.value) {
                Some(value) => Ok(vec![format!("--{flag}={value}")]),
                None if matches!(entry.value, toml::Value::Array(_)) => {
                    Err(wrong("takes one value, not a list"))
                }
                None => Err(wrong("takes a string or a number")),
            },
        }
    }

    fn error(&self, entry: &Entry, message: &str) -> Error {
        Error::Config(format!(
            "config file {}, line {}: {message}",
            self.origin.display(),
            line_of(&self.text, entry.span.start)
        ))
    }
}

/// A value as the command line would spell it.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(number) => Some(number.to_string()),
        toml::Value::Float(number) => Some(number.to_string()),
        toml::Value::Boolean(on) => Some(on.to_string()),
        _ => None,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// clap's one-line reason, without its `error: ` prefix and usage footer.
fn clap_reason(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterArgs, Workers};
    use clap::{CommandFactory, FromArgMatches, Parser};
    use std::time::Duration;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The program's own flag.
        #[arg(long, default_value = "data")]
        data_dir: String,
    }

    fn with_file(argv: &[&str], toml: &str) -> Result<Cli> {
        let argv: Vec<&str> = std::iter::once("app").chain(argv.iter().copied()).collect();
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        let file = ConfigFile::parse("app.toml", toml)?;
        file.apply_with(Cli::command(), &mut cli, &matches)?;
        Ok(cli)
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_left_out() {
        let cli = with_file(
            &["--workers", "2"],
            r#"
workers = 6
listen = ["127.0.0.1:0", "127.0.0.2:0"]
heartbeat-timeout = "2s"
drain-delay = "5s"
max_memory = "512M"
proxy-protocol = true
balance = "least-conn"
data-dir = "/var/lib/app"
"#,
        )
        .unwrap();
        assert_eq!(cli.cluster.workers, Workers::Fixed(2));
        assert_eq!(cli.cluster.listen, ["127.0.0.1:0", "127.0.0.2:0"]);
        assert_eq!(cli.cluster.heartbeat_timeout, Some(Duration::from_secs(2)));
        assert_eq!(cli.cluster.drain_delay, Duration::from_secs(5));
        assert_eq!(cli.cluster.max_memory, Some(512 << 20));
        assert!(cli.cluster.proxy_protocol);
        assert_eq!(cli.cluster.balance, Some(crate::Balance::LeastConnections));
        assert_eq!(cli.data_dir, "/var/lib/app");
    }

    #[test]
    fn command_line_lists_replace_the_files() {
        let cli = with_file(&["-l", "127.0.0.9:1"], "listen = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(cli.cluster.listen, ["127.0.0.9:1"]);
        // And without the flag the defaults stay when the file is silent.
        let cli = with_file(&[], "workers = 3\n").unwrap();
        assert_eq!(cli.cluster.listen, ["127.0.0.1:8080"]);
        assert_eq!(cli.data_dir, "data");
    }

    #[test]
    fn an_unknown_key_names_itself_and_its_line() {
        let err = with_file(&[], "workers = 2\n\nwokers = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config file app.toml, line 3: unknown key `wokers`"),
            "{err}"
        );
        assert!(err.contains("workers, balance"), "{err}");
        let err = with_file(&[], "config = \"other.toml\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `config`"), "{err}");
    }

    #[test]
    fn a_wrong_type_or_value_names_the_key_and_line() {
        let cases = [
            (
                "workers = \"many\"\n",
                "line 1: `workers`: invalid value 'many'",
            ),
            (
                "\nproxy-protocol = \"yes\"\n",
                "line 2: `proxy-protocol` is a switch",
            ),
            (
                "heartbeat-timeout = \"soon\"\n",
                "line 1: `heartbeat-timeout`: invalid value 'soon'",
            ),
            (
                "workers = [1, 2]\n",
                "line 1: `workers` takes one value, not a list",
            ),
            (
                "[workers]\nx = 1\n",
                "line 1: `workers` takes a string or a number",
            ),
            ("workers = \n", "line 1:"),
        ];
        for (toml, expected) in cases {
            let err = with_file(&[], toml).unwrap_err().to_string();
            assert!(err.contains(expected), "{toml:?}: {err}");
        }
    }

    #[test]
    fn the_run_keys_are_taken_out_and_refused_elsewhere() {
        let mut file = ConfigFile::parse(
            "run.toml",
            "program = \"python3\"\nargs = [\"server.py\", 8]\nenv = { A = \"1\", B = 2 }\nworkers = 2\n",
        )
        .unwrap();
        let spec = file.take_program().unwrap();
        assert_eq!(spec.program.as_deref(), Some("python3"));
        assert_eq!(spec.args, ["server.py", "8"]);
        assert_eq!(
            spec.env,
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(file.entries.len(), 1);

        let err = with_file(&[], "program = \"python3\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `program`"), "{err}");
        let mut bad = ConfigFile::parse("run.toml", "args = \"server.py\"\n").unwrap();
        assert!(bad
            .take_program()
            .unwrap_err()
            .to_string()
            .contains("line 1: `args` is a list"));
    }
}
