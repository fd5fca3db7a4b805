//! Copying a rank's chunks from where they are (the parked rank, its
//! snapshot, the files it only reads) into the copy budget, and storing
//! them from there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cryo_core::format::manifest::ChunkRef;
use cryo_core::store::writer::RankWriter;
use rayon::prelude::*;

use crate::capture::{nanos, CaptureContext, CaptureError, Parked};
use crate::inputs::Inputs;
use crate::pool::Slot;
use crate::tracking::Piece;

/// Where a rank's memory is copied from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The parked rank itself: ranks parked together take turns.
    Parked,
    /// Its snapshot, `pid`, while the rank runs: no turn, so a rank that
    /// parks meanwhile never waits behind it.
    Snapshot(u32),
    /// The files it only reads, while it runs, read as a snapshot is.
    Inputs(&'a Inputs),
}

/// Chunks of a snapshot read in one batch, per thread of the larger of the
/// copy and store pools: enough for every store thread, and a copy of a
/// few ms, which is what a rank that parks meanwhile may wait for.
const SNAPSHOT_BATCH_PER_THREAD: usize = 16;

/// The agent copies `pieces` of the parked rank into `slots`
/// (`process_vm_readv`), in turn with the node's other parked ranks.
pub(crate) fn copy_by_agent(
    ctx: &CaptureContext<'_>,
    parked: &Parked,
    pieces: &[Piece],
    slots: &mut [Slot],
) -> Result<(), CaptureError> {
    copy(ctx, parked, Source::Parked, pieces, slots)
}

/// Copies `pieces` of `parked`'s regions from `source` into `slots`.
fn copy(
    ctx: &CaptureContext<'_>,
    parked: &Parked,
    source: Source<'_>,
    pieces: &[Piece],
    slots: &mut [Slot],
) -> Result<(), CaptureError> {
    if pieces.is_empty() {
        // Nothing to wait for a turn or a copy thread for.
        return Ok(());
    }
    let (pid, _turn) = match source {
        Source::Parked => (parked.pid, Some(ctx.gate.take_turn())),
        Source::Snapshot(pid) => (pid, None),
        Source::Inputs(inputs) => return inputs.read(ctx.copy_threads, parked.rank, pieces, slots),
    };
    ctx.copy_threads.install(|| {
        pieces
            .par_iter()
            .zip(slots.par_iter_mut())
            .try_for_each(|(piece, slot)| {
                let region = &parked.regions[piece.region];
                ctx.access
                    .read_memory(
                        pid,
                        region.addr + piece.offset,
                        &mut slot.bytes()[..piece.len],
                    )
                    .map_err(|source| CaptureError::Memory {
                        rank: parked.rank,
                        region: region.name.clone(),
                        source,
                    })
            })
    })
}

/// Copies and stores `pieces` from `source` batch by batch, through as
/// many pool slots as are free; returns the chunks and the time spent
/// copying.
pub(crate) fn stream(
    ctx: &CaptureContext<'_>,
    writer: &RankWriter<'_>,
    parked: &Parked,
    source: Source<'_>,
    pieces: &[Piece],
) -> Result<(Vec<(usize, ChunkRef)>, u64), CaptureError> {
    let mut chunks = Vec::with_capacity(pieces.len());
    let mut copy_ns = 0;
    let mut rest = pieces;
    while !rest.is_empty() {
        let max = match source {
            Source::Parked => rest.len(),
            // A rank that parks meanwhile copies first: a snapshot (or an
            // input) is read in short batches, each once no rank is parked.
            Source::Snapshot(_) | Source::Inputs(_) => {
                ctx.gate.wait_idle(ctx.pool);
                let threads = ctx
                    .copy_threads
                    .current_num_threads()
                    .max(ctx.store_threads.current_num_threads());
                rest.len().min(SNAPSHOT_BATCH_PER_THREAD * threads)
            }
        };
        // A whole batch, warming cold slots for it if need be: from a cold
        // budget `take_some` alone would stream one slot at a time, each
        // chunk compressed on its own.
        let mut slots = ctx
            .pool
            .try_take(max)
            .unwrap_or_else(|| ctx.pool.take_some(max));
        let (batch, tail) = rest.split_at(slots.len());
        let t = Instant::now();
        copy(ctx, parked, source, batch, &mut slots)?;
        copy_ns += nanos(t);
        chunks.extend(store(ctx, writer, batch.to_vec(), slots)?);
        rest = tail;
    }
    Ok((chunks, copy_ns))
}

pub(crate) fn store(
    ctx: &CaptureContext<'_>,
    writer: &RankWriter<'_>,
    pieces: Vec<Piece>,
    slots: Vec<Slot>,
) -> Result<Vec<(usize, ChunkRef)>, CaptureError> {
    ctx.store_threads
        .install(|| store_in_pool(writer, pieces, slots, ctx.cancelled))
}

/// Checks that every reused chunk is still stored (see
/// `RankWriter::reuse_chunk`).
pub(crate) fn reuse(
    ctx: &CaptureContext<'_>,
    writer: &RankWriter<'_>,
    reused: Vec<(usize, ChunkRef)>,
) -> Result<Vec<(usize, ChunkRef)>, CaptureError> {
    ctx.store_threads.install(|| {
        reused
            .into_par_iter()
            .map(|(region, chunk)| Ok((region, writer.reuse_chunk(&chunk)?)))
            .collect()
    })
}

fn store_in_pool(
    writer: &RankWriter<'_>,
    pieces: Vec<Piece>,
    slots: Vec<Slot>,
    cancelled: &AtomicBool,
) -> Result<Vec<(usize, ChunkRef)>, CaptureError> {
    pieces
        .into_par_iter()
        .zip(slots.into_par_iter())
        .map(|(piece, slot)| {
            if cancelled.load(Ordering::Acquire) {
                return Err(CaptureError::Aborted {
                    rank: writer.rank(),
                });
            }
            let chunk = writer.store_chunk(piece.offset, &slot.as_slice()[..piece.len]);
            // The slot goes back to the pool as soon as its chunk is stored.
            drop(slot);
            Ok((piece.region, chunk?))
        })
        .collect()
}
