//! Which cluster a verb talks to: `--name`, `--control`, or the one running
//! cluster of this user.

use std::path::PathBuf;

use corral::control::{control_dir, socket_path, Client, ClientError};

use crate::failure::Failure;

/// `--name NAME` or `--control PATH`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// The cluster's --name [default: the one cluster of this user that is running].
    #[arg(long, value_name = "NAME", conflicts_with = "control")]
    name: Option<String>,
    /// The cluster's control socket, for a cluster started with --control PATH.
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,
}

/// A cluster found in the control directory.
pub(crate) struct Found {
    pub path: PathBuf,
    pub client: Client,
}

impl Target {
    /// Connects to the cluster this target names.
    pub(crate) fn connect(&self) -> Result<Client, Failure> {
        let path = self.resolve()?;
        Client::connect(&path).map_err(|err| match (&err, &self.name) {
            (ClientError::NotRunning { .. }, Some(name)) => Failure::Usage(format!(
                "no cluster named `{name}` is running (no live socket at {}); `corral list` shows the running ones",
                path.display()
            )),
            _ => err.into(),
        })
    }

    /// The control socket of the cluster this target names.
    pub(crate) fn resolve(&self) -> Result<PathBuf, Failure> {
        match (&self.control, &self.name) {
            (Some(path), _) => Ok(path.clone()),
            (None, Some(name)) => Ok(socket_path(name, None)),
            (None, None) => {
                let mut running = discover();
                match running.len() {
                    1 => Ok(running.remove(0).path),
                    0 => Err(Failure::Usage(format!(
                        "no cluster of this user is running (no live socket in {}); start one, or pass --control PATH for one started with --control",
                        control_dir().display()
                    ))),
                    _ => {
                        let names: Vec<String> =
                            running.iter().map(|f| f.client.hello().name.clone()).collect();
                        Err(Failure::Usage(format!(
                            "{} clusters are running ({}); pick one with --name NAME",
                            names.len(),
                            names.join(", ")
                        )))
                    }
                }
            }
        }
    }
}

/// The live clusters in this user's control directory, by name. Sockets
/// nobody listens on any more (a primary that was killed) are removed.
pub(crate) fn discover() -> Vec<Found> {
    let dir = control_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".sock") && !name.starts_with('.')
        })
        .collect();
    paths.sort();
    let mut found = Vec::new();
    for path in paths {
        match Client::connect(&path) {
            Ok(client) => found.push(Found { path, client }),
            Err(ClientError::NotRunning { .. }) => {
                use std::os::unix::fs::FileTypeExt;
                let stale =
                    std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.file_type().is_socket());
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(err) => eprintln!("corral: skipping {}: {err}", path.display()),
        }
    }
    found
}
