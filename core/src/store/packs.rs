//! Writing packs: an epoch's new chunks appended to a few large files.
//!
//! Every [`RankWriter`](super::writer::RankWriter) of an epoch appends to
//! the epoch writer's [`PackSet`] (so one agent writes one pack for all its
//! ranks, and a new one each time a pack reaches its size cap). A writer
//! thread reserves its entry's offset with one compare-and-swap and writes
//! it with `pwrite`, in parallel with every other thread: no lock is held
//! while chunks are written. The 48-byte index record is pushed under a
//! short mutex afterwards.
//!
//! Durability: a pack file is created under its final name. A rank's part
//! is written only after [`PackSet::make_durable`] (`fdatasync` of every
//! pack, and an fsync of each pack's directory once) so a part never names
//! bytes that a crash could lose. [`PackSet::seal`] appends the index and
//! footer once every rank is done; a pack whose writer died before that is
//! still read by scanning its entries.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::format::chunk::ChunkHash;
use crate::format::pack::{
    encode_entry_header, encode_index, encode_pack_header, ChunkPlace, IndexEntry, PackId,
    ENTRY_HEADER_LEN, PACK_HEADER_LEN,
};
use crate::store::fs::{IoStep, IoStepError};
use crate::store::JobStore;

/// One pack being written.
#[derive(Debug)]
struct OpenPack {
    id: PackId,
    path: PathBuf,
    file: File,
    /// The next free offset; `u64::MAX` once sealed.
    next: AtomicU64,
    entries: Mutex<Vec<IndexEntry>>,
    dir_synced: AtomicBool,
}

impl OpenPack {
    /// Reserves `len` bytes, or `None` if the pack is full (or sealed). An
    /// empty pack takes any entry, so a chunk larger than the cap still
    /// fits somewhere.
    fn reserve(&self, len: u64, cap: u64) -> Option<u64> {
        let mut at = self.next.load(Ordering::Relaxed);
        loop {
            let end = at.checked_add(len)?;
            if at > PACK_HEADER_LEN as u64 && end > cap {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(at, end, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(at),
                Err(now) => at = now,
            }
        }
    }
}

/// The packs of one epoch writer.
#[derive(Debug)]
pub(crate) struct PackSet {
    job: JobStore,
    cap: u64,
    current: RwLock<Option<Arc<OpenPack>>>,
    all: Mutex<Vec<Arc<OpenPack>>>,
}

impl PackSet {
    /// An empty set: the first append creates the first pack.
    pub(crate) fn new(job: &JobStore, cap: u64) -> PackSet {
        PackSet {
            job: job.clone(),
            cap,
            current: RwLock::new(None),
            all: Mutex::new(Vec::new()),
        }
    }

    /// Appends chunk `hash`, stored as `parts` (chunk header and payload),
    /// and returns where it went.
    pub(crate) fn append(
        &self,
        hash: &ChunkHash,
        raw_len: u32,
        parts: &[&[u8]],
    ) -> Result<ChunkPlace, IoStepError> {
        let blob_len: usize = parts.iter().map(|p| p.len()).sum();
        let blob_len = u32::try_from(blob_len).unwrap_or(u32::MAX);
        let header = encode_entry_header(hash, blob_len);
        let len = ENTRY_HEADER_LEN as u64 + u64::from(blob_len);
        let mut all_parts: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all_parts.push(&header);
        all_parts.extend_from_slice(parts);
        loop {
            let pack = self.current()?;
            let Some(offset) = pack.reserve(len, self.cap) else {
                self.roll(&pack)?;
                continue;
            };
            self.job
                .fs
                .write_at(&pack.file, &pack.path, offset, &all_parts)
                .step("write pack", &pack.path)?;
            pack.entries
                .lock()
                .map_err(|_| IoStepError::panicked("pack", pack.path.clone()))?
                .push(IndexEntry {
                    hash: *hash,
                    offset,
                    blob_len,
                    raw_len,
                });
            return Ok(ChunkPlace::Pack {
                pack: pack.id,
                offset,
            });
        }
    }

    /// The pack being filled, created on first use.
    fn current(&self) -> Result<Arc<OpenPack>, IoStepError> {
        let dir = self.job.packs_dir();
        if let Some(pack) = self
            .current
            .read()
            .map_err(|_| IoStepError::panicked("pack", dir.clone()))?
            .as_ref()
        {
            return Ok(Arc::clone(pack));
        }
        let mut current = self
            .current
            .write()
            .map_err(|_| IoStepError::panicked("pack", dir))?;
        if let Some(pack) = current.as_ref() {
            return Ok(Arc::clone(pack));
        }
        let pack = self.create()?;
        *current = Some(Arc::clone(&pack));
        Ok(pack)
    }

