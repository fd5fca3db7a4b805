//! Whether this machine can hold the ranks `cryo run` starts on it (no
//! `--hosts`, no Slurm: every rank here, `--nodes` or not).
//!
//! An MPI launcher takes any `-n`: asked for 100,000 ranks on 2 cores it
//! forks until the kernel has no pid left, and the machine with it. A
//! world the kernel cannot hold is refused before anything starts; one
//! that would share each core among very many ranks is started with a
//! warning, since such oversubscription is also how small machines test.

use std::fs;

/// Tasks (processes and threads, each taking a pid) a rank holds at
/// least: its main thread and the cryo runtime's reader.
const TASKS_PER_RANK: u64 = 2;
/// Ranks per core past which a start is warned about.
const RANKS_PER_CORE_WARNING: u64 = 32;

/// What the kernel allows and what runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// The cores this process may run on.
    pub cores: u64,
    /// `kernel.pid_max`: every task takes a pid below it.
    pub pid_max: u64,
    /// `kernel.threads-max`: the most tasks the kernel keeps at once.
    pub threads_max: u64,
    /// The tasks running now (`/proc/loadavg`).
    pub tasks_now: u64,
}

impl HostLimits {
    /// This machine's; a figure that cannot be read does not limit.
    pub fn here() -> HostLimits {
        let number =
            |path: &str| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
        HostLimits {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            pid_max: number("/proc/sys/kernel/pid_max").unwrap_or(u64::MAX),
            threads_max: number("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX),
            tasks_now: fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|text| tasks_in_loadavg(&text))
                .unwrap_or(0),
        }
    }
}

/// The total in `/proc/loadavg`'s fourth field ("2/190": 190 tasks).
fn tasks_in_loadavg(text: &str) -> Option<u64> {
    text.split_ascii_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// What to do about `ranks` ranks on a machine with `limits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Start it.
    Fine,
    /// Start it, with this warning.
    Warn(String),
    /// Do not start it, for this reason.
    Refuse(String),
}

/// Judges `ranks` ranks on a machine with `limits`.
pub fn judge(ranks: u32, limits: &HostLimits) -> Verdict {
    let ranks = u64::from(ranks);
    let (limit, name) = if limits.pid_max <= limits.threads_max {
        (limits.pid_max, "kernel.pid_max")
    } else {
        (limits.threads_max, "kernel.threads-max")
    };
    let room = limit.saturating_sub(limits.tasks_now) / TASKS_PER_RANK;
    if ranks > room {
        return Verdict::Refuse(format!(
            "-n {ranks} puts every rank on this machine, which has room for about {room} more \
             (its {name} is {limit}, {} tasks run now, and a rank takes at least \
             {TASKS_PER_RANK}): spread the ranks over hosts (--hosts, or Slurm) or ask for fewer",
            limits.tasks_now
        ));
    }
    let cores = limits.cores.max(1);
    if ranks > RANKS_PER_CORE_WARNING * cores {
        return Verdict::Warn(format!(
            "cryo: WARNING: {ranks} ranks on this one machine, which has {cores} core{} \
             (about {} ranks per core): ranks oversubscribed this far mostly wait for a core, \
             and every checkpoint waits for the slowest of them. --hosts spreads them over \
             hosts; --nodes only emulates nodes on this one",
            if cores == 1 { "" } else { "s" },
            ranks.div_ceil(cores)
        ));
    }
    Verdict::Fine
}

/// Refuses or warns about `ranks` ranks on this machine.
pub fn check_here(ranks: u32) -> anyhow::Result<()> {
    match judge(ranks, &HostLimits::here()) {
        Verdict::Fine => Ok(()),
        Verdict::Warn(warning) => {
            cryo_core::say!("{warning}");
            Ok(())
        }
        Verdict::Refuse(reason) => Err(anyhow::anyhow!(reason)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SMALL: HostLimits = HostLimits {
        cores: 2,
        pid_max: 32768,
        threads_max: 192_739,
        tasks_now: 190,
    };

    #[test]
    fn loadavg_gives_the_tasks_running() {
        assert_eq!(tasks_in_loadavg("0.50 0.40 0.30 2/190 1234\n"), Some(190));
        assert_eq!(tasks_in_loadavg("0.50 0.40"), None);
        assert_eq!(tasks_in_loadavg("0.50 0.40 0.30 2-190 1"), None);
    }

    #[test]
    fn a_world_the_kernel_cannot_hold_is_refused_by_its_limit() {
        let Verdict::Refuse(reason) = judge(100_000, &SMALL) else {
            panic!("100000 ranks on pid_max 32768 was not refused");
        };
        assert!(reason.contains("room for about 16289 more"), "{reason}");
        assert!(reason.contains("kernel.pid_max is 32768"), "{reason}");
        let threads_bound = HostLimits {
            threads_max: 1000,
            ..SMALL
        };
        let Verdict::Refuse(reason) = judge(1000, &threads_bound) else {
            panic!("not refused");
        };
        assert!(reason.contains("kernel.threads-max is 1000"), "{reason}");
    }

    #[test]
    fn heavy_oversubscription_is_warned_of_and_usual_sizes_are_not() {
        assert_eq!(judge(4, &SMALL), Verdict::Fine);
        assert_eq!(judge(64, &SMALL), Verdict::Fine);
        let Verdict::Warn(warning) = judge(1000, &SMALL) else {
            panic!("1000 ranks on 2 cores was not warned of");
        };
        assert!(
            warning.contains(
                "1000 ranks on this one machine, which has 2 cores (about 500 ranks per core)"
            ),
            "{warning}"
        );
        let many_cores = HostLimits {
            cores: 128,
            ..SMALL
        };
        assert_eq!(judge(1000, &many_cores), Verdict::Fine);
    }
}
