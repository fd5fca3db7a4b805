//! Writing an epoch: chunks in parallel, then each rank's part.
//!
//! An [`EpochWriter`] holds the job lock shared for as long as it lives, so
//! GC never removes chunks that the epoch is about to reference. Each rank is
//! written through a [`RankWriter`]; its part is written only after its
//! chunks are durable, and the epoch is committed by
//! [`JobStore::commit_epoch`] once every rank's part exists.
//!
//! New chunks are appended to the epoch writer's packs (`packs.rs`): one
//! agent writes a few files per checkpoint whatever the state size. A chunk
//! is written once per job: one that a sibling rank of this writer stored
//! in this epoch, or that the previous committed epoch references, is
//! referenced where it is. The writer learns the previous epoch's chunks
//! from its manifest, read once per epoch writer on the first lookup.
//! When the writer is dropped its packs are sealed with their index.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use rayon::prelude::*;
use thiserror::Error;

use crate::format::chunk::{ChunkCodec, ChunkEncodeError, ChunkHash};
use crate::format::limits::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::format::manifest::{ChunkRef, RankRecord, RegionKind, RegionRecord, WriteStats};
use crate::format::pack::{ChunkPlace, PackId, DEFAULT_PACK_SIZE};
use crate::names::{check_region_name, NameError};
use crate::store::fs::IoStepError;
use crate::store::loose::LooseBatch;
use crate::store::packs::PackSet;
use crate::store::{CommitError, JobLock, JobStore};

/// How an epoch's chunks are cut, encoded and laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Chunk size in bytes.
    pub chunk_size: usize,
    /// Chunk encoding.
    pub codec: ChunkCodec,
    /// Where new chunks go.
    pub layout: ChunkLayout,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            codec: ChunkCodec::default(),
            layout: ChunkLayout::default(),
        }
    }
}

/// Where an epoch writer puts new chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkLayout {
    /// Format 2: appended to packs, a new pack once one reaches `max_bytes`.
    Packs {
        /// The size at which a writer starts a new pack.
        max_bytes: u64,
    },
    /// Format 1: one file per chunk. Kept for comparison (`cryo bench
    /// store`); a parallel filesystem cannot carry it at scale.
    Loose,
}

impl Default for ChunkLayout {
    fn default() -> Self {
        ChunkLayout::Packs {
            max_bytes: DEFAULT_PACK_SIZE,
        }
    }
}

/// An epoch could not be started.
#[derive(Debug, Error)]
pub enum BeginError {
    /// The chunk size is out of range.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(usize),
    /// The epoch is not newer than the newest committed one.
    #[error("job {job:?}: epoch {epoch} is not newer than committed epoch {latest}")]
    NotNewer {
        /// The job.
        job: String,
        /// Requested epoch.
        epoch: u64,
        /// Newest committed epoch.
        latest: u64,
    },
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

/// Writing chunks or a part failed.
#[derive(Debug, Error)]
pub enum WriteError {
    /// Encoding failed.
    #[error("rank {rank}: {source}")]
    Encode {
        /// The rank.
        rank: u32,
        /// Why.
        source: ChunkEncodeError,
    },
    /// Writing a chunk failed (disk full, I/O error).
    #[error("rank {rank}: writing chunk failed: {source}{}", if source.is_disk_full() { " (the store is full)" } else { "" })]
    Chunk {
        /// The rank.
        rank: u32,
        /// The I/O error.
        source: IoStepError,
    },
    /// A bad region name.
    #[error("rank {rank}: {source}")]
    Name {
        /// The rank.
        rank: u32,
        /// Why.
        source: NameError,
    },
    /// A chunk the previous epoch stored, which this epoch reuses because
    /// its memory was not written since, is no longer in the store.
    #[error("rank {rank}: chunk {hash} of an earlier epoch, reused for unchanged memory, is missing from the store (was it collected?); this epoch is abandoned and the next copies everything")]
    ReusedChunkMissing {
        /// The rank.
        rank: u32,
        /// The chunk.
        hash: ChunkHash,
    },
    /// Writing the rank's part failed.
    #[error("rank {rank}: writing its part failed: {source}")]
    Part {
        /// The rank.
        rank: u32,
        /// Why.
        source: CommitError,
    },
}

impl WriteError {
    /// The rank whose write failed.
    pub fn rank(&self) -> u32 {
        match self {
            WriteError::Encode { rank, .. }
            | WriteError::Chunk { rank, .. }
            | WriteError::Name { rank, .. }
            | WriteError::ReusedChunkMissing { rank, .. }
            | WriteError::Part { rank, .. } => *rank,
        }
    }
}

/// Where a stored chunk is and its stored length.
type Stored = (u32, ChunkPlace);

/// A chunk one thread of this epoch is writing: its place once written,
/// or `None` if the write failed.
#[derive(Debug, Default)]
struct Claim {
    outcome: Mutex<Option<Option<Stored>>>,
    done: Condvar,
}

impl Claim {
    fn settle(&self, outcome: Option<Stored>) {
        if let Ok(mut slot) = self.outcome.lock() {
            *slot = Some(outcome);
        }
        self.done.notify_all();
    }

