//! The parked copy made by the rank itself: the agent names the pieces and
//! the budget slots they go to, the rank copies them (memcpy from its own
//! memory into its view of the budget's memfd) and answers.
//!
//! `process_vm_readv` pins each page of the rank it reads: 5 GB/s on one
//! thread here in small pages, and no more than 8–10 GB/s however many
//! threads share one process's pages. A rank reading its own memory
//! copies at memcpy speed, and the node's parked ranks copy at once, each
//! on its own core: 2 x 256 MiB in 27 ms here against 50–53 ms for the
//! agent's copy, in turns or all at once. The agent still copies when the
//! rank's runtime is older, the rank declines, or `--self-copy off`.

use std::str::FromStr;
use std::time::Instant;

use cryo_core::format::manifest::MappingRecord;
use cryo_core::protocol::{CopyPiece, RegionInfo};

use crate::capture::{nanos, CaptureContext, CaptureError, Parked, ParkedRank};
use crate::pool::{BufferPool, Slot};
use crate::stream::copy_by_agent;
use crate::tracking::Piece;

/// Who copies a parked rank's memory into the budget (`--self-copy`,
/// `CRYO_SELF_COPY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelfCopy {
    /// The rank itself, when its runtime can (protocol version 7).
    #[default]
    On,
    /// Always the agent (`process_vm_readv`), the ranks of a node in turns.
    Off,
}

impl FromStr for SelfCopy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(SelfCopy::On),
            "off" => Ok(SelfCopy::Off),
            other => Err(format!("{other:?}: expected on or off")),
        }
    }
}

impl std::fmt::Display for SelfCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SelfCopy::On => "on",
            SelfCopy::Off => "off",
        })
    }
}

/// Below this a rank's copy is the agent's: `process_vm_readv` moves it in
/// under a millisecond, less than waking the rank to copy it may take.
pub const SELF_COPY_MIN_BYTES: u64 = 4 << 20;

impl SelfCopy {
    /// This epoch's choice for a node with `ranks` local ranks: off when
    /// they outnumber the cores. Each rank must then wait for a core to
    /// copy, and in hand runs of 16 ranks per core the pauses doubled
    /// (94 ms against 44), where the agent copies them all on its threads.
    pub fn for_epoch(self, ranks: usize) -> SelfCopy {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self {
            SelfCopy::On if ranks <= cores => SelfCopy::On,
            _ => SelfCopy::Off,
        }
    }
}

/// Why a rank did not copy its own memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelfCopyRefusal {
    /// It answered that it copied nothing (its runtime is older, the
    /// request named memory outside its regions, it could not map the
    /// budget): the agent copies instead.
    Declined(String),
    /// No answer (the rank left, or took too long): the slots may be half
    /// written, so they are not used, and the capture fails.
    NoAnswer(String),
}

/// Copies `pieces` of the parked rank into `slots`: by the rank itself if
/// it can, else by the agent. `threads`: the rank's share of the node's
/// copy threads.
pub(crate) fn copy_parked(
    ctx: &CaptureContext<'_>,
    self_copy: SelfCopy,
    parked: &Parked,
    control: &mut dyn ParkedRank,
    pieces: &[Piece],
    slots: &mut [Slot],
) -> Result<(), CaptureError> {
    if pieces.is_empty() {
        return Ok(());
    }
    let bytes: u64 = pieces.iter().map(|p| p.len as u64).sum();
    if self_copy == SelfCopy::On && bytes >= SELF_COPY_MIN_BYTES {
        let asks = asks(parked, pieces, slots);
        let t = Instant::now();
        match control.copy_into(ctx.pool.memfd(), asks, ctx.self_copy_threads) {
            Ok(()) => {
                tracing::info!(
                    rank = parked.rank,
                    epoch = parked.epoch,
                    copy_us = nanos(t) / 1000,
                    "rank.self_copied"
                );
                return Ok(());
            }
            Err(SelfCopyRefusal::Declined(reason)) => {
                tracing::warn!(
                    rank = parked.rank,
                    epoch = parked.epoch,
                    reason = %reason,
                    "rank.self_copy_declined"
                );
            }
            Err(SelfCopyRefusal::NoAnswer(reason)) => {
                return Err(CaptureError::SelfCopy {
                    rank: parked.rank,
                    reason,
                })
            }
        }
    }
    copy_by_agent(ctx, parked, pieces, slots)
}

