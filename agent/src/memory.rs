//! How much memory the agent may take for its copy budget.
//!
//! The budget is memory the application cannot use while the job runs, so
//! the default is the smallest of: an eighth of the node's RAM; half of
//! what is available when the agent starts (other jobs, the page cache the
//! application needs); an eighth of the memory limit of the agent's cgroup,
//! which under Slurm's cgroup plugin it shares with the job's ranks.

use std::fs;
use std::path::{Path, PathBuf};

/// The smallest default budget: a few chunks, enough to stream any state.
pub const MIN_DEFAULT_BUDGET: u64 = 64 << 20;

/// Limits at or above this are "no limit" (cgroup v1 reports
/// `PAGE_COUNTER_MAX` pages in bytes).
const UNLIMITED: u64 = 1 << 60;

/// What the node and the agent's cgroup say about memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryView {
    /// `MemTotal`.
    pub total: Option<u64>,
    /// `MemAvailable`.
    pub available: Option<u64>,
    /// The tightest memory limit of the agent's cgroup and its ancestors.
    pub cgroup_limit: Option<u64>,
}

impl MemoryView {
    /// Reads `/proc/meminfo` and the agent's cgroup (v2 or v1).
    pub fn read() -> MemoryView {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        MemoryView {
            total: meminfo_bytes(&meminfo, "MemTotal:"),
            available: meminfo_bytes(&meminfo, "MemAvailable:"),
            cgroup_limit: cgroup_limit(&cgroup, Path::new("/sys/fs/cgroup")),
        }
    }

    /// The default copy budget under this view.
    pub fn default_budget(&self) -> u64 {
        let mut budget = self.total.map_or(1 << 30, |total| total / 8);
        if let Some(available) = self.available {
            budget = budget.min(available / 2);
        }
        if let Some(limit) = self.cgroup_limit {
            budget = budget.min(limit / 8);
        }
        budget.max(MIN_DEFAULT_BUDGET)
    }
}

fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The tightest memory limit on the cgroup path `/proc/self/cgroup` gives,
/// under the cgroup filesystem at `root`: v2's `memory.max` on the unified
/// hierarchy, else v1's `memory.limit_in_bytes` on the memory controller's.
fn cgroup_limit(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let mut limit: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (dir, file) = if controllers.is_empty() {
            (root.to_owned(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        for level in ancestors(&dir, path) {
            if let Some(value) = read_limit(&level.join(file)) {
                limit = Some(limit.map_or(value, |l| l.min(value)));
            }
        }
    }
    limit
}

/// `dir/a/b/c`, `dir/a/b`, `dir/a` for the cgroup path `/a/b/c`.
fn ancestors(dir: &Path, cgroup_path: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut here = dir.to_owned();
    for part in cgroup_path
        .split('/')
        .filter(|p| !p.is_empty() && *p != "..")
    {
        here.push(part);
        out.push(here.clone());
    }
    out.reverse();
    out
}

fn read_limit(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let value: u64 = text.trim().parse().ok()?;
    (value < UNLIMITED).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_budget_is_the_smallest_share() {
        let roomy = MemoryView {
            total: Some(64 * GIB),
            available: Some(60 * GIB),
            cgroup_limit: None,
        };
        assert_eq!(roomy.default_budget(), 8 * GIB);
        let busy = MemoryView {
            available: Some(4 * GIB),
            ..roomy
        };
        assert_eq!(busy.default_budget(), 2 * GIB);
        let confined = MemoryView {
            cgroup_limit: Some(8 * GIB),
            ..roomy
        };
        assert_eq!(confined.default_budget(), GIB);
        let tiny = MemoryView {
            cgroup_limit: Some(64 << 20),
            ..roomy
        };
        assert_eq!(tiny.default_budget(), MIN_DEFAULT_BUDGET);
    }

    #[test]
    fn meminfo_lines_are_read_in_bytes() {
        let text = "MemTotal:       24684084 kB\nMemFree:  1 kB\nMemAvailable:   23684412 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal:"), Some(24_684_084 * 1024));
        assert_eq!(
            meminfo_bytes(text, "MemAvailable:"),
            Some(23_684_412 * 1024)
        );
        assert_eq!(meminfo_bytes(text, "SwapTotal:"), None);
    }

    #[test]
    fn cgroup_limits_v2_and_v1_take_the_tightest_ancestor() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("slurm/uid_1/job_7");
        fs::create_dir_all(&v2).unwrap();
        fs::write(root.path().join("slurm/memory.max"), "max\n").unwrap();
        fs::write(root.path().join("slurm/uid_1/memory.max"), "8589934592\n").unwrap();
        fs::write(v2.join("memory.max"), "17179869184\n").unwrap();
        assert_eq!(
            cgroup_limit("0::/slurm/uid_1/job_7\n", root.path()),
            Some(8 * GIB)
        );
        let v1 = root.path().join("memory/job_9");
        fs::create_dir_all(&v1).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "4294967296\n").unwrap();
        fs::write(
            root.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_limit("4:memory:/job_9\n1:cpu:/\n", root.path()),
            Some(4 * GIB)
        );
        assert_eq!(cgroup_limit("1:cpu:/\n", root.path()), None);
    }
}