    /// Waits for the writer (which is writing, never waiting on anything
    /// else) and returns where the chunk went.
    fn wait(&self) -> Option<Stored> {
        let mut slot = self.outcome.lock().ok()?;
        loop {
            if let Some(outcome) = *slot {
                return outcome;
            }
            slot = self.done.wait(slot).ok()?;
        }
    }
}

/// An epoch being written. Dropping it seals its packs and releases the job
/// lock.
#[derive(Debug)]
pub struct EpochWriter {
    job: JobStore,
    epoch: u64,
    config: WriterConfig,
    /// Chunks written in this epoch by any rank writer: a chunk a sibling
    /// rank is writing is not written twice (its place is waited for).
    /// Safe because the epoch commits only once every rank's part, hence
    /// every rank's chunks, is durable.
    staged: Mutex<HashMap<ChunkHash, Arc<Claim>>>,
    /// The chunks of the newest committed epoch, read on first use.
    known: OnceLock<HashMap<ChunkHash, Stored>>,
    /// Packs known to exist (or not), one `stat` each per epoch.
    packs_present: Mutex<HashMap<PackId, bool>>,
    packs: PackSet,
    _lock: JobLock,
}

impl JobStore {
    /// Starts writing `epoch`, which must be newer than every committed one.
    pub fn begin_epoch(&self, epoch: u64, config: WriterConfig) -> Result<EpochWriter, BeginError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&config.chunk_size) {
            return Err(BeginError::ChunkSize(config.chunk_size));
        }
        self.ensure_layout()?;
        let lock = self.lock_shared()?;
        if let Some(latest) = self.latest_committed()? {
            if epoch <= latest {
                return Err(BeginError::NotNewer {
                    job: self.name().to_owned(),
                    epoch,
                    latest,
                });
            }
        }
        if config.layout == ChunkLayout::Loose {
            self.ensure_loose_layout()?;
        }
        self.fs.create_dir_all(&self.pending_epoch_dir(epoch))?;
        self.fs.sync_dir(&self.pending_dir())?;
        tracing::debug!(job = %self.name(), epoch, "epoch.begin");
        let max_bytes = match config.layout {
            ChunkLayout::Packs { max_bytes } => max_bytes,
            ChunkLayout::Loose => DEFAULT_PACK_SIZE,
        };
        Ok(EpochWriter {
            job: self.clone(),
            epoch,
            config,
            staged: Mutex::new(HashMap::new()),
            known: OnceLock::new(),
            packs_present: Mutex::new(HashMap::new()),
            packs: PackSet::new(self, max_bytes),
            _lock: lock,
        })
    }
}

impl EpochWriter {
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The job's store.
    pub fn job(&self) -> &JobStore {
        &self.job
    }

    /// The configuration.
    pub fn config(&self) -> WriterConfig {
        self.config
    }

    /// A writer for one rank's data. Several may run in parallel.
    pub fn rank(&self, rank: u32) -> RankWriter<'_> {
        // (Each rank writer batches loose chunks of its own; packs are the
        // epoch writer's, shared by all its ranks.)
        RankWriter {
            epoch: self,
            rank,
            loose: LooseBatch::new(Arc::clone(&self.job.fs)),
            raw_bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            new_chunks: AtomicU64::new(0),
            new_stored_bytes: AtomicU64::new(0),
            new_raw_bytes: AtomicU64::new(0),
        }
    }
}

/// Writes one rank's chunks and, at the end, its part.
#[derive(Debug)]
pub struct RankWriter<'a> {
    epoch: &'a EpochWriter,
    rank: u32,
    /// Unsynced chunk files, in the loose layout.
    loose: LooseBatch,
    raw_bytes: AtomicU64,
    chunks: AtomicU64,
    new_chunks: AtomicU64,
    new_stored_bytes: AtomicU64,
    new_raw_bytes: AtomicU64,
}

