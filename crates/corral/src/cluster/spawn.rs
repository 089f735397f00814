//! Starting a worker: re-execute this program with the IPC socket, the
//! connection-passing socket and the slot's listening sockets at fixed
//! descriptor numbers.
//!
//! Workers are never forked from the (multi-threaded) primary and then left
//! running its code: the child only rearranges descriptors and calls `exec`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::worker::{
    CONNECTIONS_FD, ENV_GENERATION, ENV_LISTENERS, ENV_SLOT, FIRST_LISTENER_FD, IPC_FD,
};
use crate::net::fd_passing;

/// A started worker process and the primary's end of its IPC socket.
pub(crate) struct Spawned {
    pub child: Child,
    pub pid: u32,
    pub ipc: UnixStream,
    /// The primary's end of the connection-passing socket.
    pub connections: std::os::fd::OwnedFd,
}

/// Descriptors at or above this are free for temporary copies in the child.
const SCRATCH_FD_FLOOR: RawFd = 1000;

pub(crate) fn spawn_worker(
    program: &Path,
    args: &[OsString],
    slot: usize,
    generation: u64,
    listeners: &[RawFd],
) -> io::Result<Spawned> {
    let (primary_end, worker_end) = std::os::unix::net::UnixStream::pair()?;
    primary_end.set_nonblocking(true)?;
    let (connections_primary_end, connections_worker_end) = fd_passing::pair()?;

    let mut sources: Vec<RawFd> = Vec::with_capacity(listeners.len() + 1);
    sources.push(worker_end.as_raw_fd());
    sources.push(connections_worker_end.as_raw_fd());
    sources.extend_from_slice(listeners);
    // Allocated here because the child may not allocate between fork and exec.
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
    let primary_pid = nix::unistd::getpid().as_raw();

    let mut command = Command::new(program);
    command
        .args(args)
        .env(ENV_SLOT, slot.to_string())
        .env(ENV_GENERATION, generation.to_string())
        .env(ENV_LISTENERS, listeners.len().to_string())
        .stdin(Stdio::null())
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
                let copy = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, SCRATCH_FD_FLOOR);
                if copy == -1 {
                    return Err(io::Error::last_os_error());
                }
                scratch[index] = copy;
            }
            for (index, &copy) in scratch.iter().enumerate() {
                let target = match index {
                    0 => IPC_FD,
                    1 => CONNECTIONS_FD,
                    _ => FIRST_LISTENER_FD + index as RawFd - 2,
                };
                // dup2 clears close-on-exec on the target: exactly these survive exec.
                if libc::dup2(copy, target) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(worker_end);
    drop(connections_worker_end);
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the worker exited before it could be tracked"))?;
    Ok(Spawned {
        child,
        pid,
        ipc: UnixStream::from_std(primary_end)?,
        connections: connections_primary_end,
    })
}
