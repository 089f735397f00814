//! `--workers max` in a container: one worker per CPU the cgroup quota
//! allows, not per CPU of the host. corral counts with
//! `std::thread::available_parallelism`, which on Linux already caps the
//! affinity mask by the cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` quota
//! (rounded down, at least 1); this proves it on a real child cgroup with a
//! quota of one CPU, the way a Kubernetes `limits.cpu: 1` sets it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corral_testkit::Cluster;
use support::*;

/// Says the test is skipped, straight to the process's stderr (the harness
/// captures `eprintln!` of passing tests, and a skip must always show).
fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "skipped: {test} ({why})");
}

/// A cgroup made for this test, removed (once empty) when dropped.
struct ChildCgroup {
    dir: PathBuf,
}

impl ChildCgroup {
    /// A child cgroup whose CPU quota is `quota_us` per `period_us`: under
    /// cgroup v2 where the cpu controller is delegated to children, else
    /// under a v1 `cpu` hierarchy. `Err` says why none can be made here.
    fn with_cpu_quota(name: &str, quota_us: u64, period_us: u64) -> Result<ChildCgroup, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|err| format!("cannot read /proc/self/mountinfo: {err}"))?;
        let mut v2 = None;
        let mut v1 = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).unwrap_or_default();
            let mut fields = right.split_whitespace();
            let fstype = fields.next().unwrap_or_default();
            let options = fields.nth(1).unwrap_or_default();
            if fstype == "cgroup2" {
                v2.get_or_insert(PathBuf::from(mount_point));
            } else if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") {
                v1.get_or_insert(PathBuf::from(mount_point));
            }
        }
        // v2 only where this process's own cgroup delegates cpu to children.
        let own_v2 = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(|p| p.trim_start_matches('/').to_owned())
            });
        if let (Some(root), Some(own)) = (&v2, own_v2) {
            let parent = root.join(own);
            let delegated = std::fs::read_to_string(parent.join("cgroup.subtree_control"))
                .is_ok_and(|text| text.split_whitespace().any(|c| c == "cpu"));
            if delegated {
                let cgroup = ChildCgroup::make(&parent, name)?;
                cgroup.write("cpu.max", &format!("{quota_us} {period_us}"))?;
                return Ok(cgroup);
            }
        }
        let Some(root) = v1 else {
            return Err(
                "no cgroup v2 with the cpu controller delegated, and no v1 cpu hierarchy".into(),
            );
        };
        let cgroup = ChildCgroup::make(&root, name)?;
        cgroup.write("cpu.cfs_period_us", &period_us.to_string())?;
        cgroup.write("cpu.cfs_quota_us", &quota_us.to_string())?;
        Ok(cgroup)
    }

    fn make(parent: &Path, name: &str) -> Result<ChildCgroup, String> {
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|err| format!("cannot create the cgroup {}: {err}", dir.display()))?;
        Ok(ChildCgroup { dir })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .map_err(|err| format!("cannot write {value:?} to {}: {err}", path.display()))
    }

    fn procs(&self) -> String {
        self.dir.join("cgroup.procs").display().to_string()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // A cgroup can only be removed once its last process is gone.
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(self.dir.join("cgroup.procs"))
                .map_or(true, |procs| procs.trim().is_empty())
        });
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `hello --workers max`, inside `cgroup` when given.
fn start_max(cgroup: Option<&ChildCgroup>) -> Cluster {
    let hello = hello_binary();
    let mut command = match cgroup {
        // The shell joins the cgroup, then becomes the primary: everything it
        // starts is born inside.
        Some(cgroup) => {
            let mut command = Command::new("sh");
            command.args([
                "-c",
                "echo $$ > \"$1\" && exec \"$2\" --workers max --listen 127.0.0.1:0",
                "sh",
                &cgroup.procs(),
            ]);
            command.arg(&hello);
            command
        }
        None => {
            let mut command = Command::new(&hello);
            command.args(["--workers", "max", "--listen", "127.0.0.1:0"]);
            command
        }
    };
    command.env("RUST_LOG", "warn");
    Cluster::start(command, Duration::from_secs(60))
}

#[test]
fn workers_max_runs_one_worker_per_cpu_of_the_cgroup_quota() {
    let test = "workers_max_runs_one_worker_per_cpu_of_the_cgroup_quota";
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        skipped(
            test,
            "this machine has one CPU: a quota of one cannot lower it",
        );
        return;
    }
    let cgroup = match ChildCgroup::with_cpu_quota("corral-quota", 100_000, 100_000) {
        Ok(cgroup) => cgroup,
        Err(why) => {
            skipped(test, &why);
            return;
        }
    };
    let unlimited = start_max(None);
    assert!(
        unlimited.banner.contains(&format!("({cpus} workers,")),
        "without a quota: {}",
        unlimited.banner
    );
    drop(unlimited);

    let limited = start_max(Some(&cgroup));
    assert!(
        limited.banner.contains("(1 workers,"),
        "under cpu quota 100000/100000 on a {cpus}-CPU machine: {}",
        limited.banner
    );
    // The primary and its worker are both in the cgroup.
    let procs = std::fs::read_to_string(cgroup.procs()).expect("cgroup.procs");
    assert_eq!(procs.lines().count(), 2, "cgroup.procs: {procs}");
    drop(limited);
    drop(cgroup);
}
