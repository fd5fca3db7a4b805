//! Which chunks of a parked rank a capture copies: the regions cut into
//! chunk-sized pieces, the pages written since the previous capture (write
//! tracking), the chunks reused unchanged from the previous epoch, and the
//! regions rewritten whole between captures (hot), which are copied without
//! a scan.

use std::collections::HashMap;

use cryo_core::format::manifest::{ChunkRef, RegionRecord};
use cryo_core::protocol::RegionInfo;

use crate::capture::{CaptureContext, Parked};
use crate::inputs::InputStamps;
use crate::procfs::ProcessAccess;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) region: usize,
    pub(crate) offset: u64,
    pub(crate) len: usize,
}

pub(crate) fn plan(regions: &[RegionInfo], chunk: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for (index, region) in regions.iter().enumerate() {
        let mut offset = 0u64;
        while offset < region.len {
            let len = usize::try_from((region.len - offset).min(chunk as u64)).unwrap_or(chunk);
            out.push(Piece {
                region: index,
                offset,
                len,
            });
            offset += len as u64;
        }
    }
    out
}

/// What a capture copies, and what it takes unchanged from the previous
/// epoch.
#[derive(Debug, Default)]
pub(crate) struct Selection {
    pub(crate) copy: Vec<Piece>,
    pub(crate) reuse: Vec<(usize, ChunkRef)>,
}

/// What a rank process's last durable capture stored: the next one reuses
/// from it what did not change.
#[derive(Debug, Default)]
pub(crate) struct Baseline {
    /// The regions and their chunks.
    pub(crate) regions: Vec<RegionRecord>,
    /// The files it read once the rank ran again, as they were then
    /// (`inputs.rs`).
    pub(crate) inputs: InputStamps,
}

/// The previous epoch's chunks of `region`, if they describe it exactly as
/// `plan` would cut it now.
fn matching_baseline<'a>(
    baseline: &'a [RegionRecord],
    region: &RegionInfo,
    pieces: &[Piece],
) -> Option<&'a [ChunkRef]> {
    let base = baseline
        .iter()
        .find(|b| b.name == region.name && b.addr == region.addr && b.len == region.len)?;
    cut_alike(&base.chunks, pieces).then_some(&base.chunks[..])
}

/// Whether `chunks` cut their region as `pieces` do.
pub(crate) fn cut_alike(chunks: &[ChunkRef], pieces: &[Piece]) -> bool {
    chunks.len() == pieces.len()
        && (chunks.iter().zip(pieces)).all(|(c, p)| c.offset == p.offset && c.len as usize == p.len)
}

/// Share of a region's chunks written between two captures from which on it
/// counts as hot: re-protecting it would cost a write fault (about 1.4 µs)
/// per page for almost no chunk saved.
pub const HOT_SHARE: f64 = 0.95;

/// Captures a hot region is copied whole without being scanned or
/// protected again, before it is probed once more.
pub const HOT_CAPTURES: u32 = 8;

/// A hot region of at least this many chunks is probed on a sample: one
/// chunk in [`SAMPLE_EVERY`] is protected, so the application pays the
/// write faults of a sixteenth of the region (a whole probe of 256 MiB
/// rewritten cost it about 150 ms here).
pub const SAMPLE_MIN_CHUNKS: usize = 64;

/// One chunk in this many is protected by a sampled probe.
pub const SAMPLE_EVERY: usize = 16;

/// How a region's writes looked at the previous captures of its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Heat {
    /// Not scanned yet, or the last scan followed a time without
    /// protection: what this scan reports says nothing about the region.
    #[default]
    Unmeasured,
    /// The last scan protected the region again: this scan reports what
    /// was written between the two captures.
    Tracked,
    /// The last capture probed a hot region by protecting only every
    /// [`SAMPLE_EVERY`]th chunk: this scan measures those chunks; the
    /// others, unprotected, count as written.
    Sampled,
    /// (Nearly) every chunk was written between two captures: the region
    /// is copied whole, unscanned and unprotected (so the application takes
    /// no write faults), for `left` more captures; then it is probed
    /// (protected again, whole or on a sample) and measured at the capture
    /// after.
    Hot {
        /// Captures left before the region is scanned again.
        left: u32,
    },
}

