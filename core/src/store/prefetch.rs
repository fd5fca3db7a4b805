//! Reading a rank's stored chunks ahead of its restore.
//!
//! A restarting rank spends its first moments in the launcher and in
//! `MPI_Init`, waiting on other processes, while the store sits idle. A
//! prefetch reads the chunks its restore will need during that time, so
//! that the restore finds them in the page cache (or the parallel
//! filesystem's client cache) instead of waiting for the disks.
//!
//! The prefetch only reads: the bytes are discarded, nothing is decoded or
//! trusted, and every failure is counted rather than returned. The restore
//! still reads, verifies and names any problem itself. Reads go through the
//! store's [`StoreFs`](super::fs::StoreFs), in large pieces into one small
//! buffer per thread, so a prefetch takes little memory whatever the
//! rank's size.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::format::chunk::ChunkHash;
use crate::format::header::HEADER_LEN;
use crate::format::limits::MAX_STORED_CHUNK_LEN;
use crate::format::manifest::RankRecord;
use crate::format::pack::{ChunkPlace, PackId, ENTRY_HEADER_LEN};
use crate::store::JobStore;

/// Entries of one pack closer than this are read as one range, as the
/// restore reads them.
const JOIN_GAP: u64 = 256 << 10;
/// The most one read asks for: the buffer each prefetch thread holds.
const PIECE: u64 = 4 << 20;

/// What one read of a prefetch covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A byte range of a pack.
    Pack {
        /// The pack.
        pack: PackId,
        /// First byte.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A whole loose chunk file (format 1).
    Loose(ChunkHash),
}

/// The reads that bring one rank's chunks into the cache: each pack's
/// entries sorted by offset and joined into ranges, and each loose chunk
/// file once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchPlan {
    sources: Vec<Source>,
    bytes: u64,
}

impl PrefetchPlan {
    /// The plan for every chunk of `record`'s regions.
    pub fn for_rank(record: &RankRecord) -> PrefetchPlan {
        let mut entries: Vec<(PackId, u64, u64)> = Vec::new();
        let mut loose: Vec<ChunkHash> = Vec::new();
        for chunk in record.regions.iter().flat_map(|r| &r.chunks) {
            match chunk.place {
                ChunkPlace::Pack { pack, offset } => entries.push((
                    pack,
                    offset,
                    ENTRY_HEADER_LEN as u64 + u64::from(chunk.stored_len),
                )),
                ChunkPlace::Loose => loose.push(chunk.hash),
            }
        }
        entries.sort_unstable();
        loose.sort_unstable();
        loose.dedup();
        let mut sources = Vec::new();
        let mut bytes = 0u64;
        for (pack, offset, len) in entries {
            if let Some(Source::Pack {
                pack: last,
                offset: start,
                len: joined,
            }) = sources.last_mut()
            {
                let end = *start + *joined;
                if *last == pack && offset <= end + JOIN_GAP {
                    // Repeated chunks (deduplicated within the rank) add
                    // nothing; a gap is read and skipped.
                    let new_end = end.max(offset + len);
                    bytes += new_end - end;
                    *joined = new_end - *start;
                    continue;
                }
            }
            bytes += len;
            sources.push(Source::Pack { pack, offset, len });
        }
        for hash in loose {
            sources.push(Source::Loose(hash));
        }
        PrefetchPlan { sources, bytes }
    }

    /// Reads the plan makes.
    pub fn reads(&self) -> usize {
        self.sources.len()
    }

    /// Bytes of packs it reads (loose chunk files are counted once read).
    pub fn pack_bytes(&self) -> u64 {
        self.bytes
    }

    /// The pack ranges, as (pack, offset, length), in reading order.
    pub fn pack_ranges(&self) -> impl Iterator<Item = (PackId, u64, u64)> + '_ {
        self.sources.iter().filter_map(|source| match *source {
            Source::Pack { pack, offset, len } => Some((pack, offset, len)),
            Source::Loose(_) => None,
        })
    }
}

/// What a prefetch read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Bytes read.
    pub bytes: u64,
    /// Reads of the plan completed.
    pub reads: u64,
    /// Reads of the plan that failed (a missing pack, an I/O error); the
    /// restore meets the same problem and names it.
    pub failed: u64,
    /// Whether it was stopped before the end of the plan.
    pub stopped: bool,
}

impl JobStore {
    /// Reads what `plan` names into the cache, on `threads` threads, until
    /// done or until `stop` is set (checked between reads of at most 4
    /// MiB). Never fails: see the module documentation.
    pub fn prefetch(
        &self,
        plan: &PrefetchPlan,
        threads: usize,
        stop: &AtomicBool,
    ) -> PrefetchReport {
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let reads = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let work = || {
            let mut buf = Vec::new();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Some(source) = plan.sources.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                match self.prefetch_one(source, &mut buf, stop) {
                    Some(read) => {
                        bytes.fetch_add(read, Ordering::Relaxed);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        let threads = threads.clamp(1, plan.sources.len().max(1));
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        let reads = reads.into_inner();
        let failed = failed.into_inner();
        PrefetchReport {
            bytes: bytes.into_inner(),
            reads,
            failed,
            stopped: (reads + failed) < plan.sources.len() as u64,
        }
    }

    /// Reads one source through `buf`; the bytes read, or `None` if it
    /// failed. A stop between pieces returns what was read so far.
    fn prefetch_one(&self, source: &Source, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<u64> {
        match *source {
            Source::Loose(hash) => {
                let max = (HEADER_LEN + MAX_STORED_CHUNK_LEN) as u64;
                self.fs
                    .read_capped_into(&self.chunk_path(&hash), max, buf)
                    .ok()?;
                let read = buf.len() as u64;
                buf.clear();
                Some(read)
            }
            Source::Pack { pack, offset, len } => {
                let file = self.pack_file(&pack).ok()?;
                let path = self.pack_path(&pack);
                let mut done = 0u64;
                while done < len && !stop.load(Ordering::Relaxed) {
                    let piece = (len - done).min(PIECE);
                    buf.resize(usize::try_from(piece).ok()?, 0);
                    self.fs.read_at(&file, &path, offset + done, buf).ok()?;
                    done += piece;
                }
                Some(done)
            }
        }
    }
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
