//! Capturing one parked rank: its fd table, its mappings and its region
//! memory, then (after it resumes) hashing, compressing and storing chunks.
//!
//! Two paths, one memory bound:
//! * buffered: when the copy pool has a free slot for every chunk of the
//!   rank, all chunks are copied (in parallel, `process_vm_readv`), the rank
//!   is resumed at once, and the slots drain through zstd and the store in
//!   the background;
//! * streamed: otherwise, the rank stays parked while its chunks go through
//!   the pool batch by batch (copy, then store), and is resumed at the end.
//!
//! Either way the agent never holds more than the copy budget of rank data.
//! The files the rank only reads are read from the files once it runs
//! again (`inputs.rs`), and private memory from a snapshot when it took one
//! (`snapshot.rs`); the sources and the store are in `stream.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime};

use cryo_core::format::manifest::{
    ChunkRef, FdRestore, MappingRecord, RankRecord, RegionRecord, WriteStats,
};
use cryo_core::locality::Filesystem;
use cryo_core::names::check_region_name;
use cryo_core::protocol::{RankCaptureReport, RegionInfo};
use cryo_core::store::writer::{RankWriter, WriteError};
use thiserror::Error;

use crate::children::child_warnings;
use crate::fds::{read_fd_table, saved_unlinked, FdOwners, FdTableError};
pub use crate::gate::{CopyGate, GateHold};
use crate::inputs::{InputStamps, Inputs};
use crate::node_local::node_local_warnings;
use crate::pool::BufferPool;
use crate::procfs::{parse_maps, MapsParseError, MemoryError, ProcessAccess};
use crate::self_copy::{copy_parked, regions_readable, SelfCopy, SelfCopyRefusal};
use crate::snapshot::{is_private, split_private, take_snapshot, CopyOutlook, SnapshotPolicy};
use crate::stream::{reuse, store, stream, Source};
use crate::tracking::{select, Baseline, Piece, Selection};
pub use crate::tracking::{
    Heat, RegionHeat, HOT_CAPTURES, HOT_SHARE, SAMPLE_EVERY, SAMPLE_MIN_CHUNKS,
};

