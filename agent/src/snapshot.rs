//! The copy-on-write capture, agent side: when to ask a parked rank for a
//! snapshot of itself, and the handle that keeps the snapshot alive while
//! its memory is read (the rank side is `rank/src/snapshot.rs`).
//!
//! A snapshot is a clone of the parked rank: its private memory stays as it
//! was at the park while the rank computes on. So the rank resumes as soon
//! as the clone exists, and its chunks are copied and stored afterwards, at
//! the store's pace, without holding it. Memory the rank shares with others
//! (shared file mappings, the runtime's views of files) would change under
//! the snapshot, so those regions are still copied before the resume.
//!
//! The price is memory: every page the rank writes while its snapshot lives
//! is copied by the kernel (charged to the rank's cgroup). `auto` asks for a
//! snapshot only when the node has that memory to spare.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryo_core::format::manifest::RegionKind;
use cryo_core::pidfd;
use cryo_core::protocol::RegionInfo;
use nix::errno::Errno;

use crate::capture::{check_regions, nanos, CaptureContext, Parked, ParkedRank};
use crate::memory::MemoryView;
use crate::procfs::parse_maps;
use crate::tracking::Piece;

/// When the agent asks a parked rank for a snapshot (`--snapshot`,
/// `CRYO_SNAPSHOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotPolicy {
    /// When the node's available memory could hold a second copy of what
    /// every local rank copies, and the copy would not be a memcpy into
    /// warm memory: it is more than the copy budget holds, or more than it
    /// has warm. A memcpy into warm memory is the pause's baseline, and
    /// cheaper than what a snapshot moves out of the pause: the kernel's
    /// copy of each page the rank writes while the snapshot lives (0.69 s
    /// for 1 GiB rewritten here, against 0.015 s for the same writes
    /// without a snapshot and 0.08 s for a memcpy of 1 GiB). Into cold
    /// memory the copy faults every page in (0.78 s for 1 GiB here), which
    /// the snapshot pays only for the pages the rank rewrites.
    #[default]
    Auto,
    /// Whenever the rank has private memory to copy.
    On,
    /// Never: every copy is made while the rank is parked.
    Off,
}

impl FromStr for SnapshotPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SnapshotPolicy::Auto),
            "on" => Ok(SnapshotPolicy::On),
            "off" => Ok(SnapshotPolicy::Off),
            other => Err(format!("{other:?}: expected auto, on or off")),
        }
    }
}

impl std::fmt::Display for SnapshotPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotPolicy::Auto => "auto",
            SnapshotPolicy::On => "on",
            SnapshotPolicy::Off => "off",
        })
    }
}

impl SnapshotPolicy {
    /// This epoch's decision for the node, before any rank is captured:
    /// `expected` is what its ranks are likely to copy in all. `Auto` needs
    /// the memory for a second copy of it.
    pub fn for_epoch(self, expected: u64, memory: &MemoryView) -> SnapshotPolicy {
        match self {
            SnapshotPolicy::Auto if !memory_allows(expected, memory) => SnapshotPolicy::Off,
            policy => policy,
        }
    }

    /// Whether a rank should be asked for a snapshot.
    pub fn wants(self, copy: &CopyOutlook) -> bool {
        match self {
            SnapshotPolicy::Off => false,
            SnapshotPolicy::On => copy.private > 0,
            SnapshotPolicy::Auto => copy.private > 0 && (!copy.fits || !copy.warm),
        }
    }
}

/// What a parked rank's copy would be, for [`SnapshotPolicy::wants`].
#[derive(Debug, Clone, Copy)]
pub struct CopyOutlook {
    /// Bytes of private memory to copy.
    pub private: u64,
    /// Whether the copy budget holds every chunk to copy.
    pub fits: bool,
    /// Whether as many free slots of the budget as the copy needs are warm
    /// (the capture takes them before it decides).
    pub warm: bool,
}

/// Whether the node could hold a second copy of `expected` bytes: its
/// available memory, and what its cgroup's limit leaves.
fn memory_allows(expected: u64, memory: &MemoryView) -> bool {
    let Some(available) = memory.available else {
        return false;
    };
    let room = match memory.cgroup_limit {
        Some(limit) => available.min(limit / 2),
        None => available,
    };
    expected <= room / 2
}

