//! The command-line flags every clustered program shares, so the examples,
//! the demo and user programs all speak the same interface.

use std::path::PathBuf;
use std::time::Duration;

use super::builder::ClusterBuilder;
use super::config::{Balance, Workers};

// The doc exists only for rustdoc: clap turns a flattened struct's doc comment
// into the `about` of every program that uses it, code fences and all.
#[cfg_attr(
    any(doc, doctest),
    doc = r#"The standard flags of a clustered program, for `#[command(flatten)]` in a
clap parser: `--listen`, `--workers`, `--balance` and the supervision knobs.

```
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    cluster: corral::ClusterArgs,
}

let cli = Cli::parse_from(["app", "--listen", "127.0.0.1:0", "--workers", "2"]);
assert_eq!(cli.cluster.workers, corral::Workers::Fixed(2));
let builder = cli.cluster.builder();
# drop(builder);
```"#
)]
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Address to listen on, HOST:PORT (repeatable; port 0 picks a free port).
    #[arg(
        short,
        long = "listen",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: Vec<String>,

    /// Number of worker processes, or `max` for one per core.
    #[arg(short, long, value_name = "N|max", default_value = "max")]
    pub workers: Workers,

    /// How connections are spread over the workers [default: reuseport].
    #[arg(long, value_enum)]
    pub balance: Option<Balance>,

    /// Read a PROXY protocol v1/v2 header on each connection (accept-and-pass modes).
    #[arg(long)]
    pub proxy_protocol: bool,

    /// Serve /status, /metrics and a dashboard on this address (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<String>,

    /// The cluster's name, for `corral status --name NAME` [default: the program's file name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The control socket [default: $XDG_RUNTIME_DIR/corral/NAME.sock, else /tmp/corral-UID/NAME.sock].
    #[arg(long = "control", value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Read flags from this TOML file (keys are the long flags); flags on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Run the workers as this user; the primary binds the sockets first (start it as root).
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    pub user: Option<String>,

    /// Run the workers with this group [default: the --user's group].
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub group: Option<String>,

    /// Kill and replace a worker whose event loop sends no heartbeat for this long (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,

    /// Kill a new worker that is not serving after this long (e.g. 10s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// On stop or reload, kill workers still draining after this long (e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// On stop, keep serving this long after telling the workers the node is draining (readiness fails), then drain (e.g. 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    pub drain_delay: Duration,

    /// A worker that crashes before serving this long counts towards the crash loop (e.g. 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_uptime: Option<Duration>,

    /// During a reload, each new worker must stay ready this long before the next slot moves (e.g. 2s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub reload_gate: Option<Duration>,

    /// Replace a worker after about this many requests.
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,

    /// Random extra requests (0..=N) added per worker to --max-requests.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests_jitter: u64,

    /// Replace a worker whose resident memory exceeds this (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,

    /// Close a connection that has not sent a complete request head in this long (new or keep-alive).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    pub header_timeout: Duration,

    /// Close a keep-alive connection idle for this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,

    /// Open connections per worker above which it stops accepting until one closes [default: from the descriptor limit].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
}

impl ClusterArgs {
    /// Parses the command line like [`clap::Parser::parse`], then fills in
    /// every flag the command line did not give from `--config FILE` (TOML
    /// whose keys are the long flags, the program's own flags included); on
    /// a usage or config-file error it prints the reason and exits with
    /// status 2.
    ///
    /// ```no_run
    /// use clap::Parser;
    ///
    /// #[derive(Parser)]
    /// struct Cli {
    ///     #[command(flatten)]
    ///     cluster: corral::ClusterArgs,
    /// }
    ///
    /// // app --config app.toml --workers 2
    /// let cli: Cli = corral::ClusterArgs::parse_with_config();
    /// # drop(cli);
    /// ```
    pub fn parse_with_config<P: clap::Parser>() -> P {
        Self::try_parse_with_config_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
    }

