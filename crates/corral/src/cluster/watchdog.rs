//! A worker's watchdog: a plain thread, independent of the event loop, that
//! notices when the primary is gone and makes sure the worker leaves even if
//! its loop is blocked, so no orphan keeps a listening socket (and the port)
//! after its primary died.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the thread looks.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Starts the thread. `draining` is cancelled (stop accepting at once) when
/// the primary is gone; the process exits `shutdown_timeout` later if it has
/// not finished by itself. `lost` is set by the IPC reader on end-of-file.
pub(crate) fn start(
    draining: CancellationToken,
    lost: Arc<AtomicBool>,
    shutdown_timeout: Duration,
) -> std::io::Result<()> {
    let primary = nix::unistd::getppid();
    std::thread::Builder::new()
        .name("corral-watchdog".to_owned())
        .spawn(move || {
            // A changed parent means the primary died and we were re-parented.
            while nix::unistd::getppid() == primary && !lost.load(Ordering::SeqCst) {
                std::thread::sleep(CHECK_EVERY);
            }
            let noticed = Instant::now();
            tracing::warn!(
                "the primary is gone; draining for at most {}",
                humantime::format_duration(shutdown_timeout)
            );
            // Thread-safe: wakes the loop's tasks if the loop runs at all.
            draining.cancel();
            std::thread::sleep(shutdown_timeout.saturating_sub(noticed.elapsed()));
            tracing::error!(
                "still running {} after the primary died (event loop blocked?); exiting",
                humantime::format_duration(shutdown_timeout)
            );
            std::process::exit(1);
        })?;
    Ok(())
}