/// Whether a region's memory is private to the rank, so that its snapshot
/// keeps it as it was at the park.
pub fn is_private(kind: &RegionKind) -> bool {
    match kind {
        RegionKind::Anonymous
        | RegionKind::Protected
        | RegionKind::FilePrivate { .. }
        | RegionKind::ClosedFiles
        | RegionKind::ProcessState => true,
        RegionKind::AppMapping { shared, .. } => !shared,
        RegionKind::FileShared { .. }
        | RegionKind::UnlinkedFile { .. }
        | RegionKind::FileContents { .. }
        | RegionKind::NodeFileContents { .. } => false,
    }
}

/// Splits `pieces` into those of private regions (read from a snapshot)
/// and the rest (copied while the rank is parked).
pub(crate) fn split_private(
    pieces: Vec<Piece>,
    regions: &[RegionInfo],
) -> (Vec<Piece>, Vec<Piece>) {
    pieces
        .into_iter()
        .partition(|p| regions.get(p.region).is_some_and(|r| is_private(&r.kind)))
}

/// A live snapshot of a rank. Dropping it kills the snapshot, which frees
/// the memory its pages pinned.
#[derive(Debug)]
pub struct Snapshot {
    pid: u32,
    pidfd: OwnedFd,
}

impl Snapshot {
    /// Takes hold of the snapshot `pid` that a parked rank reported. The
    /// rank cannot reap it while parked, so the pid is still the
    /// snapshot's.
    pub fn hold(pid: u32) -> Result<Snapshot, Errno> {
        let raw = libc::pid_t::try_from(pid).map_err(|_| Errno::ESRCH)?;
        let pidfd = pidfd::open(raw)?;
        lock_snapshots().insert(pid, None);
        Ok(Snapshot { pid, pidfd })
    }

    /// The snapshot's pid, to read its memory.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // Already gone (its agent's kill raced its own exit): nothing to do.
        let _ = pidfd::kill(&self.pidfd);
        lock_snapshots().insert(self.pid, Some(Instant::now()));
    }
}

/// How long a killed snapshot may still show as its rank's child: its
/// death and its rank's reaping take a moment.
const DYING: Duration = Duration::from_secs(10);

/// This agent's snapshots by pid: held (`None`), or killed then.
fn lock_snapshots() -> MutexGuard<'static, HashMap<u32, Option<Instant>>> {
    static SNAPSHOTS: LazyLock<Mutex<HashMap<u32, Option<Instant>>>> =
        LazyLock::new(Mutex::default);
    SNAPSHOTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pids of this agent's snapshots a rank may still show as children:
/// those held (an earlier epoch's, still being read, when checkpoints come
/// back to back) and those killed a moment ago. They are not the rank's
/// own children to name.
pub fn agent_snapshot_pids() -> Vec<u32> {
    let mut snapshots = lock_snapshots();
    snapshots.retain(|_, killed| killed.is_none_or(|at| at.elapsed() < DYING));
    snapshots.keys().copied().collect()
}

/// Kills a snapshot the agent no longer wants (one reported after its
/// capture went on without it).
pub fn discard(pid: u32) {
    if let Ok(snapshot) = Snapshot::hold(pid) {
        drop(snapshot);
    }
}