/// Capturing a rank failed.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// A procfs read failed.
    #[error("rank {rank} (pid {pid}): reading /proc/{pid}/maps: {source}")]
    Maps {
        /// The rank.
        rank: u32,
        /// The pid.
        pid: u32,
        /// The error.
        source: std::io::Error,
    },
    /// The maps did not parse.
    #[error("rank {rank}: {source}")]
    MapsParse {
        /// The rank.
        rank: u32,
        /// The error.
        source: MapsParseError,
    },
    /// The fd table could not be read.
    #[error("rank {rank}: {source}")]
    Fds {
        /// The rank.
        rank: u32,
        /// The error.
        source: FdTableError,
    },
    /// The rank sent a region that is not in its address space.
    #[error("rank {rank}: region {name:?} ({addr:#x}, {len} bytes) is not mapped in the process")]
    BadRegion {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A bad region name.
    #[error("rank {rank}: {source}")]
    RegionName {
        /// The rank.
        rank: u32,
        /// The error.
        source: cryo_core::names::NameError,
    },
    /// Copying memory failed.
    #[error("rank {rank}: copying region {region:?}: {source}")]
    Memory {
        /// The rank.
        rank: u32,
        /// The region.
        region: String,
        /// The error.
        source: MemoryError,
    },
    /// Storing chunks failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The epoch was aborted while the rank's chunks were being stored.
    #[error("rank {rank}: the epoch was aborted while its chunks were being stored")]
    Aborted {
        /// The rank.
        rank: u32,
    },
    /// The rank was asked to copy its own memory and did not answer.
    #[error("rank {rank}: copying its own memory: {reason}")]
    SelfCopy {
        /// The rank.
        rank: u32,
        /// Why.
        reason: String,
    },
    /// A file the rank only reads could not be read after its resume (cut
    /// shorter meanwhile, say: `inputs.rs`).
    #[error("rank {rank}: reading the saved input {path}: {source}")]
    Input {
        /// The rank.
        rank: u32,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Resuming the rank failed.
    #[error("rank {rank}: resuming: {reason}")]
    Resume {
        /// The rank.
        rank: u32,
        /// Why.
        reason: String,
    },
}

impl CaptureError {
    /// The rank whose capture failed.
    pub fn rank(&self) -> u32 {
        match self {
            CaptureError::Maps { rank, .. }
            | CaptureError::MapsParse { rank, .. }
            | CaptureError::Fds { rank, .. }
            | CaptureError::BadRegion { rank, .. }
            | CaptureError::RegionName { rank, .. }
            | CaptureError::Memory { rank, .. }
            | CaptureError::Aborted { rank }
            | CaptureError::SelfCopy { rank, .. }
            | CaptureError::Input { rank, .. }
            | CaptureError::Resume { rank, .. } => *rank,
            CaptureError::Write(err) => err.rank(),
        }
    }
}

/// A rank parked at a safe point.
#[derive(Debug, Clone)]
pub struct Parked {
    /// The rank.
    pub rank: u32,
    /// Its pid.
    pub pid: u32,
    /// The epoch.
    pub epoch: u64,
    /// Its regions.
    pub regions: Vec<RegionInfo>,
    /// The runtime's own fds.
    pub runtime_fds: Vec<i32>,
    /// The MPI library's and the launcher's fds (open since `cryo_init`).
    pub library_fds: Vec<i32>,
    /// What the rank found it holds that a restart cannot give back.
    pub warnings: Vec<String>,
    /// When `Parked` arrived.
    pub since: Instant,
}

/// What the capture needs from the agent.
pub struct CaptureContext<'a> {
    /// Process access.
    pub access: &'a dyn ProcessAccess,
    /// The copy pool.
    pub pool: &'a BufferPool,
    /// Threads for copying (kept apart from the compression threads so a
    /// copy never queues behind zstd).
    pub copy_threads: &'a rayon::ThreadPool,
    /// Orders copies and compression between ranks parked together.
    pub gate: &'a CopyGate,
    /// Threads hashing, compressing and writing chunks. More than the
    /// cores: every chunk is fsynced, and those waits should overlap.
    pub store_threads: &'a rayon::ThreadPool,
    /// The job name (for the log and fault hooks).
    pub job: &'a str,
    /// The node name.
    pub node: &'a str,
    /// Set when the epoch is aborted: chunks not yet stored are dropped.
    pub cancelled: &'a AtomicBool,
    /// When to read a rank's private memory from a snapshot of it.
    pub snapshot: SnapshotPolicy,
    /// Whether a parked rank copies its own memory into the budget.
    pub self_copy: SelfCopy,
    /// Threads a rank may copy its own memory with (its share of the
    /// node's cores).
    pub self_copy_threads: u32,
    /// The store's filesystem, to name the files a restart on another
    /// node will not find (`None`: unknown, nothing named).
    pub store_fs: Option<Filesystem>,
}

impl std::fmt::Debug for CaptureContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureContext")
            .field("node", &self.node)
            .finish()
    }
}

/// Checks that every region lies inside the process's mappings, so that a
/// confused or hostile region table cannot make the agent plan a copy of
/// terabytes.
pub(crate) fn check_regions(
    rank: u32,
    regions: &[RegionInfo],
    maps: &[MappingRecord],
) -> Result<(), CaptureError> {
    for region in regions {
        check_region_name(&region.name)
            .map_err(|source| CaptureError::RegionName { rank, source })?;
        let bad = || CaptureError::BadRegion {
            rank,
            name: region.name.clone(),
            addr: region.addr,
            len: region.len,
        };
        let end = region.addr.checked_add(region.len).ok_or_else(bad)?;
        let mut at = region.addr;
        while at < end {
            let next = maps
                .iter()
                .find(|m| m.start <= at && at < m.end)
                .map(|m| m.end)
                .ok_or_else(bad)?;
            at = next;
        }
    }
    Ok(())
}

/// What the capture asks of the parked rank.
pub trait ParkedRank {
    /// Asks the rank for a snapshot of itself; its pid, or why there is
    /// none.
    fn snapshot(&mut self) -> Result<u32, String>;
    /// Asks the rank to copy `pieces` of its memory into the budget
    /// (`pool`, mapped by the rank) with up to `threads` threads, and
    /// waits for its answer.
    fn copy_into(
        &mut self,
        pool: std::os::fd::BorrowedFd<'_>,
        pieces: Vec<cryo_core::protocol::CopyPiece>,
        threads: u32,
    ) -> Result<(), SelfCopyRefusal>;
    /// Lets the rank run again, with its report. Called exactly once.
    fn resume(&mut self, report: &RankCaptureReport) -> Result<(), String>;
}