impl Heat {
    /// Whether this capture scans (and protects again) the region.
    pub fn scans(self) -> bool {
        !matches!(self, Heat::Hot { left } if left > 1)
    }

    /// Whether this capture's scan measures the region's writes (the
    /// previous one protected it, whole or on a sample).
    pub fn measures(self) -> bool {
        matches!(self, Heat::Tracked | Heat::Sampled)
    }

    /// The state after this capture, given the share of the region's
    /// measured chunks its scan found written (`None`: not scanned, or the
    /// scan failed).
    pub fn next(self, dirty_share: Option<f64>) -> Heat {
        match (self, dirty_share) {
            (Heat::Hot { left }, _) if left > 1 => Heat::Hot { left: left - 1 },
            (Heat::Tracked | Heat::Sampled, Some(share)) if share >= HOT_SHARE => {
                Heat::Hot { left: HOT_CAPTURES }
            }
            (_, Some(_)) => Heat::Tracked,
            (_, None) => Heat::Unmeasured,
        }
    }
}

/// Each region's [`Heat`], by name and address, for one rank process.
pub type RegionHeat = HashMap<(String, u64), Heat>;

/// Chooses the chunks to copy. Every tracked region is scanned for pages
/// written since the previous capture and protected again in the same
/// walk (the rank is parked, so nothing writes meanwhile). A chunk with no
/// written page keeps the previous epoch's chunk, if that epoch stored
/// this rank (`baseline`); everything else is copied. Hot regions (see
/// [`Heat`]) are copied whole without a scan.
pub(crate) fn select(
    ctx: &CaptureContext<'_>,
    parked: &Parked,
    baseline: Option<&[RegionRecord]>,
    heat: &mut RegionHeat,
    chunk: usize,
) -> Selection {
    let mut out = Selection::default();
    let pieces = plan(&parked.regions, chunk);
    heat.retain(|(name, addr), _| {
        parked
            .regions
            .iter()
            .any(|r| &r.name == name && r.addr == *addr)
    });
    for (index, region) in parked.regions.iter().enumerate() {
        let mine: Vec<Piece> = pieces
            .iter()
            .filter(|p| p.region == index)
            .copied()
            .collect();
        let state = heat.entry((region.name.clone(), region.addr)).or_default();
        if !state.scans() {
            *state = state.next(None);
            out.copy.extend(mine);
            continue;
        }
        let Some(dirty) = scan(ctx.access, parked, region, state, chunk, mine.len()) else {
            out.copy.extend(mine);
            continue;
        };
        let Some(base) = baseline.and_then(|b| matching_baseline(b, region, &mine)) else {
            out.copy.extend(mine);
            continue;
        };
        for ((piece, chunk_ref), dirty) in mine.into_iter().zip(base).zip(dirty) {
            if dirty {
                out.copy.push(piece);
            } else {
                out.reuse.push((index, *chunk_ref));
            }
        }
    }
    out
}

