//! Reading packs: a chunk's bytes by its place, each pack's index, and the
//! job's index of every packed chunk.
//!
//! A chunk reference names its pack and offset, so a restore reads it with
//! no lookup. A repack (GC) moves live chunks to a new pack and deletes the
//! old one; references written before then name a pack that is gone, and
//! the reader finds the chunk through the newest chunk index file
//! (`chunk_index.rs`) and, failing that, through the [`JobIndex`]: the
//! union of every pack's own index, loaded once per process from the packs'
//! footers (one open and two reads per pack; an unsealed pack is walked
//! entry by entry). At 10^6 chunks in 1 GiB packs that is about a thousand
//! packs and 48 MB of index, read only when a moved chunk is asked for and
//! the index file does not know it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::format::chunk::ChunkHash;
use crate::format::pack::{
    parse_entry_header, read_index_with, ChunkPlace, IndexEntry, IndexSource, PackError, PackId,
    ENTRY_HEADER_LEN, MAX_BLOB_LEN, PACK_HEADER_LEN,
};
use crate::store::chunk_index::ChunkMap;
use crate::store::fs::{IoStep, IoStepError};
use crate::store::JobStore;

/// Most pack files a [`JobStore`] keeps open between reads.
const MAX_OPEN_PACKS: usize = 128;

/// Open pack files and the job index, shared by every clone of a
/// [`JobStore`].
#[derive(Debug, Default)]
pub(crate) struct PackCache {
    files: Mutex<HashMap<PackId, Arc<File>>>,
    /// The newest chunk index file, read on first use.
    pub(crate) recorded: Mutex<Option<Arc<ChunkMap>>>,
    /// Every pack's own index, read on first use (the last resort).
    index: Mutex<Option<Arc<JobIndex>>>,
}

impl PackCache {
    /// Pack files kept open.
    #[cfg(test)]
    pub(crate) fn open_files(&self) -> usize {
        self.files.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Forgets open files and the index (after GC changed the packs).
    pub(crate) fn forget(&self) {
        if let Ok(mut files) = self.files.lock() {
            files.clear();
        }
        if let Ok(mut index) = self.index.lock() {
            *index = None;
        }
        if let Ok(mut recorded) = self.recorded.lock() {
            *recorded = None;
        }
    }
}

/// Every packed chunk of the job and where it is.
#[derive(Debug, Default)]
pub struct JobIndex {
    /// Chunk → pack and entry.
    pub chunks: HashMap<ChunkHash, (PackId, IndexEntry)>,
    /// Packs read.
    pub packs: usize,
    /// Packs whose index could not be read, and why.
    pub unreadable: Vec<(PackId, String)>,
}

/// A pack's index as read back.
#[derive(Debug, Clone)]
pub struct PackIndex {
    /// The entries, in offset order.
    pub entries: Vec<IndexEntry>,
    /// The pack's length.
    pub len: u64,
    /// Whether it has a footer; if not, the entries come from a scan.
    pub sealed: bool,
    /// Why a scan stopped before the end, if it did.
    pub scan_stopped: Option<PackError>,
}

/// A pack's index could not be read.
#[derive(Debug, Error)]
pub enum PackReadError {
    /// The pack does not exist.
    #[error("pack {} is missing", .0.display())]
    Missing(PathBuf),
    /// The pack is damaged.
    #[error("pack {}: {source}", path.display())]
    Bad {
        /// The pack.
        path: PathBuf,
        /// What is wrong.
        source: PackError,
    },
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

/// Reading a packed chunk's blob failed.
#[derive(Debug)]
pub(crate) enum BlobError {
    Missing(PathBuf),
    Bad {
        path: PathBuf,
        offset: u64,
        source: PackError,
    },
    Io(IoStepError),
}

impl JobStore {
    /// The pack `id`, opened once per process.
    pub(crate) fn pack_file(&self, id: &PackId) -> Result<Arc<File>, BlobError> {
        let path = self.pack_path(id);
        if let Some(file) = self
            .packs
            .files
            .lock()
            .ok()
            .and_then(|f| f.get(id).cloned())
        {
            return Ok(file);
        }
        let file = match self.fs.open_read(&path) {
            Ok(file) => Arc::new(file),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(path))
            }
            Err(err) => return Err(BlobError::Io(IoStepError::new("open pack", path, err))),
        };
        if let Ok(mut files) = self.packs.files.lock() {
            // Bounded: verifying or indexing thousands of packs must not run
            // out of descriptors. Readers keep their own Arc meanwhile.
            if files.len() >= MAX_OPEN_PACKS {
                files.clear();
            }
            files.insert(*id, Arc::clone(&file));
        }
        Ok(file)
    }