    /// Replaces the full pack `full` with a new one, unless another thread
    /// did already.
    fn roll(&self, full: &Arc<OpenPack>) -> Result<(), IoStepError> {
        let mut current = self
            .current
            .write()
            .map_err(|_| IoStepError::panicked("pack", full.path.clone()))?;
        if current.as_ref().is_some_and(|pack| Arc::ptr_eq(pack, full)) {
            *current = Some(self.create()?);
        }
        Ok(())
    }

    fn create(&self) -> Result<Arc<OpenPack>, IoStepError> {
        let id = new_pack_id();
        let path = self.job.pack_path(&id);
        let fs = &*self.job.fs;
        self.job.ensure_fanout(&path)?;
        let file = fs.create_pack(&path).step("create pack", &path)?;
        let written = fs
            .write_at(&file, &path, 0, &[&encode_pack_header(id)])
            .step("write pack", &path);
        if let Err(err) = written {
            let _ = fs.remove_file(&path);
            return Err(err);
        }
        tracing::debug!(job = %self.job.name(), pack = %id, "pack.created");
        let pack = Arc::new(OpenPack {
            id,
            path,
            file,
            next: AtomicU64::new(PACK_HEADER_LEN as u64),
            entries: Mutex::new(Vec::new()),
            dir_synced: AtomicBool::new(false),
        });
        self.all
            .lock()
            .map_err(|_| IoStepError::panicked("pack", pack.path.clone()))?
            .push(Arc::clone(&pack));
        Ok(pack)
    }

    fn packs(&self) -> Result<Vec<Arc<OpenPack>>, IoStepError> {
        Ok(self
            .all
            .lock()
            .map_err(|_| IoStepError::panicked("pack", self.job.packs_dir()))?
            .clone())
    }

    /// Makes every byte appended so far durable, with each pack's directory
    /// entry: what must hold before a part may name these chunks.
    pub(crate) fn make_durable(&self) -> Result<(), IoStepError> {
        for pack in self.packs()? {
            self.job
                .fs
                .sync_data(&pack.file, &pack.path)
                .step("fdatasync pack", &pack.path)?;
            if !pack.dir_synced.swap(true, Ordering::AcqRel) {
                let dir = pack.path.parent().map(PathBuf::from).unwrap_or_default();
                if let Err(err) = self.job.fs.sync_dir(&dir) {
                    pack.dir_synced.store(false, Ordering::Release);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Appends each pack's index and footer and syncs it. Called once no
    /// rank writes any more; a pack it cannot seal stays readable by scan.
    pub(crate) fn seal(&self) -> Result<usize, IoStepError> {
        let packs = self.packs()?;
        for pack in &packs {
            let end = pack.next.swap(u64::MAX, Ordering::AcqRel);
            if end == u64::MAX {
                continue;
            }
            let mut entries = pack
                .entries
                .lock()
                .map_err(|_| IoStepError::panicked("pack", pack.path.clone()))?
                .clone();
            entries.sort_unstable_by_key(|entry| entry.offset);
            let tail = encode_index(&entries, end);
            let fs = &*self.job.fs;
            fs.write_at(&pack.file, &pack.path, end, &[&tail])
                .step("write pack index", &pack.path)?;
            fs.sync_data(&pack.file, &pack.path)
                .step("fdatasync pack", &pack.path)?;
            tracing::debug!(job = %self.job.name(), pack = %pack.id, chunks = entries.len(), bytes = end, "pack.sealed");
        }
        Ok(packs.len())
    }
}

static PACK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new random pack id: `getrandom(2)`, or, should it fail, a hash of this
/// process, the time and a counter.
pub(crate) fn new_pack_id() -> PackId {
    let mut id = [0u8; 12];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`, a live
    // local buffer of that length.
    let got = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if usize::try_from(got) != Ok(id.len()) {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&std::process::id().to_le_bytes());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.update(&nanos.to_le_bytes());
        hasher.update(&PACK_COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        id.copy_from_slice(&hasher.finalize().as_bytes()[..12]);
    }
    PackId(id)
}