/// Scans `region` for the chunks written since the previous capture and
/// moves its [`Heat`] on; `None` if it is not tracked (every chunk is
/// copied). The pages are protected again in the same walk, except where
/// this scan is what makes the region hot: a region that is measured is
/// looked at first without protecting it, and if it turns out rewritten
/// whole it stays unprotected, since it will be copied whole for the next
/// captures anyway and protecting it would cost the application a write
/// fault per page (about 150 ms per 256 MiB here). Only a region found not
/// hot is walked a second time, to protect it. A large hot region is
/// probed on a sample (see [`SAMPLE_EVERY`]).
fn scan(
    access: &dyn ProcessAccess,
    parked: &Parked,
    region: &RegionInfo,
    state: &mut Heat,
    chunk: usize,
    chunks: usize,
) -> Option<Vec<bool>> {
    let before = *state;
    let untracked = |state: &mut Heat, err: std::io::Error| {
        tracing::debug!(rank = parked.rank, epoch = parked.epoch, region = %region.name, error = %err, "region.untracked");
        *state = before.next(None);
        None
    };
    if before == (Heat::Hot { left: 1 }) && chunks >= SAMPLE_MIN_CHUNKS {
        for sampled in (0..chunks).step_by(SAMPLE_EVERY) {
            let (start, len) = pages_of(region, sampled as u64 * chunk as u64, chunk as u64);
            if let Err(err) = access.written_pages(parked.pid, start, len, true) {
                return untracked(state, err);
            }
        }
        *state = Heat::Sampled;
        // Unprotected since it went hot: every chunk counts as written.
        return Some(vec![true; chunks]);
    }
    // A protected buffer need not start on a page: scan the pages it
    // touches (chunks stay cut from its own start).
    let (scan_start, scan_len) = pages_of(region, 0, region.len);
    let measured = |c: usize| before != Heat::Sampled || c % SAMPLE_EVERY == 0;
    let looked = if before.measures() {
        access
            .written_pages(parked.pid, scan_start, scan_len, false)
            .map(|written| dirty_chunks(&written, region.addr, chunk, chunks))
            .ok()
            .filter(|dirty| matches!(before.next(Some(share(dirty, measured))), Heat::Hot { .. }))
    } else {
        None
    };
    let dirty = match looked {
        Some(dirty) => dirty,
        None => match access.written_pages(parked.pid, scan_start, scan_len, true) {
            Ok(written) => dirty_chunks(&written, region.addr, chunk, chunks),
            Err(err) => return untracked(state, err),
        },
    };
    let share = share(&dirty, measured);
    *state = before.next(Some(share));
    if matches!(*state, Heat::Hot { .. }) && !matches!(before, Heat::Hot { .. }) {
        tracing::info!(rank = parked.rank, epoch = parked.epoch, region = %region.name, written_share = share, "region.hot");
    }
    Some(dirty)
}

/// The whole pages touching `len` bytes at `offset` into `region`, as
/// `(start, len)`, clipped to the region.
fn pages_of(region: &RegionInfo, offset: u64, len: u64) -> (u64, u64) {
    let start = region.addr + offset.min(region.len);
    let end = region.addr + offset.saturating_add(len).min(region.len);
    let first = start / PAGE * PAGE;
    (first, end.div_ceil(PAGE) * PAGE - first)
}

/// Which of a region's `chunks` chunks (cut from `addr`) the `written`
/// page ranges touch.
fn dirty_chunks(written: &[(u64, u64)], addr: u64, chunk: usize, chunks: usize) -> Vec<bool> {
    let mut dirty = vec![false; chunks];
    for &(start, end) in written {
        let from = start.saturating_sub(addr) / chunk as u64;
        let to = end.saturating_sub(addr).div_ceil(chunk as u64);
        for flag in dirty
            .iter_mut()
            .take(usize::try_from(to).unwrap_or(usize::MAX))
            .skip(usize::try_from(from).unwrap_or(usize::MAX))
        {
            *flag = true;
        }
    }
    dirty
}

/// The share of the chunks that `measured` counts which are written.
fn share(dirty: &[bool], measured: impl Fn(usize) -> bool) -> f64 {
    let (written, counted) = dirty
        .iter()
        .enumerate()
        .filter(|(c, _)| measured(*c))
        .fold((0usize, 0usize), |(w, n), (_, d)| {
            (w + usize::from(*d), n + 1)
        });
    written as f64 / counted.max(1) as f64
}

pub(crate) const PAGE: u64 = 4096;

#[cfg(test)]
#[path = "tracking_tests.rs"]
mod tests;
