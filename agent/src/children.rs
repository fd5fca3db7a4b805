//! A rank's child processes. A checkpoint saves the rank's own process
//! alone, so a process it started and still runs (a helper in the
//! background, a compressor behind a pipe) does not come back at a restart:
//! each is named in the checkpoint's warnings when it is taken. The rank's
//! snapshot (a clone of it while its private memory is read, see
//! `snapshot.rs`) is the agent's, and an exited child waiting to be reaped
//! has nothing to save; neither is named.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A process whose parent is a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildProcess {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`comm`).
    pub comm: String,
}

/// How long one scan of `/proc` answers for every rank of the node: the
/// node's ranks are captured within a moment of each other, and a scan
/// reads every process's `stat` (a few ms on a node with hundreds of
/// processes, once per rank otherwise).
const SCAN_FRESH: Duration = Duration::from_millis(500);

/// The live children of `pid`, from every process's `/proc/<pid>/stat`
/// (`/proc/<pid>/task/*/children` needs a kernel option many lack), by a
/// scan of at most [`SCAN_FRESH`] ago.
pub fn children_of(pid: u32) -> io::Result<Vec<ChildProcess>> {
    static LAST: Mutex<Option<(Instant, Arc<Parents>)>> = Mutex::new(None);
    let parents = {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((at, parents)) if at.elapsed() < SCAN_FRESH => Arc::clone(parents),
            _ => {
                let parents = Arc::new(scan()?);
                *last = Some((Instant::now(), Arc::clone(&parents)));
                parents
            }
        }
    };
    Ok(parents.get(&pid).cloned().unwrap_or_default())
}

/// The live processes of the machine by parent.
type Parents = HashMap<u32, Vec<ChildProcess>>;

/// Reads every process's `stat`. Processes that vanish meanwhile are
/// passed over.
fn scan() -> io::Result<Parents> {
    let mut parents = Parents::new();
    for (pid, stat) in cryo_core::proc_stat::every_process()? {
        // Exited, waiting to be reaped: nothing to save.
        if !stat.exited() {
            parents.entry(stat.ppid).or_default().push(ChildProcess {
                pid,
                comm: stat.comm,
            });
        }
    }
    for children in parents.values_mut() {
        children.sort_by_key(|c| c.pid);
    }
    Ok(parents)
}

/// One warning per child of the rank but those in `except` (its snapshot).
pub fn child_warnings(children: &[ChildProcess], except: &[u32]) -> Vec<String> {
    (children.iter())
        .filter(|child| !except.contains(&child.pid))
        .map(|child| {
            format!(
                "child process {} ({}) of the rank is not saved: a restart does not start it \
                 again, and what the rank exchanges with it after a restart goes nowhere",
                child.pid, child.comm
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn the_live_children_of_a_process_are_found_and_named() {
        let mut running = Command::new("sleep").arg("30").spawn().unwrap();
        let mut exited = Command::new("true").spawn().unwrap();
        // Exited and not yet reaped: a zombie.
        let zombie = exited.id();
        while cryo_core::proc_stat::read(zombie).is_some_and(|stat| !stat.exited()) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let children = scan().unwrap().remove(&std::process::id()).unwrap();
        let found: Vec<&ChildProcess> = (children.iter())
            .filter(|c| c.pid == running.id() || c.pid == zombie)
            .collect();
        assert_eq!(
            found,
            [&ChildProcess {
                pid: running.id(),
                comm: "sleep".into()
            }]
        );
        let warnings = child_warnings(&children, &[]);
        let named = format!(
            "child process {} (sleep) of the rank is not saved",
            running.id()
        );
        assert!(
            warnings.iter().any(|w| w.starts_with(&named)),
            "{warnings:?}"
        );
        assert!(!child_warnings(&children, &[running.id()])
            .iter()
            .any(|w| w.starts_with(&named)));
        running.kill().unwrap();
        running.wait().unwrap();
        exited.wait().unwrap();
    }
}