    /// [`parse_with_config`](Self::parse_with_config) from the given
    /// arguments, returning the error instead of exiting.
    ///
    /// ```
    /// use clap::Parser;
    ///
    /// #[derive(Parser)]
    /// struct Cli {
    ///     #[command(flatten)]
    ///     cluster: corral::ClusterArgs,
    /// }
    ///
    /// let path = std::env::temp_dir().join(format!("corral-doc-{}.toml", std::process::id()));
    /// std::fs::write(&path, "workers = 3\nheartbeat-timeout = \"2s\"\n").unwrap();
    /// let argv = ["app", "--config", path.to_str().unwrap(), "--workers", "2"];
    /// let cli: Cli = corral::ClusterArgs::try_parse_with_config_from(argv).unwrap();
    /// assert_eq!(cli.cluster.workers, corral::Workers::Fixed(2));
    /// assert_eq!(cli.cluster.heartbeat_timeout, Some(std::time::Duration::from_secs(2)));
    /// # std::fs::remove_file(path).unwrap();
    /// ```
    pub fn try_parse_with_config_from<P, I, T>(args: I) -> Result<P, clap::Error>
    where
        P: clap::Parser,
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = P::command();
        let matches = command.try_get_matches_from_mut(args)?;
        let mut parsed = P::from_arg_matches(&matches).map_err(|err| err.format(&mut command))?;
        let Some(path) = matches.try_get_one::<PathBuf>("config").ok().flatten() else {
            return Ok(parsed);
        };
        super::config_file::ConfigFile::load(path)
            .and_then(|file| file.apply_with(P::command(), &mut parsed, &matches))
            .map_err(|err| {
                command.error(clap::error::ErrorKind::ValueValidation, err.to_string())
            })?;
        Ok(parsed)
    }

    /// A [`ClusterBuilder`] configured from these flags.
    pub fn builder(&self) -> ClusterBuilder {
        let mut builder = crate::Cluster::builder()
            .workers(self.workers)
            .proxy_protocol(self.proxy_protocol);
        if let Some(balance) = self.balance {
            builder = builder.balance(balance);
        }
        for addr in &self.listen {
            builder = builder.listen(addr.clone());
        }
        if let Some(timeout) = self.heartbeat_timeout {
            builder = builder.heartbeat_timeout(timeout);
        }
        if let Some(timeout) = self.ready_timeout {
            builder = builder.ready_timeout(timeout);
        }
        if let Some(timeout) = self.shutdown_timeout {
            builder = builder.shutdown_timeout(timeout);
        }
        builder = builder.drain_delay(self.drain_delay);
        if let Some(admin) = &self.admin {
            builder = builder.admin(admin.clone());
        }
        if let Some(gate) = self.reload_gate {
            builder = builder.reload_gate(gate);
        }
        if let Some(name) = &self.name {
            builder = builder.name(name.clone());
        }
        if let Some(path) = &self.control {
            builder = builder.control_path(path.clone());
        }
        if let Some(user) = &self.user {
            builder = builder.user(user.clone());
        }
        if let Some(group) = &self.group {
            builder = builder.group(group.clone());
        }
        if let Some(uptime) = self.min_uptime {
            builder = builder.min_uptime(uptime);
        }
        if let Some(requests) = self.max_requests {
            builder = builder.max_requests(requests, self.max_requests_jitter);
        }
        if let Some(bytes) = self.max_memory {
            builder = builder.max_memory(bytes);
        }
        builder = builder
            .header_timeout(self.header_timeout)
            .idle_timeout(self.idle_timeout);
        if let Some(connections) = self.max_connections {
            builder = builder.max_connections(connections);
        }
        builder
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("`{text}` is not a duration ({err}); write e.g. 5s or 500ms"))
}

/// A user name that exists here, or a numeric uid (as `chown` takes them).
fn parse_user(text: &str) -> Result<String, String> {
    if text.parse::<u32>().is_ok() {
        return Ok(text.to_owned());
    }
    match nix::unistd::User::from_name(text) {
        Ok(Some(_)) => Ok(text.to_owned()),
        Ok(None) => Err(format!(
            "there is no user `{text}` on this system; create it (useradd --system {text}) or name another"
        )),
        Err(err) => Err(format!("cannot look up user `{text}`: {err}")),
    }
}

/// A group name that exists here, or a numeric gid.
fn parse_group(text: &str) -> Result<String, String> {
    if text.parse::<u32>().is_ok() {
        return Ok(text.to_owned());
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(_)) => Ok(text.to_owned()),
        Ok(None) => Err(format!(
            "there is no group `{text}` on this system; create it (groupadd --system {text}) or name another"
        )),
        Err(err) => Err(format!("cannot look up group `{text}`: {err}")),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("`{text}` is not a size: write e.g. 512M or 2G")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("`{text}` is not a size: write e.g. 512M or 2G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_keeps_the_programs_own_about_and_no_doc_example() {
        use clap::CommandFactory;

        /// My service.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(help.starts_with("My service"), "{help}");
        assert!(!help.contains("```") && !help.contains("derive"), "{help}");
        assert!(help.contains("--name <NAME>") && help.contains("--config <FILE>"));
    }

    #[test]
    fn users_and_groups_must_exist() {
        assert_eq!(parse_user("root"), Ok("root".to_owned()));
        assert_eq!(parse_user("65534"), Ok("65534".to_owned()));
        assert!(parse_user("no-such-user-corral")
            .unwrap_err()
            .contains("no user `no-such-user-corral`"));
        assert_eq!(parse_group("root"), Ok("root".to_owned()));
        assert!(parse_group("no-such-group-corral")
            .unwrap_err()
            .contains("no group"));
    }

    #[test]
    fn sizes_accept_common_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }
}