/// Captures a parked rank, counted by `hold` since its epoch began (dropped
/// at its resume). `baseline` is this rank's regions as the
/// previous capture of the same process stored them, if it was stored;
/// chunks whose memory was not written since are taken from it.
/// `control.resume` is called exactly once, with the rank's report, when
/// the rank may run again; if this returns an error before that, the
/// caller must abort the rank. Returns the report and the rank's record
/// (not yet written: the caller finishes it).
pub(crate) fn capture_rank(
    ctx: &CaptureContext<'_>,
    writer: &RankWriter<'_>,
    parked: &Parked,
    baseline: Option<&Baseline>,
    heat: &mut RegionHeat,
    control: &mut dyn ParkedRank,
    hold: GateHold<'_>,
) -> Result<Captured, CaptureError> {
    let rank = parked.rank;
    let pid = parked.pid;
    let maps_text =
        ctx.access
            .maps(pid)
            .map_err(|source| CaptureError::Maps { rank, pid, source })?;
    let mappings = parse_maps(&maps_text, &parked.regions)
        .map_err(|source| CaptureError::MapsParse { rank, source })?;
    check_regions(rank, &parked.regions, &mappings)?;
    // A rank copying memory it cannot read would fault, where the agent's
    // copy fails with a clear error.
    let self_copy = if regions_readable(&parked.regions, &mappings) {
        ctx.self_copy
    } else {
        SelfCopy::Off
    };
    let saved_unlinked = saved_unlinked(&parked.regions);
    let owners = FdOwners {
        runtime: &parked.runtime_fds,
        library: &parked.library_fds,
        saved_unlinked: &saved_unlinked,
    };
    let table = read_fd_table(ctx.access, pid, &owners)
        .map_err(|source| CaptureError::Fds { rank, source })?;
    let (fds, mut warnings, cwd) = (table.fds, table.warnings, table.cwd);
    let (access, regions) = (ctx.access, &parked.regions);
    let process = crate::attrs::process_attrs(access, pid, &fds, regions, &cwd, ctx.store_fs);
    warnings.extend(parked.warnings.iter().cloned());
    if let Some(store) = ctx.store_fs {
        warnings.extend(node_local_warnings(access, pid, &fds, regions, store));
    }
    for fd in &fds {
        if let FdRestore::NotRestored(why) = &fd.restore {
            tracing::warn!(rank, epoch = parked.epoch, fd = fd.fd, path = %fd.path, why = %why, "rank.fd_not_restorable");
        }
    }
    for warning in &warnings {
        tracing::warn!(rank, epoch = parked.epoch, warning = %warning, "rank.not_restorable");
    }

    let Selection {
        copy: pieces,
        reuse: mut reused,
    } = select(
        ctx,
        parked,
        baseline.map(|b| &b.regions[..]),
        heat,
        ctx.pool.slot_size(),
    );
    // The files it only reads are read once it runs again, unless they are
    // as the previous capture read them.
    let inputs = Inputs::open(access, pid, &fds, regions, &process, SystemTime::now());
    let (from_inputs, pieces): (Vec<Piece>, Vec<Piece>) = pieces
        .into_iter()
        .partition(|piece| inputs.holds(piece.region));
    let (from_inputs, kept) = inputs.keep_unchanged(from_inputs, regions, baseline);
    if !kept.is_empty() {
        let bytes: u64 = kept.iter().map(|(_, c)| u64::from(c.len)).sum();
        tracing::debug!(rank, epoch = parked.epoch, bytes, "rank.inputs_unchanged");
    }
    reused.extend(kept);
    let copied_bytes = (pieces.iter().chain(&from_inputs))
        .map(|p| p.len as u64)
        .sum();
    let fds_restored = fds
        .iter()
        .filter(|f| f.restore == FdRestore::Restore)
        .count();
    let mut report = RankCaptureReport {
        rank,
        pid,
        bytes: parked.regions.iter().map(|r| r.len).sum(),
        copied_bytes,
        pause_ns: 0,
        copy_ns: 0,
        streamed: false,
        fds_restored: u32::try_from(fds_restored).unwrap_or(u32::MAX),
        fds_not_restored: u32::try_from(fds.len() - fds_restored).unwrap_or(u32::MAX),
    };
    tracing::debug!(
        rank,
        epoch = parked.epoch,
        planned_us = nanos(parked.since) / 1000,
        "rank.copy_planned"
    );
    // Private memory comes from a snapshot when there is one; what the
    // rank shares with others is copied while it is parked.
    let private: u64 = pieces
        .iter()
        .filter(|p| is_private(&parked.regions[p.region].kind))
        .map(|p| p.len as u64)
        .sum();
    // Under `auto`, warm slots for the whole copy are taken now, so that
    // the decision holds against the node's other ranks taking them. With
    // them the copy is a memcpy into warm memory, which `auto` never trades
    // for a snapshot: they serve the parked copy below.
    let warm = match ctx.snapshot {
        SnapshotPolicy::Auto => ctx.pool.try_take_warm_for(pieces.len(), rank),
        SnapshotPolicy::On | SnapshotPolicy::Off => None,
    };
    let outlook = CopyOutlook {
        private,
        fits: pieces.len() <= ctx.pool.slots(),
        warm: warm.is_some(),
    };
    let snapshot = if ctx.snapshot.wants(&outlook) {
        take_snapshot(ctx, parked, control)
    } else {
        None
    };
    debug_assert!(warm.is_none() || snapshot.is_none());
    let (late, now) = match &snapshot {
        Some(_) => split_private(pieces, &parked.regions),
        None => (Vec::new(), pieces),
    };
    let mut chunks: Vec<(usize, ChunkRef)> = Vec::with_capacity(now.len() + late.len());
    let buffered = match warm.or_else(|| ctx.pool.try_take_for(now.len(), rank)) {
        Some(mut slots) => {
            let t = Instant::now();
            if let Err(err) = copy_parked(ctx, self_copy, parked, control, &now, &mut slots) {
                if matches!(err, CaptureError::SelfCopy { .. }) {
                    // The rank may still be writing into them.
                    ctx.pool.retire(slots);
                }
                return Err(err);
            }
            report.copy_ns = nanos(t);
            Some((now, slots))
        }
        None => {
            report.streamed = true;
            let (stored, copy_ns) = stream(ctx, writer, parked, Source::Parked, &now)?;
            report.copy_ns = copy_ns;
            chunks.extend(stored);
            None
        }
    };
    report.pause_ns = nanos(parked.since);
    control
        .resume(&report)
        .map_err(|reason| CaptureError::Resume { rank, reason })?;
    drop(hold);
    // Its children, named once it runs again: the scan of /proc costs the
    // pause nothing. Its snapshots (this epoch's, an earlier one's still
    // read or dying) are the agent's: every one held is in the list.
    let snapshot_pid = crate::snapshot::agent_snapshot_pids();
    match ctx.access.children(pid) {
        Ok(children) => {
            for warning in child_warnings(&children, &snapshot_pid) {
                tracing::warn!(rank, epoch = parked.epoch, warning = %warning, "rank.child_not_saved");
                warnings.push(warning);
            }
        }
        Err(err) => {
            tracing::debug!(rank, epoch = parked.epoch, error = %err, "rank.children_unknown")
        }
    }
    // No compression while another rank has yet to resume.
    ctx.gate.wait_idle(ctx.pool);
    if let Some((pieces, slots)) = buffered {
        chunks.extend(store(ctx, writer, pieces, slots)?);
    }
    if let Some(snapshot) = snapshot {
        cryo_core::fault::pause_at(cryo_core::fault::Phase::Snapshot, parked.epoch, ctx.job);
        let source = Source::Snapshot(snapshot.pid());
        let (stored, copy_ns) = stream(ctx, writer, parked, source, &late)?;
        tracing::info!(
            rank,
            epoch = parked.epoch,
            bytes = private,
            copy_us = copy_ns / 1000,
            "rank.snapshot_read"
        );
        chunks.extend(stored);
        // Killed now: every page it kept is stored.
        drop(snapshot);
    }
    if !from_inputs.is_empty() {
        let source = Source::Inputs(&inputs);
        let (stored, copy_ns) = stream(ctx, writer, parked, source, &from_inputs)?;
        let bytes: u64 = from_inputs.iter().map(|p| p.len as u64).sum();
        tracing::debug!(
            rank,
            epoch = parked.epoch,
            bytes,
            copy_us = copy_ns / 1000,
            "rank.inputs_read"
        );
        chunks.extend(stored);
        for warning in inputs.warnings() {
            tracing::warn!(rank, epoch = parked.epoch, warning = %warning, "rank.input_changed");
            warnings.push(warning);
        }
    }
    chunks.extend(reuse(ctx, writer, reused)?);

    let mut by_region: BTreeMap<usize, Vec<ChunkRef>> = BTreeMap::new();
    for (region, chunk) in chunks {
        by_region.entry(region).or_default().push(chunk);
    }
    let regions = parked
        .regions
        .iter()
        .enumerate()
        .map(|(index, info)| {
            let mut chunks = by_region.remove(&index).unwrap_or_default();
            chunks.sort_by_key(|c| c.offset);
            RegionRecord {
                name: info.name.clone(),
                addr: info.addr,
                len: info.len,
                kind: info.kind.clone(),
                chunks,
            }
        })
        .collect();
    let record = RankRecord {
        rank,
        node: ctx.node.to_owned(),
        pid,
        fds,
        mappings,
        regions,
        stats: WriteStats::default(),
        warnings,
        cwd,
        process,
    };
    let inputs = inputs.stamps(&parked.regions);
    Ok(Captured {
        report,
        record,
        inputs,
    })
}