/// The slots a resuming rank's next parked copy will go to, when it gained
/// new ones, for it to fill its view of them while it runs (see
/// `BufferPool::reserve_for`): only for a rank that copies itself (a node
/// with a core per rank, a copy of at least [`SELF_COPY_MIN_BYTES`]),
/// slots for all of its regions, at most its share of the budget among the
/// node's `local_ranks`.
pub(crate) fn slots_to_fill(
    pool: &BufferPool,
    self_copy: SelfCopy,
    local_ranks: usize,
    rank: u32,
    regions: &[RegionInfo],
) -> Option<Vec<(u64, u64)>> {
    let bytes: u64 = regions.iter().map(|r| r.len).sum();
    if self_copy != SelfCopy::On || bytes < SELF_COPY_MIN_BYTES {
        return None;
    }
    let slot = pool.slot_size() as u64;
    let wanted: u64 = regions.iter().map(|r| r.len.div_ceil(slot)).sum();
    let share = pool.slots() / local_ranks.max(1);
    pool.reserve_for(
        usize::try_from(wanted).unwrap_or(usize::MAX).min(share),
        rank,
    )
}

/// The request: each piece's address in the rank and its slot's place in
/// the budget.
fn asks(parked: &Parked, pieces: &[Piece], slots: &[Slot]) -> Vec<CopyPiece> {
    pieces
        .iter()
        .zip(slots)
        .map(|(piece, slot)| CopyPiece {
            addr: parked.regions[piece.region].addr + piece.offset,
            len: piece.len as u64,
            offset: slot.offset(),
        })
        .collect()
}

/// Whether every mapping that holds part of a region is readable: a rank
/// copies only then.
pub(crate) fn regions_readable(regions: &[RegionInfo], mappings: &[MappingRecord]) -> bool {
    regions.iter().all(|region| {
        let end = region.addr.saturating_add(region.len);
        mappings
            .iter()
            .filter(|m| m.start < end && region.addr < m.end)
            .all(|m| m.prot & PROT_READ != 0)
    })
}

/// `PROT_READ` in [`MappingRecord::prot`].
const PROT_READ: u32 = 1;

/// How long a rank may take to answer a request to copy `bytes`: far more
/// than a memcpy needs even on a loaded node, since giving up fails the
/// capture.
pub(crate) fn answer_within(bytes: u64) -> std::time::Duration {
    // 10 s, plus a second per 100 MB (100 MB/s, a hundredth of a memcpy).
    std::time::Duration::from_secs(10) + std::time::Duration::from_millis(bytes / 100_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_parses_and_prints() {
        for policy in [SelfCopy::On, SelfCopy::Off] {
            assert_eq!(policy.to_string().parse::<SelfCopy>(), Ok(policy));
        }
        assert!("maybe".parse::<SelfCopy>().is_err());
    }

    #[test]
    fn a_rank_copies_only_memory_its_maps_show_readable() {
        use cryo_core::format::manifest::{Backing, RegionKind};
        let region = RegionInfo {
            name: "state".into(),
            addr: 0x10000,
            len: 0x3000,
            kind: RegionKind::Anonymous,
        };
        let map = |start: u64, end: u64, prot: u32| MappingRecord {
            start,
            end,
            prot,
            shared: false,
            backing: Backing::Anonymous,
            region: None,
        };
        let readable = [map(0x10000, 0x12000, 3), map(0x12000, 0x13000, 1)];
        assert!(regions_readable(std::slice::from_ref(&region), &readable));
        // A guard page inside the region: the agent copies (and fails by name).
        let guarded = [map(0x10000, 0x12000, 3), map(0x12000, 0x13000, 0)];
        assert!(!regions_readable(std::slice::from_ref(&region), &guarded));
        // A mapping next to the region does not count.
        let beside = [map(0x10000, 0x13000, 3), map(0x13000, 0x14000, 0)];
        assert!(regions_readable(std::slice::from_ref(&region), &beside));
    }

    #[test]
    fn ranks_copy_themselves_only_when_each_has_a_core() {
        assert_eq!(SelfCopy::On.for_epoch(1), SelfCopy::On);
        assert_eq!(SelfCopy::On.for_epoch(1 << 20), SelfCopy::Off);
        assert_eq!(SelfCopy::Off.for_epoch(1), SelfCopy::Off);
    }

    #[test]
    fn a_large_copy_gets_a_longer_answer_time() {
        assert!(answer_within(64 << 30) > answer_within(1 << 20));
        assert!(answer_within(0) >= std::time::Duration::from_secs(10));
    }
}