impl RankWriter<'_> {
    /// The rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Stores `raw` (one chunk) if the store lacks it. The hash is computed
    /// first, so a chunk the store already has is never compressed.
    pub fn store_chunk(&self, offset: u64, raw: &[u8]) -> Result<ChunkRef, WriteError> {
        let hash = ChunkHash::of(raw);
        if let Some(existing) = self.existing(offset, &hash, raw.len()) {
            return Ok(existing);
        }
        self.epoch
            .config
            .codec
            .encode_with(raw, hash, |parts| {
                self.put_parts(
                    offset,
                    &parts.hash,
                    parts.raw_len,
                    &[&parts.header, parts.payload],
                )
            })
            .map_err(|source| WriteError::Encode {
                rank: self.rank,
                source,
            })?
    }

    /// References a chunk an earlier epoch stored, for memory that was not
    /// written since (write tracking): nothing is hashed or written, but
    /// the chunk must still be in the store. The job lock this epoch holds
    /// keeps GC from removing it from here on.
    pub fn reuse_chunk(&self, chunk: &ChunkRef) -> Result<ChunkRef, WriteError> {
        let missing = || WriteError::ReusedChunkMissing {
            rank: self.rank,
            hash: chunk.hash,
        };
        let place = self
            .epoch
            .still_stored(&chunk.hash, &chunk.place)
            .map_err(|_| missing())?
            .ok_or_else(missing)?;
        Ok(self.reference(
            chunk.offset,
            chunk.len,
            chunk.stored_len,
            &chunk.hash,
            place,
        ))
    }

    /// Counts and returns a reference to a stored chunk.
    fn reference(
        &self,
        offset: u64,
        len: u32,
        stored_len: u32,
        hash: &ChunkHash,
        place: ChunkPlace,
    ) -> ChunkRef {
        self.raw_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        ChunkRef {
            offset,
            len,
            stored_len,
            hash: *hash,
            place,
        }
    }

    /// A reference to the stored chunk `hash`, if this epoch or the previous
    /// one stored it.
    fn existing(&self, offset: u64, hash: &ChunkHash, raw_len: usize) -> Option<ChunkRef> {
        let len = u32::try_from(raw_len).ok()?;
        let claim = self
            .epoch
            .staged
            .lock()
            .ok()
            .and_then(|staged| staged.get(hash).cloned());
        if let Some(claim) = claim {
            let (stored_len, place) = claim.wait()?;
            return Some(self.reference(offset, len, stored_len, hash, place));
        }
        let (stored_len, place) = *self.epoch.known().get(hash)?;
        let place = self.epoch.still_stored(hash, &place).ok()??;
        Some(self.reference(offset, len, stored_len, hash, place))
    }

    /// Stores a chunk given as consecutive parts (chunk header, payload) if
    /// the store lacks it.
    fn put_parts(
        &self,
        offset: u64,
        hash: &ChunkHash,
        raw_len: u32,
        parts: &[&[u8]],
    ) -> Result<ChunkRef, WriteError> {
        if let Some(existing) = self.existing(offset, hash, raw_len as usize) {
            return Ok(existing);
        }
        let chunk_err = |source| WriteError::Chunk {
            rank: self.rank,
            source,
        };
        let file_len: usize = parts.iter().map(|p| p.len()).sum();
        let stored_len = u32::try_from(file_len).unwrap_or(u32::MAX);
        let poisoned = || chunk_err(IoStepError::panicked("stage", self.epoch.job.dir()));
        // Claim the chunk; a sibling that won the race is writing it, and
        // the epoch commits only once that write is durable.
        let claim = Arc::new(Claim::default());
        {
            let mut staged = self.epoch.staged.lock().map_err(|_| poisoned())?;
            if staged.contains_key(hash) {
                drop(staged);
                return self
                    .existing(offset, hash, raw_len as usize)
                    .ok_or_else(poisoned);
            }
            staged.insert(*hash, Arc::clone(&claim));
        }
        let written = match self.epoch.config.layout {
            ChunkLayout::Packs { .. } => self.epoch.packs.append(hash, raw_len, parts),
            ChunkLayout::Loose => self
                .loose
                .write(&self.epoch.job, hash, parts)
                .map(|()| ChunkPlace::Loose),
        };
        let place = match written {
            Ok(place) => place,
            Err(source) => {
                // Unclaim: this epoch fails, but keep the map truthful.
                if let Ok(mut staged) = self.epoch.staged.lock() {
                    staged.remove(hash);
                }
                claim.settle(None);
                return Err(chunk_err(source));
            }
        };
        claim.settle(Some((stored_len, place)));
        self.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.new_stored_bytes
            .fetch_add(file_len as u64, Ordering::Relaxed);
        self.new_raw_bytes
            .fetch_add(u64::from(raw_len), Ordering::Relaxed);
        Ok(self.reference(offset, raw_len, stored_len, hash, place))
    }

    /// Stores a whole region held in memory, chunks in parallel.
    pub fn store_region(
        &self,
        name: &str,
        addr: u64,
        kind: RegionKind,
        data: &[u8],
    ) -> Result<RegionRecord, WriteError> {
        check_region_name(name).map_err(|source| WriteError::Name {
            rank: self.rank,
            source,
        })?;
        let chunk_size = self.epoch.config.chunk_size;
        let chunks = data
            .par_chunks(chunk_size)
            .enumerate()
            .map(|(index, raw)| self.store_chunk((index * chunk_size) as u64, raw))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RegionRecord {
            name: name.to_owned(),
            addr,
            len: data.len() as u64,
            kind,
            chunks,
        })
    }

    /// What this rank has written so far.
    pub fn stats(&self) -> WriteStats {
        WriteStats {
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            new_chunks: self.new_chunks.load(Ordering::Relaxed),
            new_stored_bytes: self.new_stored_bytes.load(Ordering::Relaxed),
            new_raw_bytes: self.new_raw_bytes.load(Ordering::Relaxed),
        }
    }

    /// Makes this rank's chunks durable and writes its part. `record.rank`
    /// is set to this writer's rank and `record.stats` to what it wrote.
    pub fn finish(&self, mut record: RankRecord) -> Result<WriteStats, WriteError> {
        let chunk_err = |source| WriteError::Chunk {
            rank: self.rank,
            source,
        };
        match self.epoch.config.layout {
            ChunkLayout::Packs { .. } => self.epoch.packs.make_durable().map_err(chunk_err)?,
            ChunkLayout::Loose => self.loose.publish(&self.epoch.job).map_err(chunk_err)?,
        }
        record.rank = self.rank;
        record.stats = self.stats();
        self.epoch
            .job
            .write_part(self.epoch.epoch, &record)
            .map_err(|source| WriteError::Part {
                rank: self.rank,
                source,
            })?;
        tracing::debug!(job = %self.epoch.job.name(), epoch = self.epoch.epoch, rank = self.rank, "rank.durable");
        Ok(record.stats)
    }
}

