//! Where a cluster's control socket lives, so that the primary and the
//! `corral` command find the same file from nothing but the cluster's name.

use std::path::{Path, PathBuf};

/// The directory of this user's control sockets: `$XDG_RUNTIME_DIR/corral`,
/// or `/tmp/corral-UID` without `XDG_RUNTIME_DIR`.
///
/// ```
/// let dir = corral::control::control_dir();
/// assert!(dir.ends_with("corral") || dir.to_string_lossy().starts_with("/tmp/corral-"));
/// ```
pub fn control_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if !runtime.is_empty() => Path::new(&runtime).join("corral"),
        _ => PathBuf::from(format!("/tmp/corral-{}", nix::unistd::getuid())),
    }
}

/// The control socket of the cluster `name`: `explicit` (`--control PATH`)
/// when given, else `NAME.sock` in [`control_dir`].
///
/// ```
/// use std::path::Path;
///
/// let explicit = corral::control::socket_path("web", Some(Path::new("/run/web.sock")));
/// assert_eq!(explicit, Path::new("/run/web.sock"));
/// let default = corral::control::socket_path("web", None);
/// assert_eq!(default, corral::control::control_dir().join("web.sock"));
/// ```
pub fn socket_path(name: &str, explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(path) => path.to_owned(),
        None => control_dir().join(format!("{name}.sock")),
    }
}

/// The default `--name`: the file name the program was started as.
///
/// ```
/// assert!(!corral::control::default_name().is_empty());
/// ```
pub fn default_name() -> String {
    let from_argv = std::env::args_os()
        .next()
        .and_then(|arg0| Path::new(&arg0).file_name().map(|n| n.to_owned()));
    let from_exe = || {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.file_name().map(|n| n.to_owned()))
    };
    from_argv
        .or_else(from_exe)
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| check_name(name).is_ok())
        .unwrap_or_else(|| "corral".to_owned())
}

/// Names become file names in a shared directory, so they may not climb out
/// of it or hide as dot files.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'));
    if fine {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a cluster name: use up to 64 letters, digits, `-`, `_`, `.`, `@` or `+`, not starting with `.` (--name)"
        ))
    }
}

/// `sun_path` holds 108 bytes including the terminating NUL.
pub(crate) const MAX_SOCKET_PATH: usize = 107;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_the_directory_are_refused() {
        assert!(check_name("payments").is_ok());
        assert!(check_name("api-v2.eu@blue").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
