//! Binding the control socket owner-only, refusing a live cluster of the same
//! name and replacing the socket of one that is gone.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::path::{check_name, control_dir, MAX_SOCKET_PATH};
use crate::error::{Error, Result};

/// A bound control socket. Dropping it removes the socket file, unless another
/// primary has replaced it since.
#[derive(Debug)]
pub(crate) struct ControlListener {
    pub(super) listener: Option<UnixListener>,
    pub(super) name: String,
    path: PathBuf,
    /// (device, inode) of our socket file, to recognise it on drop.
    identity: (u64, u64),
}

impl ControlListener {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the control socket of the cluster `name` at `path`.
///
/// The directory is created 0700 when missing, and the default directory is
/// checked to be ours and 0700 (a directory someone else made in `/tmp` could
/// let them replace our socket). The socket is bound under a temporary name,
/// made 0600 and then hard-linked into place, so it is never reachable with a
/// looser mode and two primaries racing for one name cannot both win: `link`
/// fails where a rename would silently replace.
pub(crate) fn bind(path: &Path, name: &str) -> Result<ControlListener> {
    check_name(name).map_err(Error::Config)?;
    let display = path.display();
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::Config(format!(
            "the control socket path {display} is longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket; pass a shorter --control PATH"
        )));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    prepare_dir(&dir, dir == control_dir())?;

    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(|err| {
        Error::Config(format!(
            "cannot create the control socket {}: {err}; pass a writable --control PATH",
            temporary.display()
        ))
    })?;
    let placed = place(&temporary, path, name);
    let _ = std::fs::remove_file(&temporary);
    placed?;
    let meta = std::fs::symlink_metadata(path)?;
    listener.set_nonblocking(true)?;
    Ok(ControlListener {
        listener: Some(listener),
        name: name.to_owned(),
        path: path.to_owned(),
        identity: (meta.dev(), meta.ino()),
    })
}

fn prepare_dir(dir: &Path, is_default: bool) -> Result<()> {
    let cannot = |err: io::Error| {
        Error::Config(format!(
            "cannot create the control directory {}: {err}; pass --control PATH in a directory you can write",
            dir.display()
        ))
    };
    match std::fs::symlink_metadata(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(cannot),
        Err(err) => Err(cannot(err)),
        // Only the default directory is ours to fix; an explicit --control
        // may sit in a directory the user shares on purpose.
        Ok(meta) if is_default => {
            let uid = nix::unistd::getuid().as_raw();
            if !meta.is_dir() || meta.uid() != uid {
                return Err(Error::Config(format!(
                    "the control directory {} is not a directory owned by uid {uid}; remove it, or pass --control PATH elsewhere",
                    dir.display()
                )));
            }
            if meta.mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

fn place(temporary: &Path, path: &Path, name: &str) -> Result<()> {
    std::fs::set_permissions(temporary, std::fs::Permissions::from_mode(0o600))?;
    // Twice at most: once to find a stale socket, once after removing it.
    for _ in 0..3 {
        match std::fs::hard_link(temporary, path) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(Error::Config(format!(
                    "cannot create the control socket {}: {err}; pass a writable --control PATH",
                    path.display()
                )))
            }
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::Config(format!(
                    "a cluster named `{name}` is already running (control socket {}); stop it with `corral stop --name {name}`, or start this one with another --name",
                    path.display()
                )))
            }
            // Nobody listens: the primary that bound it is gone.
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused && is_socket(path) => {
                tracing::info!(path = %path.display(), "replacing the stale control socket of a primary that is gone");
                let _ = std::fs::remove_file(path);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(Error::Config(format!(
                    "{} exists and is not a control socket this user can reach ({err}); remove it, or pass another --control PATH",
                    path.display()
                )))
            }
        }
    }
    Err(Error::Config(format!(
        "another process keeps creating {}; pass another --control PATH",
        path.display()
    )))
}
