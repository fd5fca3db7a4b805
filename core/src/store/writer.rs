//! Writing an epoch: chunks in parallel, then each rank's part.
//!
//! An [`EpochWriter`] holds the job lock shared for as long as it lives, so
//! GC never sweeps chunks that the epoch is about to reference. Each rank is
//! written through a [`RankWriter`]; its part is written only after its
//! chunks and their directory entries are durable, and the epoch is
//! committed by [`JobStore::commit_epoch`] once every rank's part exists.
//!
//! Chunks are written in a batch: each new chunk goes to a temp file with no
//! fsync, and [`RankWriter::finish`] makes the whole batch durable with one
//! `syncfs(2)`, then renames every temp file to its final name, fsyncs the
//! fan-out directories and only then writes the part. A final chunk name
//! therefore always means durable bytes (other writers rely on that to skip
//! chunks the store has), and nothing is committed before its chunks are
//! durable. One fsync per 1 MiB chunk cost ~25% of a checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use thiserror::Error;

use crate::format::chunk::{ChunkCodec, ChunkEncodeError, ChunkHash};
use crate::format::limits::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::format::manifest::{ChunkRef, RankRecord, RegionKind, RegionRecord, WriteStats};
use crate::names::{check_region_name, NameError};
use crate::store::durable::Durable;
use crate::store::fs::{IoStep, IoStepError, StoreFs};
use crate::store::{CommitError, JobLock, JobStore};

/// How an epoch's chunks are cut and encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Chunk size in bytes.
    pub chunk_size: usize,
    /// Chunk encoding.
    pub codec: ChunkCodec,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            codec: ChunkCodec::default(),
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

