//! `--user` and `--group`: the primary binds its sockets (as root, for a
//! low port) and its workers run as an unprivileged user.

use nix::unistd::{Gid, Group, Uid, User};

use crate::error::{Error, Result};

/// Who the workers run as, resolved before any fork (the child may not
/// allocate, so the group list is computed here).
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

/// Resolves `--user` (name or number) and `--group` (default: the user's
/// primary group). `None` when neither is given.
pub(crate) fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let user = match user {
        Some(text) => Some(find_user(text)?),
        None => None,
    };
    let gid = match (group, &user) {
        (Some(text), _) => find_group(text)?,
        (None, Some(user)) => user.gid,
        (None, None) => Gid::current(),
    };
    let uid = user.as_ref().map_or(Uid::current(), |user| user.uid);
    if !Uid::effective().is_root() && (uid != Uid::current() || gid != Gid::current()) {
        return Err(Error::Config(format!(
            "--user/--group: switching the workers to uid {uid}, gid {gid} needs the primary to start as root (it binds the sockets, then its workers drop to that user); start it as root or leave out --user and --group"
        )));
    }
    let groups = match &user {
        #[cfg(target_os = "linux")]
        Some(user) => {
            let name = std::ffi::CString::new(user.name.clone()).map_err(|_| {
                Error::Config(format!("--user {}: the name holds a NUL byte", user.name))
            })?;
            nix::unistd::getgrouplist(&name, gid).map_err(|err| {
                Error::Config(format!(
                    "--user {}: cannot read the user's groups ({err})",
                    user.name
                ))
            })?
        }
        _ => vec![gid],
    };
    Ok(Some(Identity { uid, gid, groups }))
}

fn find_user(text: &str) -> Result<User> {
    let found = match text.parse::<u32>() {
        Ok(number) => User::from_uid(Uid::from_raw(number)),
        Err(_) => User::from_name(text),
    };
    match found {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(Error::Config(format!(
            "--user {text}: no such user on this system; create it or name an existing one"
        ))),
        Err(err) => Err(Error::Config(format!(
            "--user {text}: cannot look the user up ({err})"
        ))),
    }
}

fn find_group(text: &str) -> Result<Gid> {
    let found = match text.parse::<u32>() {
        Ok(number) => Group::from_gid(Gid::from_raw(number)),
        Err(_) => Group::from_name(text),
    };
    match found {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(Error::Config(format!(
            "--group {text}: no such group on this system; create it or name an existing one"
        ))),
        Err(err) => Err(Error::Config(format!(
            "--group {text}: cannot look the group up ({err})"
        ))),
    }
}

/// Drops to `identity` in a child between fork and exec. Only
/// async-signal-safe calls on memory allocated before the fork.
pub(crate) fn apply(identity: &Identity) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    nix::unistd::setgroups(&identity.groups)?;
    nix::unistd::setgid(identity.gid)?;
    nix::unistd::setuid(identity.uid)?;
    Ok(())
}
