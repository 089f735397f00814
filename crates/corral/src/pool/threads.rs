//! The pool's OS threads: how many, their names, their priority, and joining
//! them at shutdown (rayon only signals its threads to stop; it never joins).

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How many pool threads one process should run so that `processes`
/// processes, each with its own pool, together use every core once.
///
/// `None` means this process is alone. The cores are what
/// [`std::thread::available_parallelism`] reports (it honours cgroup CPU
/// quotas and affinity masks); the result is at least 1. The event loops are
/// not subtracted: pool threads run at a lower priority, so an event loop
/// that wakes takes its core back at once.
///
/// ```
/// let alone = corral::pool::default_threads(None);
/// assert!(alone >= 1);
/// assert!(corral::pool::default_threads(Some(alone * 4)) == 1);
/// ```
pub fn default_threads(processes: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes.unwrap_or(1).max(1)).max(1)
}

/// Join handles of the threads rayon asked us to spawn.
pub(crate) type Handles = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// Builds a rayon pool whose threads are named `{prefix}-{index}`, run at
/// `nice`, and whose join handles land in the returned list.
pub(crate) fn build(
    threads: usize,
    prefix: &str,
    nice: i32,
) -> io::Result<(rayon::ThreadPool, Handles)> {
    let handles: Handles = Arc::default();
    let spawned = Arc::clone(&handles);
    let (ready, all_ready) = std::sync::mpsc::channel();
    let prefix = prefix.to_owned();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |index| format!("{prefix}-{index}"))
        .spawn_handler(move |thread| {
            let mut builder = std::thread::Builder::new();
            if let Some(name) = thread.name() {
                builder = builder.name(name.to_owned());
            }
            if let Some(size) = thread.stack_size() {
                builder = builder.stack_size(size);
            }
            let ready = ready.clone();
            let handle = builder.spawn(move || {
                lower_priority(nice);
                let _ = ready.send(());
                thread.run();
            })?;
            spawned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(handle);
            Ok(())
        })
        .build()
        .map_err(io::Error::other)?;
    // Return only once every thread has its name and priority, so nothing
    // observes a half-started pool.
    for _ in 0..threads {
        if all_ready.recv().is_err() {
            break;
        }
    }
    Ok((pool, handles))
}

/// Linux schedules threads, not processes: `setpriority` on a thread id
/// changes that thread alone, so the event loop keeps its own priority.
#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        tracing::debug!(nice, error = %io::Error::last_os_error(), "pool thread keeps its priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

/// Joins the threads when dropped. It is declared after the rayon pool in
/// the pool's fields, so it runs after rayon was told to stop.
pub(crate) struct Joiner(pub(crate) Handles);

impl Drop for Joiner {
    fn drop(&mut self) {
        let handles = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let me = std::thread::current().id();
        for handle in handles {
            // The last handle may be dropped by a task on the pool itself;
            // that thread exits on its own once the task returns.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}