    /// Reads `len` bytes at `offset` of pack `id` into `buf`.
    pub(crate) fn read_pack_span(
        &self,
        id: &PackId,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<(), BlobError> {
        let file = self.pack_file(id)?;
        buf.resize(len, 0);
        let path = self.pack_path(id);
        match self.fs.read_at(&file, &path, offset, buf) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(BlobError::Bad {
                path,
                offset,
                source: PackError::BeyondEnd {
                    offset,
                    len: len as u64,
                    end: file.metadata().map(|m| m.len()).unwrap_or(0),
                },
            }),
            Err(err) => Err(BlobError::Io(IoStepError::new("read pack", path, err))),
        }
    }

    /// Reads chunk `hash`'s entry at `offset` of pack `id` into `buf` and
    /// returns the pack's path, having checked that the entry header names
    /// this chunk and `blob_len` bytes.
    pub(crate) fn read_entry(
        &self,
        id: &PackId,
        offset: u64,
        hash: &ChunkHash,
        blob_len: u32,
        buf: &mut Vec<u8>,
    ) -> Result<PathBuf, BlobError> {
        let path = self.pack_path(id);
        let bad = |source| BlobError::Bad {
            path: path.clone(),
            offset,
            source,
        };
        if blob_len > MAX_BLOB_LEN {
            return Err(bad(PackError::Length {
                offset,
                field: "blob length",
                len: u64::from(blob_len),
            }));
        }
        self.read_pack_span(id, offset, ENTRY_HEADER_LEN + blob_len as usize, buf)?;
        check_entry_at(buf, 0, offset, hash, blob_len).map_err(bad)?;
        Ok(path)
    }

    /// Where chunk `hash` is, by the newest chunk index file, if its pack
    /// still exists.
    pub(crate) fn find_recorded(&self, hash: &ChunkHash) -> Option<(u32, ChunkPlace)> {
        let cached = self.packs.recorded.lock().ok().and_then(|r| r.clone());
        let map = match cached {
            Some(map) => map,
            None => {
                let map = Arc::new(self.newest_chunk_map());
                if let Ok(mut slot) = self.packs.recorded.lock() {
                    *slot = Some(Arc::clone(&map));
                }
                map
            }
        };
        let found = *map.get(hash)?;
        match found.1 {
            ChunkPlace::Pack { pack, .. } if self.fs.exists(&self.pack_path(&pack)) => Some(found),
            _ => None,
        }
    }

    /// Finds chunk `hash` by reading every pack's own index, reloading them
    /// once if they were read before the chunk moved.
    pub(crate) fn find_packed(
        &self,
        hash: &ChunkHash,
    ) -> Result<Option<(PackId, IndexEntry)>, IoStepError> {
        let cached = self.packs.index.lock().ok().and_then(|i| i.clone());
        if let Some(index) = &cached {
            if let Some(found) = index.chunks.get(hash) {
                return Ok(Some(*found));
            }
        }
        let index = Arc::new(self.load_job_index()?);
        if let Ok(mut slot) = self.packs.index.lock() {
            *slot = Some(Arc::clone(&index));
        }
        Ok(index.chunks.get(hash).copied())
    }

    /// The packs of the job, by id.
    pub fn list_packs(&self) -> Result<Vec<PackId>, IoStepError> {
        let dir = self.packs_dir();
        let fanouts = match self.fs.list_dir(&dir) {
            Ok(names) => names,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(IoStepError::new("list", dir, err)),
        };
        let mut packs = Vec::new();
        for fanout in fanouts {
            let fanout = dir.join(fanout);
            if !self.fs.is_dir(&fanout) {
                continue;
            }
            for name in self.fs.list_dir(&fanout).step("list", &fanout)? {
                let name = name.to_string_lossy();
                if let Some(id) = name.strip_suffix(".pack").and_then(|n| n.parse().ok()) {
                    packs.push(id);
                }
            }
        }
        packs.sort_unstable();
        Ok(packs)
    }