/// An epoch being written. Dropping it releases the job lock.
#[derive(Debug)]
pub struct EpochWriter {
    job: JobStore,
    epoch: u64,
    config: WriterConfig,
    /// Chunks written (unsynced) in this epoch by any rank writer, with their
    /// stored length: a chunk a sibling rank is writing is not written
    /// twice. Safe because the epoch commits only once every rank's part,
    /// hence every rank's batch, is durable.
    staged: Mutex<HashMap<ChunkHash, u32>>,
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
        self.fs.create_dir_all(&self.pending_epoch_dir(epoch))?;
        self.fs.sync_dir(&self.pending_dir())?;
        tracing::debug!(job = %self.name(), epoch, "epoch.begin");
        Ok(EpochWriter {
            job: self.clone(),
            epoch,
            config,
            staged: Mutex::new(HashMap::new()),
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
        RankWriter {
            epoch: self,
            rank,
            dirty: Mutex::new([false; 256]),
            anchor: OnceLock::new(),
            temps: Mutex::new(StagedFiles {
                fs: Arc::clone(&self.job.fs),
                files: Vec::new(),
            }),
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
    dirty: Mutex<[bool; 256]>,
    /// The chunks directory, opened before the first unsynced write so that
    /// `syncfs` on it reports any writeback error of the batch.
    anchor: OnceLock<File>,
    /// Unsynced temp files and the names they get once durable.
    temps: Mutex<StagedFiles>,
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
        self.existing(chunk.offset, &chunk.hash, chunk.len as usize)
            .ok_or(WriteError::ReusedChunkMissing {
                rank: self.rank,
                hash: chunk.hash,
            })
    }

    /// A reference to the stored chunk `hash`, if the store has it.
    fn existing(&self, offset: u64, hash: &ChunkHash, raw_len: usize) -> Option<ChunkRef> {
        let staged = self
            .epoch
            .staged
            .lock()
            .ok()
            .and_then(|staged| staged.get(hash).copied());
        let stored_len = match staged {
            Some(len) => len,
            None => {
                let stat = self
                    .epoch
                    .job
                    .fs
                    .stat(&self.epoch.job.chunk_path(hash))
                    .ok()?;
                u32::try_from(stat.len).unwrap_or(u32::MAX)
            }
        };
        let len = u32::try_from(raw_len).ok()?;
        self.raw_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        Some(ChunkRef {
            offset,
            len,
            stored_len,
            hash: *hash,
        })
    }

    /// Stores a chunk file given as consecutive parts if the store lacks it.
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
        // Claim the chunk; a sibling that won the race has written it.
        {
            let mut staged = self.epoch.staged.lock().map_err(|_| {
                chunk_err(IoStepError::new(
                    "stage",
                    self.epoch.job.chunks_dir(),
                    std::io::Error::other("a writer thread panicked"),
                ))
            })?;
            if staged.contains_key(hash) {
                drop(staged);
                return self
                    .existing(offset, hash, raw_len as usize)
                    .ok_or_else(|| {
                        chunk_err(IoStepError::new(
                            "stage",
                            self.epoch.job.chunk_path(hash),
                            std::io::Error::other("chunk length does not fit"),
                        ))
                    });
            }
            staged.insert(*hash, stored_len);
        }
        let path = self.epoch.job.chunk_path(hash);
        self.raw_bytes
            .fetch_add(u64::from(raw_len), Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        let written = self
            .anchor()
            .and_then(|_| self.epoch.job.fs.write_temp_unsynced(&path, parts));
        let temp = match written {
            Ok(temp) => temp,
            Err(source) => {
                // Unclaim: this epoch fails, but keep the map truthful.
                if let Ok(mut staged) = self.epoch.staged.lock() {
                    staged.remove(hash);
                }
                return Err(chunk_err(source));
            }
        };
        if let Ok(mut temps) = self.temps.lock() {
            temps.files.push((temp, path));
        }
        self.mark_dirty(hash);
        self.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.new_stored_bytes
            .fetch_add(file_len as u64, Ordering::Relaxed);
        self.new_raw_bytes
            .fetch_add(u64::from(raw_len), Ordering::Relaxed);
        Ok(ChunkRef {
            offset,
            len: raw_len,
            stored_len,
            hash: *hash,
        })
    }

    /// The chunks directory, opened once before this writer's first write.
    fn anchor(&self) -> Result<&File, IoStepError> {
        if let Some(file) = self.anchor.get() {
            return Ok(file);
        }
        let dir = self.epoch.job.chunks_dir();
        let file = self
            .epoch
            .job
            .fs
            .open_dir(&dir)
            .step("open directory", &dir)?;
        Ok(self.anchor.get_or_init(|| file))
    }

    /// Makes every chunk this writer wrote durable, then gives each its
    /// final name.
    fn publish_batch(&self) -> Result<(), IoStepError> {
        let temps = match self.temps.lock() {
            Ok(mut temps) => std::mem::take(&mut temps.files),
            Err(_) => {
                return Err(IoStepError::new(
                    "publish",
                    self.epoch.job.chunks_dir(),
                    std::io::Error::other("a writer thread panicked"),
                ))
            }
        };
        if temps.is_empty() {
            return Ok(());
        }
        let fs = &*self.epoch.job.fs;
        let chunks_dir = self.epoch.job.chunks_dir();
        let published = self
            .anchor()
            .and_then(|anchor| {
                fs.sync_filesystem(anchor, &chunks_dir)
                    .step("syncfs", &chunks_dir)
            })
            .and_then(|()| {
                temps
                    .par_iter()
                    .try_for_each(|(temp, path)| fs.publish_replace(temp, path))
            });
        if published.is_err() {
            for (temp, _) in &temps {
                let _ = fs.remove_file(temp);
            }
        }
        published
    }

    fn mark_dirty(&self, hash: &ChunkHash) {
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty[usize::from(hash.0[0])] = true;
        }
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
        let part_err = |source: CommitError| WriteError::Part {
            rank: self.rank,
            source,
        };
        self.publish_batch().map_err(|source| WriteError::Chunk {
            rank: self.rank,
            source,
        })?;
        let dirty: Vec<PathBuf> = {
            let dirty = self.dirty.lock().map(|d| *d).unwrap_or([true; 256]);
            (0..256usize)
                .filter(|i| dirty[*i])
                .map(|i| self.epoch.job.chunks_dir().join(format!("{i:02x}")))
                .collect()
        };
        dirty
            .par_iter()
            .try_for_each(|dir| self.epoch.job.fs.sync_dir(dir))
            .map_err(|err| part_err(err.into()))?;
        record.rank = self.rank;
        record.stats = self.stats();
        self.epoch
            .job
            .write_part(self.epoch.epoch, &record)
            .map_err(part_err)?;
        tracing::debug!(job = %self.epoch.job.name(), epoch = self.epoch.epoch, rank = self.rank, "rank.durable");
        Ok(record.stats)
    }
}

/// Unsynced temp files and the names they get once durable. Dropped before
/// `finish` (a failed epoch), it removes them; GC would too, but only once
/// it runs. A field type of its own, so `RankWriter` keeps no drop glue that
/// borrows the epoch.
#[derive(Debug)]
struct StagedFiles {
    fs: Arc<dyn StoreFs>,
    files: Vec<(PathBuf, PathBuf)>,
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (temp, _) in self.files.drain(..) {
            let _ = self.fs.remove_file(&temp);
        }
    }
}
