//! Starting a worker: re-execute this program with the IPC socket, the
//! connection-passing socket and the slot's listening sockets at fixed
//! descriptor numbers.
//!
//! Workers are never forked from the (multi-threaded) primary and then left
//! running its code: the child only rearranges descriptors and calls `exec`.
//! Any other program can be a worker too, by systemd's `LISTEN_FDS` convention.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::identity::Identity;
use super::worker::{
    CONNECTIONS_FD, ENV_GENERATION, ENV_KEEP_LISTENING, ENV_LISTENERS, ENV_SLOT, FIRST_LISTENER_FD,
    IPC_FD,
};
use crate::net::fd_passing;

/// The program a generation's workers run.
///
/// A corral worker's program is pinned: the primary opens the file when the
/// generation is made (start-up, reload) and executes every worker of that
/// generation from the descriptor, so a restart runs exactly the build that
/// passed the reload gate, whatever was copied onto the path since, and a
/// rollback needs no file on disk.
#[derive(Debug)]
pub(crate) enum Program {
    Pinned {
        file: std::fs::File,
        path: PathBuf,
    },
    /// Looked up again at every start (`corral run` programs and scripts,
    /// whose interpreter reopens them by name).
    Path(PathBuf),
}

impl Program {
    /// Opens `path` for execution through the descriptor.
    pub fn pin(path: &Path) -> io::Result<Program> {
        let file = std::fs::File::open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a file",
                path.display()
            )));
        }
        Ok(Program::Pinned {
            file,
            path: path.to_owned(),
        })
    }

    /// What `exec` is given when the child has placed the pinned program at
    /// descriptor `at`: executing `/proc/self/fd/N` is what `fexecve` does,
    /// and close-on-exec only closes it once the new image is loaded.
    fn exec_path(&self, at: RawFd) -> (PathBuf, Option<RawFd>) {
        match self {
            #[cfg(target_os = "linux")]
            Program::Pinned { file, .. } => (
                PathBuf::from(format!("/proc/self/fd/{at}")),
                Some(file.as_raw_fd()),
            ),
            #[cfg(not(target_os = "linux"))]
            Program::Pinned { path, .. } => (path.clone(), None),
            Program::Path(path) => (path.clone(), None),
        }
    }

    /// The program's name on disk, for logs and `argv[0]`.
    pub fn path(&self) -> &Path {
        match self {
            Program::Pinned { path, .. } | Program::Path(path) => path,
        }
    }
}

/// True for the errors that say the system is short of something (descriptors,
/// memory, processes) rather than that the program is broken: retried with
/// back-off, never counted as a crash.
pub(crate) fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOBUFS)
    )
}

/// A started worker process and the primary's end of its IPC socket.
pub(crate) struct Spawned {
    pub child: Child,
    pub pid: u32,
    /// Absent for programs that are not corral workers (`run_command`).
    pub ipc: Option<UnixStream>,
    /// The primary's end of the connection-passing socket.
    pub connections: Option<std::os::fd::OwnedFd>,
}

/// Where the inherited descriptors start (after stdin, stdout, stderr).
const FIRST_INHERITED_FD: RawFd = 3;

pub(crate) fn spawn_worker(
    program: &Program,
    args: &[OsString],
    slot: usize,
    generation: u64,
    listeners: &[RawFd],
    // One of `listeners` came from systemd: it must outlive this node.
    keep_listening: bool,
    identity: Option<&Identity>,
) -> io::Result<Spawned> {
    let (primary_end, worker_end) = std::os::unix::net::UnixStream::pair()?;
    primary_end.set_nonblocking(true)?;
    let (connections_primary_end, connections_worker_end) = fd_passing::pair()?;

    // fd 3: IPC, fd 4: passed connections, fd 5...: listening sockets.
    let mut sources: Vec<RawFd> = Vec::with_capacity(listeners.len() + 2);
    sources.push(worker_end.as_raw_fd());
    sources.push(connections_worker_end.as_raw_fd());
    sources.extend_from_slice(listeners);
    debug_assert_eq!((IPC_FD, CONNECTIONS_FD, FIRST_LISTENER_FD), (3, 4, 5));

    // The pinned program goes right after the inherited descriptors.
    let (exec_path, pinned) = program.exec_path(FIRST_INHERITED_FD + sources.len() as RawFd);
    let mut command = Command::new(exec_path);
    command
        .arg0(program.path())
        .args(args)
        .env(ENV_SLOT, slot.to_string())
        .env(ENV_GENERATION, generation.to_string())
        .env(ENV_LISTENERS, listeners.len().to_string());
    if keep_listening {
        command.env(ENV_KEEP_LISTENING, "1");
    }
    let child = start(command, sources, pinned, identity)?;
    drop(worker_end);
    drop(connections_worker_end);
    let pid = child_pid(&child)?;
    Ok(Spawned {
        child,
        pid,
        ipc: Some(UnixStream::from_std(primary_end)?),
        connections: Some(connections_primary_end),
    })
}

