//! Bringing a rank's stored chunks into the page cache ahead of its
//! restore.
//!
//! A restarting rank spends its first moments in the launcher and in
//! `MPI_Init`, waiting on other processes, while the store sits idle. A
//! prefetch asks the kernel to read the chunks its restore will need during
//! that time (`POSIX_FADV_WILLNEED` on each range), so that the restore
//! finds them in the page cache (or the parallel filesystem's client cache)
//! instead of waiting for the disks.
//!
//! The kernel reads in the background, into the cache only: the prefetch
//! copies nothing into the process and takes next to no CPU, which matters
//! where ranks fill the cores and the data turns out to be cached already.
//! (Reading the ranges into a buffer was measured first: on this 2-core
//! machine its copies cost the restore as much as the early start gained.)
//! Nothing is decoded or trusted, and every failure is counted rather than
//! returned: the restore still reads, verifies and names any problem
//! itself. A filesystem that keeps no page cache may ignore the advice.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::format::chunk::ChunkHash;
use crate::format::manifest::RankRecord;
use crate::format::pack::{ChunkPlace, PackId, ENTRY_HEADER_LEN};
use crate::store::JobStore;

/// Entries of one pack closer than this are asked for as one range, as the
/// restore reads them.
const JOIN_GAP: u64 = 256 << 10;
/// The most one request asks for, so that a stop is seen soon.
const PIECE: u64 = 64 << 20;

/// What one request of a prefetch covers.
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

/// The ranges that bring one rank's chunks into the cache: each pack's
/// entries sorted by offset and joined, and each loose chunk file once.
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
        // Ranges of at most PIECE, so that a stop is seen between them.
        let mut sources: Vec<Source> = sources
            .into_iter()
            .flat_map(|source| {
                let (pack, offset, len) = match source {
                    Source::Pack { pack, offset, len } => (pack, offset, len),
                    Source::Loose(_) => return vec![source],
                };
                (0..len.div_ceil(PIECE))
                    .map(|i| Source::Pack {
                        pack,
                        offset: offset + i * PIECE,
                        len: (len - i * PIECE).min(PIECE),
                    })
                    .collect()
            })
            .collect();
        for hash in loose {
            sources.push(Source::Loose(hash));
        }
        PrefetchPlan { sources, bytes }
    }

    /// What is left of the plan once its first `done` requests are made
    /// (see [`PrefetchReport::done`]).
    pub fn rest_after(&self, done: u64) -> PrefetchPlan {
        let from = usize::try_from(done)
            .unwrap_or(usize::MAX)
            .min(self.sources.len());
        let sources = self.sources[from..].to_vec();
        let bytes = sources
            .iter()
            .map(|source| match source {
                Source::Pack { len, .. } => *len,
                Source::Loose(_) => 0,
            })
            .sum();
        PrefetchPlan { sources, bytes }
    }

    /// Whether nothing is left to ask for.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Requests the plan makes: pack ranges and loose chunk files.
    pub fn reads(&self) -> usize {
        self.sources.len()
    }

    /// Bytes of packs it asks for (loose chunk files are counted as their
    /// sizes are found).
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

/// What a prefetch asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Bytes asked for.
    pub bytes: u64,
    /// Requests of the plan made.
    pub reads: u64,
    /// Requests of the plan that failed (a missing pack, an I/O error); the
    /// restore meets the same problem and names it.
    pub failed: u64,
    /// Whether it was stopped before the end of the plan.
    pub stopped: bool,
}

impl PrefetchReport {
    /// Requests made, whether they succeeded or not: the plan's first
    /// `done()` are behind it.
    pub fn done(&self) -> u64 {
        self.reads + self.failed
    }

    /// Adds what a later prefetch of the rest asked for.
    pub fn add(&mut self, later: &PrefetchReport) {
        self.bytes += later.bytes;
        self.reads += later.reads;
        self.failed += later.failed;
        self.stopped = later.stopped;
    }
}

impl JobStore {
    /// Asks for what `plan` names, in order, on `threads` threads (a request
    /// may wait for room in the device's queue), until done or until `stop`
    /// is set (checked between requests of at most 64 MiB; the first
    /// [`PrefetchReport::done`] requests are then made, the rest not).
    /// Never fails: see the module documentation.
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
        let work = || loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(source) = plan.sources.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            match self.prefetch_one(source) {
                Some(asked) => {
                    bytes.fetch_add(asked, Ordering::Relaxed);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
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

    /// Asks for one source; the bytes asked for, or `None` if it failed.
    fn prefetch_one(&self, source: &Source) -> Option<u64> {
        match *source {
            Source::Loose(hash) => {
                let path = self.chunk_path(&hash);
                let file = self.fs.open_read(&path).ok()?;
                let len = file.metadata().ok()?.len();
                self.fs.advise_willneed(&file, &path, 0, len).ok()?;
                Some(len)
            }
            Source::Pack { pack, offset, len } => {
                let file = self.pack_file(&pack).ok()?;
                let path = self.pack_path(&pack);
                self.fs.advise_willneed(&file, &path, offset, len).ok()?;
                Some(len)
            }
        }
    }
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