/// Asks a parked rank for a snapshot and checks that it holds every
/// private region (a range marked `MADV_DONTFORK` is missing from a
/// clone). `None`, with the reason logged, means the capture copies while
/// the rank is parked, as without snapshots.
pub(crate) fn take_snapshot(
    ctx: &CaptureContext<'_>,
    parked: &Parked,
    control: &mut dyn ParkedRank,
) -> Option<Snapshot> {
    let (rank, epoch) = (parked.rank, parked.epoch);
    let t = Instant::now();
    let taken = control.snapshot().and_then(|pid| {
        let snapshot = Snapshot::hold(pid).map_err(|e| format!("pidfd_open of {pid}: {e}"))?;
        let maps = ctx
            .access
            .maps(pid)
            .map_err(|e| format!("reading /proc/{pid}/maps: {e}"))?;
        let private: Vec<RegionInfo> = parked
            .regions
            .iter()
            .filter(|r| is_private(&r.kind))
            .cloned()
            .collect();
        let mappings = parse_maps(&maps, &private).map_err(|e| e.to_string())?;
        check_regions(rank, &private, &mappings)
            .map_err(|e| format!("the snapshot lacks memory the rank has: {e}"))?;
        Ok(snapshot)
    });
    match taken {
        Ok(snapshot) => {
            tracing::info!(
                rank,
                epoch,
                pid = snapshot.pid(),
                took_us = nanos(t) / 1000,
                "rank.snapshot"
            );
            Some(snapshot)
        }
        Err(reason) => {
            tracing::warn!(rank, epoch, reason = %reason, "rank.snapshot_failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_held_or_just_killed_is_not_the_ranks_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("sleep: {e}"));
        let pid = child.id();
        let snapshot = Snapshot::hold(pid).unwrap_or_else(|e| panic!("hold: {e}"));
        assert!(agent_snapshot_pids().contains(&pid));
        drop(snapshot);
        // Killed, perhaps not reaped yet: still the agent's for a while.
        assert!(agent_snapshot_pids().contains(&pid));
        let _ = child.wait();
    }

    fn view(available: Option<u64>, cgroup_limit: Option<u64>) -> MemoryView {
        MemoryView {
            total: Some(64 << 30),
            available,
            cgroup_limit,
        }
    }

    #[test]
    fn auto_needs_room_for_a_second_copy() {
        let auto = SnapshotPolicy::Auto;
        assert_eq!(auto.for_epoch(1 << 30, &view(Some(8 << 30), None)), auto);
        assert_eq!(
            auto.for_epoch(5 << 30, &view(Some(8 << 30), None)),
            SnapshotPolicy::Off
        );
        // A cgroup limit of 4 GiB leaves room for 1 GiB of copies.
        assert_eq!(
            auto.for_epoch(2 << 30, &view(Some(8 << 30), Some(4 << 30))),
            SnapshotPolicy::Off
        );
        assert_eq!(
            auto.for_epoch(1 << 30, &view(None, None)),
            SnapshotPolicy::Off
        );
        // `on` is the user's promise.
        let on = SnapshotPolicy::On;
        assert_eq!(on.for_epoch(5 << 30, &view(Some(1 << 30), None)), on);
    }

    fn outlook(private: u64, fits: bool, warm: bool) -> CopyOutlook {
        CopyOutlook {
            private,
            fits,
            warm,
        }
    }

    #[test]
    fn auto_clones_when_the_copy_would_not_be_a_memcpy_into_warm_memory() {
        let auto = SnapshotPolicy::Auto;
        let gib = 1u64 << 30;
        // Into a warm budget that holds it: a memcpy, however large.
        assert!(!auto.wants(&outlook(gib, true, true)));
        // More than the budget holds (streamed parked otherwise), or into
        // cold memory.
        assert!(auto.wants(&outlook(1 << 20, false, true)));
        assert!(auto.wants(&outlook(1 << 20, true, false)));
        // Nothing to copy.
        assert!(!auto.wants(&outlook(0, false, false)));
        assert!(SnapshotPolicy::On.wants(&outlook(1, true, true)));
        assert!(!SnapshotPolicy::Off.wants(&outlook(gib, false, false)));
    }

    #[test]
    fn only_private_memory_is_read_from_a_snapshot() {
        let region = |kind| RegionInfo {
            name: "r".into(),
            addr: 0,
            len: 1,
            kind,
        };
        let regions = vec![
            region(RegionKind::Anonymous),
            region(RegionKind::FileShared {
                path: "/f".into(),
                offset: 0,
            }),
            region(RegionKind::UnlinkedFile { fd: 3 }),
            region(RegionKind::Protected),
        ];
        let pieces: Vec<Piece> = (0..4)
            .map(|region| Piece {
                region,
                offset: 0,
                len: 1,
            })
            .collect();
        let (private, shared) = split_private(pieces, &regions);
        assert_eq!(private.iter().map(|p| p.region).collect::<Vec<_>>(), [0, 3]);
        assert_eq!(shared.iter().map(|p| p.region).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn policies_parse_by_name() {
        for policy in [
            SnapshotPolicy::Auto,
            SnapshotPolicy::On,
            SnapshotPolicy::Off,
        ] {
            assert_eq!(policy.to_string().parse::<SnapshotPolicy>(), Ok(policy));
        }
        assert!("yes".parse::<SnapshotPolicy>().is_err());
    }
}
