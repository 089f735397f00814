//! What the kernel says about a process: CPU time and resident memory, for
//! the primary's view of its workers and a worker's view of itself.

/// One reading of a process's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessFigures {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

impl ProcessFigures {
    /// The figures of process `pid`, or `None` once it is gone.
    #[cfg(target_os = "linux")]
    pub fn of(pid: u32) -> Option<ProcessFigures> {
        Self::from_process(&procfs::process::Process::new(pid as i32).ok()?)
    }

    /// The figures of this process.
    #[cfg(target_os = "linux")]
    pub fn this() -> Option<ProcessFigures> {
        Self::from_process(&procfs::process::Process::myself().ok()?)
    }

    #[cfg(target_os = "linux")]
    fn from_process(process: &procfs::process::Process) -> Option<ProcessFigures> {
        let stat = process.stat().ok()?;
        Some(ProcessFigures {
            cpu_seconds: (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
            rss_bytes: stat.rss * procfs::page_size(),
        })
    }

    /// Not measured off Linux.
    #[cfg(not(target_os = "linux"))]
    pub fn of(_pid: u32) -> Option<ProcessFigures> {
        None
    }

    /// Not measured off Linux.
    #[cfg(not(target_os = "linux"))]
    pub fn this() -> Option<ProcessFigures> {
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_and_spends_cpu() {
        let before = ProcessFigures::this().unwrap();
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        let after = ProcessFigures::of(std::process::id()).unwrap();
        assert!(after.rss_bytes > 0);
        assert!(
            after.cpu_seconds > before.cpu_seconds,
            "{before:?} then {after:?} ({spin})"
        );
    }
}