/// What a capture of a rank gives.
#[derive(Debug)]
pub(crate) struct Captured {
    /// What the rank is told at its resume.
    pub(crate) report: RankCaptureReport,
    /// Its part of the manifest, once durable.
    pub(crate) record: RankRecord,
    /// The files it read after the resume, as they were (see `inputs.rs`).
    pub(crate) inputs: InputStamps,
}

/// Nanoseconds since `t`, saturating.
pub fn nanos(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use cryo_core::format::manifest::{Backing, RegionKind};

    use super::*;
    use crate::tracking::plan;

    fn region(name: &str, addr: u64, len: u64) -> RegionInfo {
        RegionInfo {
            name: name.into(),
            addr,
            len,
            kind: RegionKind::Anonymous,
        }
    }

    fn mapping(start: u64, end: u64) -> MappingRecord {
        MappingRecord {
            start,
            end,
            prot: 3,
            shared: false,
            backing: Backing::Anonymous,
            region: None,
        }
    }

    #[test]
    fn plan_cuts_regions_into_chunks() {
        let pieces = plan(&[region("a", 0, 10), region("b", 100, 4)], 4);
        let got: Vec<(usize, u64, usize)> =
            pieces.iter().map(|p| (p.region, p.offset, p.len)).collect();
        assert_eq!(got, vec![(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 4)]);
    }

    #[test]
    fn a_region_written_whole_goes_hot_and_is_probed_again() {
        // The first scan says nothing (the region was just filled).
        let heat = Heat::default().next(Some(1.0));
        assert_eq!(heat, Heat::Tracked);
        assert!(heat.scans());
        // Written whole between two captures: hot, copied unscanned.
        let mut heat = heat.next(Some(0.99));
        assert_eq!(heat, Heat::Hot { left: HOT_CAPTURES });
        let mut unscanned = 0;
        while !heat.scans() {
            heat = heat.next(None);
            unscanned += 1;
        }
        assert_eq!(unscanned, HOT_CAPTURES - 1);
        // The probe scans and protects again; what it reports is not a
        // measurement (the region was unprotected), the next scan's is.
        let heat = heat.next(Some(1.0));
        assert_eq!(heat, Heat::Tracked);
        assert_eq!(heat.next(Some(0.05)), Heat::Tracked);
        assert!(matches!(heat.next(Some(1.0)), Heat::Hot { .. }));
    }

    #[test]
    fn partly_written_and_untracked_regions_are_never_hot() {
        assert_eq!(Heat::Tracked.next(Some(0.9)), Heat::Tracked);
        assert_eq!(Heat::Tracked.next(None), Heat::Unmeasured);
        assert_eq!(Heat::Unmeasured.next(Some(1.0)), Heat::Tracked);
        // A sampled probe measures like a whole one.
        assert_eq!(Heat::Sampled.next(Some(0.5)), Heat::Tracked);
        assert_eq!(Heat::Sampled.next(None), Heat::Unmeasured);
        assert!(matches!(Heat::Sampled.next(Some(1.0)), Heat::Hot { .. }));
        assert!(Heat::Sampled.measures() && Heat::Tracked.measures());
        assert!(!Heat::Unmeasured.measures() && !(Heat::Hot { left: 1 }).measures());
    }

    #[test]
    fn regions_must_be_mapped() {
        let maps = vec![mapping(0x1000, 0x3000), mapping(0x3000, 0x4000)];
        check_regions(0, &[region("a", 0x1000, 0x3000)], &maps).unwrap();
        assert!(check_regions(0, &[region("a", 0x1000, 0x3001)], &maps).is_err());
        assert!(check_regions(0, &[region("a", u64::MAX - 1, 10)], &maps).is_err());
        assert!(check_regions(0, &[region("../a", 0x1000, 1)], &maps).is_err());
    }
}