    /// Reads pack `id`'s index from its footer or, for a pack never sealed,
    /// by walking its entries.
    pub fn pack_index(&self, id: &PackId) -> Result<PackIndex, PackReadError> {
        let path = self.pack_path(id);
        let bad = |source| PackReadError::Bad {
            path: path.clone(),
            source,
        };
        let file = match self.pack_file(id) {
            Ok(file) => file,
            Err(BlobError::Missing(path)) => return Err(PackReadError::Missing(path)),
            Err(BlobError::Io(err)) => return Err(err.into()),
            Err(BlobError::Bad { source, .. }) => return Err(bad(source)),
        };
        let len = file.metadata().step("stat pack", &path)?.len();
        if len < PACK_HEADER_LEN as u64 {
            // Its writer stopped between creating it and writing its
            // header (`Packs::create`): it holds nothing, and nothing
            // committed can name it, so it is an empty unsealed pack, not
            // a damaged one.
            return Ok(PackIndex {
                entries: Vec::new(),
                len,
                sealed: false,
                scan_stopped: Some(PackError::Truncated {
                    what: "the pack header",
                    needed: PACK_HEADER_LEN as u64,
                    len,
                }),
            });
        }
        let read = |offset: u64, buf: &mut [u8]| {
            self.fs
                .read_at(&file, &path, offset, buf)
                .step("read pack", &path)
        };
        let (found, entries, source) = read_index_with(len, read)?.map_err(bad)?;
        if found != *id {
            return Err(bad(PackError::WrongId {
                expected: *id,
                found,
            }));
        }
        let (sealed, scan_stopped) = match source {
            IndexSource::Sealed { .. } => (true, None),
            IndexSource::Scanned { stopped, .. } => (false, stopped),
        };
        Ok(PackIndex {
            entries,
            len,
            sealed,
            scan_stopped,
        })
    }

    /// Reads every pack's index into one map.
    pub fn load_job_index(&self) -> Result<JobIndex, IoStepError> {
        let mut index = JobIndex::default();
        for id in self.list_packs()? {
            match self.pack_index(&id) {
                Ok(pack) => {
                    index.packs += 1;
                    for entry in pack.entries {
                        index.chunks.entry(entry.hash).or_insert((id, entry));
                    }
                }
                Err(PackReadError::Io(err)) => return Err(err),
                Err(err) => index.unreadable.push((id, err.to_string())),
            }
        }
        Ok(index)
    }
}

/// Checks the entry header at `at` in `buf` (read from pack offset
/// `offset`) names chunk `hash` with a blob of `blob_len` bytes.
pub(crate) fn check_entry_at(
    buf: &[u8],
    at: usize,
    offset: u64,
    hash: &ChunkHash,
    blob_len: u32,
) -> Result<(), PackError> {
    let (found, found_len) = parse_entry_header(&buf[at..], offset)?;
    if found != *hash {
        return Err(PackError::OtherChunk { offset, found });
    }
    if found_len != blob_len {
        return Err(PackError::Length {
            offset,
            field: "blob length",
            len: u64::from(found_len),
        });
    }
    Ok(())
}

/// Where a chunk's stored bytes (its chunk header and payload) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAt {
    /// The chunk file or the pack.
    pub path: PathBuf,
    /// Offset of the chunk header in it.
    pub offset: u64,
    /// Stored length.
    pub len: u64,
}

impl JobStore {
    /// Finds `chunk`'s stored bytes: its own file (format 1), or its entry
    /// in the pack its reference names or, after a repack, in another
    /// pack. For `cryo describe` and for tests that damage one chunk.
    pub fn locate_chunk(&self, chunk: &crate::format::manifest::ChunkRef) -> Option<StoredAt> {
        let hash = &chunk.hash;
        let (hint, offset) = match chunk.place {
            ChunkPlace::Loose => {
                let path = self.chunk_path(hash);
                let len = self.fs.stat(&path).ok()?.len;
                return Some(StoredAt {
                    path,
                    offset: 0,
                    len,
                });
            }
            ChunkPlace::Pack { pack, offset } => (pack, offset),
        };
        let mut candidates = vec![(hint, offset, chunk.stored_len)];
        if let Some((len, ChunkPlace::Pack { pack, offset })) = self.find_recorded(hash) {
            candidates.push((pack, offset, len));
        }
        if let Ok(Some((pack, entry))) = self.find_packed(hash) {
            candidates.push((pack, entry.offset, entry.blob_len));
        }
        let mut buf = Vec::new();
        candidates.into_iter().find_map(|(pack, offset, len)| {
            let path = self.read_entry(&pack, offset, hash, len, &mut buf).ok()?;
            Some(StoredAt {
                path,
                offset: offset + ENTRY_HEADER_LEN as u64,
                len: u64::from(len),
            })
        })
    }
}