impl EpochWriter {
    /// The chunks the committed epochs stored: the job's chunk index, and
    /// the newest manifest (which also names format 1 chunks, and covers an
    /// index that was not written). A file that cannot be read only costs
    /// deduplication: its chunks are written again.
    fn known(&self) -> &HashMap<ChunkHash, Stored> {
        self.known.get_or_init(|| {
            let mut known = self.job.newest_chunk_map();
            let latest = match self.job.latest_committed() {
                Ok(Some(latest)) => latest,
                _ => return known,
            };
            match self.job.load_manifest(latest) {
                Ok(manifest) => {
                    for (_, _, chunk) in manifest.chunk_refs() {
                        known.insert(chunk.hash, (chunk.stored_len, chunk.place));
                    }
                }
                Err(err) => {
                    tracing::warn!(job = %self.job.name(), epoch = self.epoch, error = %err, "previous manifest unreadable; its chunks will be written again");
                }
            }
            known
        })
    }

    /// Where chunk `hash`, last seen at `place`, is now: there if its file
    /// or pack still exists, else wherever a repack moved it; `None` if it
    /// is gone.
    fn still_stored(
        &self,
        hash: &ChunkHash,
        place: &ChunkPlace,
    ) -> Result<Option<ChunkPlace>, IoStepError> {
        match place {
            ChunkPlace::Loose => Ok(self
                .job
                .fs
                .exists(&self.job.chunk_path(hash))
                .then_some(ChunkPlace::Loose)),
            ChunkPlace::Pack { pack, .. } => {
                let present = {
                    let mut cache = self
                        .packs_present
                        .lock()
                        .map_err(|_| IoStepError::panicked("stat pack", self.job.packs_dir()))?;
                    *cache
                        .entry(*pack)
                        .or_insert_with(|| self.job.fs.exists(&self.job.pack_path(pack)))
                };
                if present {
                    return Ok(Some(*place));
                }
                if let Some((_, moved)) = self.job.find_recorded(hash) {
                    return Ok(Some(moved));
                }
                Ok(self
                    .job
                    .find_packed(hash)?
                    .map(|(pack, entry)| ChunkPlace::Pack {
                        pack,
                        offset: entry.offset,
                    }))
            }
        }
    }
}

impl Drop for EpochWriter {
    fn drop(&mut self) {
        if let Err(err) = self.packs.seal() {
            // The pack stays readable without its index (by scanning).
            tracing::warn!(job = %self.job.name(), epoch = self.epoch, error = %err, "pack.seal_failed");
        }
    }
}