/// Starts any program as a worker by systemd's socket-activation convention:
/// the slot's listening sockets at descriptors 3, 4, ..., `LISTEN_FDS` their
/// count, `LISTEN_PID` the program's own pid, and `CORRAL_INSTANCE` its slot.
pub(crate) fn spawn_program(
    program: &Path,
    args: &[OsString],
    slot: usize,
    listeners: &[RawFd],
    identity: Option<&Identity>,
) -> io::Result<Spawned> {
    // LISTEN_PID must be the pid of the process that ends up running the
    // program; `sh` sets it from its own pid and `exec` keeps that pid.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
        .arg("corral-worker")
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", listeners.len().to_string())
        .env("CORRAL_INSTANCE", slot.to_string())
        .env_remove("LISTEN_FDNAMES");
    let child = start(command, listeners.to_vec(), None, identity)?;
    let pid = child_pid(&child)?;
    Ok(Spawned {
        child,
        pid,
        ipc: None,
        connections: None,
    })
}

fn child_pid(child: &Child) -> io::Result<u32> {
    child
        .id()
        .ok_or_else(|| io::Error::other("the worker exited before it could be tracked"))
}

/// Spawns `command` with `sources` moved to descriptors 3, 4, ... in the
/// child, and `pinned` (the program to execute) right after them, close-on-exec.
fn start(
    mut command: Command,
    sources: Vec<RawFd>,
    pinned: Option<RawFd>,
    identity: Option<&Identity>,
) -> io::Result<Child> {
    let identity = identity.cloned();
    // Allocated here because the child may not allocate between fork and exec.
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
    let program_at = FIRST_INHERITED_FD + sources.len() as RawFd;
    // Temporary copies go above every target, so moving one into place can
    // never overwrite another still to be moved (and they fit any fd limit).
    let scratch_floor = program_at + 1;
    let primary_pid = nix::unistd::getpid().as_raw();
    // Output goes through the primary's log book (`corral logs`), which
    // also passes it on to the primary's own stdout and stderr.
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (prctl, getppid, fcntl, dup2) on
    // memory allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            // If the primary dies the worker is told to drain and exit, so no
            // orphan keeps serving with nobody supervising it.
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != primary_pid {
                    return Err(io::Error::other(
                        "the primary exited while starting a worker",
                    ));
                }
            }
            let _ = primary_pid;
            // Two passes, so that moving one descriptor into place can never
            // overwrite another that is still to be moved.
            for (index, &source) in sources.iter().enumerate() {
                let copy = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, scratch_floor);
                if copy == -1 {
                    return Err(io::Error::last_os_error());
                }
                scratch[index] = copy;
            }
            let program_copy = match pinned {
                Some(fd) => {
                    let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, scratch_floor);
                    if copy == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Some(copy)
                }
                None => None,
            };
            for (index, &copy) in scratch.iter().enumerate() {
                // dup2 clears close-on-exec on the target: exactly these survive exec.
                if libc::dup2(copy, FIRST_INHERITED_FD + index as RawFd) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(target_os = "linux")]
            if let Some(copy) = program_copy {
                if libc::dup3(copy, program_at, libc::O_CLOEXEC) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = (program_copy, program_at);
            if let Some(identity) = &identity {
                super::identity::apply(identity)?;
            }
            Ok(())
        });
    }
    command.spawn()
}
