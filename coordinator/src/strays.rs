//! The processes a job's launcher leaves behind.
//!
//! MPICH's Hydra starts its proxy, and the proxy each rank, in a session
//! of its own, so a signal to the launcher's process group does not reach
//! them. A launcher stopped while its proxy still forks ranks, or stopped
//! before its ranks answered, leaves them running, reparented to init,
//! where nothing stops them: ranks blocked in MPI forever, holding cores
//! and memory on the node. `cryo run` is their subreaper instead
//! ([`adopt_orphans`]): whatever its children leave behind is reparented
//! to it, and once the launcher and the agents have ended, every process
//! still below it is one the job left behind, which [`stop_left_behind`]
//! stops, as a batch system ends a job's last processes.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// How long what was left behind has to end on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to go on killing what is still being reparented to us.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// Makes this process the subreaper of its descendants (`PR_SET_CHILD_SUBREAPER`).
pub(crate) fn adopt_orphans() {
    if let Err(errno) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(%errno, "strays.no_subreaper");
    }
}

/// A child of this process, as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChildProcess {
    pid: i32,
    name: String,
    zombie: bool,
}

/// This process's children: the ones it started, and the orphans it has
/// adopted as their subreaper.
fn children() -> Vec<ChildProcess> {
    let me = std::process::id();
    let found = match children_of_threads() {
        // Read again: a pid listed a moment ago may have been reaped, and
        // taken by a process that is not ours (the parent is checked).
        Some(pids) => (pids.into_iter())
            .filter_map(|pid| Some((pid, cryo_core::proc_stat::read(pid)?)))
            .collect(),
        None => cryo_core::proc_stat::every_process().unwrap_or_default(),
    };
    (found.into_iter())
        .filter(|(_, stat)| stat.ppid == me)
        .filter_map(|(pid, stat)| {
            Some(ChildProcess {
                pid: i32::try_from(pid).ok()?,
                zombie: stat.exited(),
                name: stat.comm,
            })
        })
        .collect()
}

/// The children of this process's threads, from each thread's
/// `/proc/self/task/<tid>/children`: a few small reads, where scanning
/// `/proc` reads every process's `stat` on a busy node. `None` where the
/// kernel has no such file (`CONFIG_PROC_CHILDREN` off).
fn children_of_threads() -> Option<Vec<u32>> {
    let mut pids = BTreeSet::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let listed = std::fs::read_to_string(task.path().join("children"));
        match listed {
            Ok(listed) => pids.extend(
                listed
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // Without the file for the first thread, the kernel has
                // none; a thread that ended meanwhile has none either.
                if task.file_name() == std::process::id().to_string().as_str() {
                    return None;
                }
            }
            Err(_) => {}
        }
    }
    Some(pids.into_iter().collect())
}

/// Stops every process still below this one, to be called once the
/// launcher and the agents it started have been waited for, so that all
/// that is left was left behind by the job. SIGTERM first, then SIGKILL;
/// a process's own children come to us as it ends, and are stopped in
/// turn. Returns those stopped, by pid, with their names, for the caller
/// to report.
pub(crate) fn stop_left_behind() -> BTreeMap<i32, String> {
    stop_children_where(|_| true)
}

/// [`stop_left_behind`] for the children that `wanted` picks by pid.
fn stop_children_where(wanted: impl Fn(i32) -> bool) -> BTreeMap<i32, String> {
    let started = Instant::now();
    let mut stopped = BTreeMap::new();
    let mut termed = BTreeSet::new();
    loop {
        let live: Vec<ChildProcess> = children()
            .into_iter()
            .filter(|child| wanted(child.pid))
            .filter(|child| {
                if child.zombie {
                    // Our child: no one else can reap it, so its pid
                    // cannot have been taken by another process.
                    let _ = waitpid(Pid::from_raw(child.pid), Some(WaitPidFlag::WNOHANG));
                }
                !child.zombie
            })
            .collect();
        if live.is_empty() || started.elapsed() > KILL_DEADLINE {
            break;
        }
        let kill_now = started.elapsed() > TERM_GRACE;
        for child in &live {
            stopped.insert(child.pid, child.name.clone());
            let signal = if kill_now {
                Signal::SIGKILL
            } else if termed.insert(child.pid) {
                Signal::SIGTERM
            } else {
                continue;
            };
            let _ = kill(Pid::from_raw(child.pid), signal);
        }
        thread::sleep(Duration::from_millis(20));
    }
    stopped
}

/// "hydra_pmi_proxy (pid 7), app (pid 8) and 3 more".
pub(crate) fn describe(stopped: &BTreeMap<i32, String>) -> String {
    const NAMED: usize = 4;
    let mut named: Vec<String> = stopped
        .iter()
        .take(NAMED)
        .map(|(pid, name)| format!("{name} (pid {pid})"))
        .collect();
    if stopped.len() > NAMED {
        named.push(format!("{} more", stopped.len() - NAMED));
    }
    match named.len() {
        0 => String::new(),
        1 => named.remove(0),
        n => {
            let last = named.remove(n - 1);
            format!("{} and {last}", named.join(", "))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_list_of_what_was_stopped_reads_well() {
        let mut stopped = BTreeMap::new();
        assert_eq!(describe(&stopped), "");
        stopped.insert(7, "hydra_pmi_proxy".to_string());
        assert_eq!(describe(&stopped), "hydra_pmi_proxy (pid 7)");
        stopped.insert(8, "app".to_string());
        assert_eq!(
            describe(&stopped),
            "hydra_pmi_proxy (pid 7) and app (pid 8)"
        );
        for pid in 9..14 {
            stopped.insert(pid, "app".to_string());
        }
        assert_eq!(
            describe(&stopped),
            "hydra_pmi_proxy (pid 7), app (pid 8), app (pid 9), app (pid 10) and 3 more"
        );
    }

    /// The threads' lists of children name a child started by any thread,
    /// as a scan of `/proc` does.
    #[test]
    fn the_threads_lists_name_the_children() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let listed = thread::spawn(children_of_threads).join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        if let Some(listed) = listed {
            assert!(listed.contains(&pid), "{listed:?} lacks {pid}");
        }
    }

    /// A shell that starts a sleeper in the background and exits leaves
    /// the sleeper to its subreaper, which stops it. (Only that sleeper:
    /// the other tests of this process have children of their own.)
    #[test]
    fn an_orphaned_grandchild_is_adopted_and_stopped() {
        adopt_orphans();
        let out = Command::new("sh")
            .arg("-c")
            .arg("sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
            .output()
            .unwrap();
        assert!(out.status.success());
        let sleeper: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let adopted = || children().iter().any(|c| c.pid == sleeper && !c.zombie);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !adopted() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            adopted(),
            "the orphaned sleeper did not come to its subreaper"
        );
        let stopped = stop_children_where(|pid| pid == sleeper);
        assert_eq!(stopped.get(&sleeper).map(String::as_str), Some("sleep"));
        assert!(
            !children().iter().any(|c| c.pid == sleeper),
            "{:?}",
            children()
        );
    }
}
