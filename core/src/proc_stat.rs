//! `/proc/<pid>/stat`: the parent, command name and state of processes,
//! for the agent's look at a rank's children and `cryo run`'s at what its
//! launcher left behind.

use std::fs;
use std::io;

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Its parent's pid.
    pub ppid: u32,
    /// Its command name (`comm`).
    pub comm: String,
    /// Its state letter (`R`, `S`, `D`, `Z` for exited and not yet reaped, ...).
    pub state: char,
}

impl ProcStat {
    /// Whether it has exited (waiting to be reaped, or being reaped).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses a `stat` line. The name is in parentheses and may hold spaces
/// and parentheses itself, so the fields after it are found from the last
/// `)`.
pub fn parse(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { ppid, comm, state })
}

/// One process's, if it still exists.
pub fn read(pid: u32) -> Option<ProcStat> {
    parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process of the machine, by pid. Processes that end meanwhile are
/// passed over.
pub fn every_process() -> io::Result<Vec<(u32, ProcStat)>> {
    let mut all = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(stat) = read(pid) {
            all.push((pid, stat));
        }
    }
    Ok(all)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_from_the_last_parenthesis() {
        let stat = parse("4242 (my (odd) prog) S 17 4242 17 0 -1 4194560 120 0 0 0").unwrap();
        assert_eq!(
            stat,
            ProcStat {
                ppid: 17,
                comm: "my (odd) prog".to_owned(),
                state: 'S'
            }
        );
        assert!(!stat.exited());
        assert!(parse("1 (z) Z 1").unwrap().exited());
        assert_eq!(parse("4242 (cut"), None);
        assert_eq!(parse("4242 (x) R"), None);
        assert_eq!(parse("4242 (x) R notanumber"), None);
    }

    #[test]
    fn this_process_is_among_every_process() {
        let me = std::process::id();
        let all = every_process().unwrap();
        let mine = all.iter().find(|(pid, _)| *pid == me).unwrap();
        assert_eq!(mine.1.ppid, std::os::unix::process::parent_id());
    }
}
