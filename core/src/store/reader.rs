//! Reading an epoch back: regions decoded in parallel and verified chunk by
//! chunk, and `verify` over a whole epoch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;
use thiserror::Error;

use crate::format::chunk::{check_stored, decode_into, ChunkDecodeError, ChunkHash};
use crate::format::header::HEADER_LEN;
use crate::format::limits::MAX_STORED_CHUNK_LEN;
use crate::format::manifest::{Manifest, RegionRecord};
use crate::store::fs::{IoStepError, ReadCappedError};
use crate::store::JobStore;

/// A chunk could not be read back.
#[derive(Debug, Error)]
pub enum ChunkReadError {
    /// The chunk file is missing.
    #[error("chunk {hash} is missing ({})", path.display())]
    Missing {
        /// The chunk.
        hash: ChunkHash,
        /// Where it should be.
        path: PathBuf,
    },
    /// The chunk file is corrupt.
    #[error("chunk {hash} is corrupt ({}): {source}", path.display())]
    Corrupt {
        /// The chunk.
        hash: ChunkHash,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ChunkDecodeError,
    },
    /// The chunk file is larger than any chunk can be.
    #[error("chunk {hash} is corrupt ({}): {len} bytes is larger than any chunk", path.display())]
    Oversized {
        /// The chunk.
        hash: ChunkHash,
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// Another I/O error.
    #[error(transparent)]
    Io(IoStepError),
}

impl ChunkReadError {
    /// Whether the chunk is missing (rather than corrupt or unreadable).
    pub fn is_missing(&self) -> bool {
        matches!(self, ChunkReadError::Missing { .. })
    }
}

/// A region could not be restored.
#[derive(Debug, Error)]
#[error("region {region:?} at offset {offset}: {source}")]
pub struct RegionReadError {
    /// The region.
    pub region: String,
    /// Offset of the failing chunk.
    pub offset: u64,
    /// What went wrong.
    pub source: ChunkReadError,
}

thread_local! {
    static VERIFY_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    // Each reader thread reads chunk files through one buffer: a restart
    // allocates (and page-faults) it once, not once per chunk.
    static CHUNK_FILE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl JobStore {
    /// Reads chunk `hash` into `dest` (its raw length) and verifies its hash.
    pub fn read_chunk_into(&self, hash: &ChunkHash, dest: &mut [u8]) -> Result<(), ChunkReadError> {
        self.with_chunk_file(hash, |file| decode_into(file, hash, dest))
    }

    /// Checks chunk `hash` as stored (see [`check_stored`]): present, whole
    /// and undamaged, holding `raw_len` bytes, without decoding it.
    pub fn check_chunk(&self, hash: &ChunkHash, raw_len: u64) -> Result<(), ChunkReadError> {
        self.with_chunk_file(hash, |file| check_stored(file, raw_len).map(drop))
    }

    /// Reads chunk `hash`'s file into this thread's buffer and hands it to
    /// `use_file`.
    fn with_chunk_file(
        &self,
        hash: &ChunkHash,
        use_file: impl FnOnce(&[u8]) -> Result<(), ChunkDecodeError>,
    ) -> Result<(), ChunkReadError> {
        let path = self.chunk_path(hash);
        CHUNK_FILE_BUF.with(|file| {
            let file = &mut *file.borrow_mut();
            let max = (HEADER_LEN + MAX_STORED_CHUNK_LEN) as u64;
            self.fs
                .read_capped_into(&path, max, file)
                .map_err(|err| match err {
                    ReadCappedError::Missing(path) => ChunkReadError::Missing { hash: *hash, path },
                    ReadCappedError::TooLarge { path, len, .. } => ChunkReadError::Oversized {
                        hash: *hash,
                        path,
                        len,
                    },
                    ReadCappedError::Io(err) => ChunkReadError::Io(err),
                })?;
            use_file(file).map_err(|source| ChunkReadError::Corrupt {
                hash: *hash,
                path,
                source,
            })
        })
    }

    /// Restores a region into `dest` (exactly `region.len` bytes), decoding
    /// chunks in parallel straight into place.
    pub fn restore_region(
        &self,
        region: &RegionRecord,
        dest: &mut [u8],
    ) -> Result<(), RegionReadError> {
        let fail = |offset, source| RegionReadError {
            region: region.name.clone(),
            offset,
            source,
        };
        if dest.len() as u64 != region.len {
            return Err(fail(
                0,
                ChunkReadError::Io(IoStepError::new(
                    "restore region",
                    PathBuf::from(&region.name),
                    std::io::Error::other(format!(
                        "destination is {} bytes, region is {}",
                        dest.len(),
                        region.len
                    )),
                )),
            ));
        }
        // Chunks tile the region (checked by Manifest::validate), so the
        // destination splits into disjoint slices, one per chunk.
        let mut slices = Vec::with_capacity(region.chunks.len());
        let mut rest = dest;
        for chunk in &region.chunks {
            let (head, tail) = rest.split_at_mut(chunk.len as usize);
            slices.push((chunk, head));
            rest = tail;
        }
        slices.into_par_iter().try_for_each(|(chunk, slice)| {
            self.read_chunk_into(&chunk.hash, slice)
                .map_err(|err| fail(chunk.offset, err))
        })
    }

    /// Streams a region in order through `sink(offset, bytes)`, decoding up
    /// to `batch_bytes` at a time in parallel into one reused buffer, so that
    /// memory stays bounded whatever the region size.
    pub fn stream_region<E>(
        &self,
        region: &RegionRecord,
        batch_bytes: usize,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), StreamError<E>> {
        let mut buffer: Vec<u8> = Vec::new();
        let mut start = 0;
        while start < region.chunks.len() {
            let mut end = start;
            let mut bytes = 0usize;
            while end < region.chunks.len()
                && (end == start || bytes + region.chunks[end].len as usize <= batch_bytes)
            {
                bytes += region.chunks[end].len as usize;
                end += 1;
            }
            buffer.resize(bytes, 0);
            let mut slices = Vec::with_capacity(end - start);
            let mut rest = &mut buffer[..];
            for chunk in &region.chunks[start..end] {
                let (head, tail) = rest.split_at_mut(chunk.len as usize);
                slices.push((chunk, head));
                rest = tail;
            }
            slices
                .into_par_iter()
                .try_for_each(|(chunk, slice)| {
                    self.read_chunk_into(&chunk.hash, slice)
                        .map_err(|source| RegionReadError {
                            region: region.name.clone(),
                            offset: chunk.offset,
                            source,
                        })
                })
                .map_err(StreamError::Read)?;
            sink(region.chunks[start].offset, &buffer).map_err(StreamError::Sink)?;
            start = end;
        }
        Ok(())
    }

    /// Re-reads and re-hashes every chunk of `manifest`, each distinct chunk
    /// once, in parallel. Reports every bad chunk by rank and region.
    pub fn verify_manifest(&self, manifest: &Manifest) -> VerifyReport {
        self.verify_manifests(std::slice::from_ref(manifest))
            .pop()
            .unwrap_or_else(|| VerifyReport {
                epoch: manifest.epoch,
                chunks_checked: 0,
                bytes_checked: 0,
                bad: Vec::new(),
            })
    }

    /// Verifies several epochs, checking each distinct chunk only once
    /// across all of them (epochs share most chunks).
    pub fn verify_manifests(&self, manifests: &[Manifest]) -> Vec<VerifyReport> {
        self.verify_manifests_to(manifests, Depth::Decoded)
    }

    /// Checks that every chunk of `manifest` is stored whole and undamaged,
    /// without decoding it ([`Depth::Stored`]): what a restart checks before
    /// it launches, since each rank decodes and hash-checks its own chunks
    /// as it restores them.
    pub fn check_manifest(&self, manifest: &Manifest) -> VerifyReport {
        self.verify_manifests_to(std::slice::from_ref(manifest), Depth::Stored)
            .pop()
            .unwrap_or_else(|| VerifyReport {
                epoch: manifest.epoch,
                chunks_checked: 0,
                bytes_checked: 0,
                bad: Vec::new(),
            })
    }

    /// [`JobStore::verify_manifests`] to the given depth.
    pub fn verify_manifests_to(&self, manifests: &[Manifest], depth: Depth) -> Vec<VerifyReport> {
        let mut unique: HashMap<ChunkHash, u32> = HashMap::new();
        for manifest in manifests {
            for (_, _, chunk) in manifest.chunk_refs() {
                unique.insert(chunk.hash, chunk.len);
            }
        }
        let unique: Vec<(ChunkHash, u32)> = unique.into_iter().collect();
        let failures: HashMap<ChunkHash, String> = unique
            .par_iter()
            .filter_map(|(hash, len)| {
                let checked = match depth {
                    Depth::Stored => self.check_chunk(hash, u64::from(*len)),
                    Depth::Decoded => VERIFY_BUF.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        buf.resize(*len as usize, 0);
                        self.read_chunk_into(hash, &mut buf)
                    }),
                };
                checked.err().map(|err| (*hash, err.to_string()))
            })
            .collect();
        manifests
            .iter()
            .map(|manifest| {
                let mut seen: HashMap<ChunkHash, u32> = HashMap::new();
                let mut bad = Vec::new();
                for (rank, region, chunk) in manifest.chunk_refs() {
                    seen.insert(chunk.hash, chunk.len);
                    if let Some(problem) = failures.get(&chunk.hash) {
                        bad.push(BadChunk {
                            rank,
                            region: region.name.clone(),
                            offset: chunk.offset,
                            hash: chunk.hash,
                            problem: problem.clone(),
                        });
                    }
                }
                VerifyReport {
                    epoch: manifest.epoch,
                    chunks_checked: seen.len() as u64,
                    bytes_checked: seen.values().map(|len| u64::from(*len)).sum(),
                    bad,
                }
            })
            .collect()
    }
}

/// How deep a verification looks at each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The file as stored: header, length, payload checksum (fast: no
    /// decompression, no hashing of the contents).
    Stored,
    /// Decoded and hashed: the contents are the ones the chunk's name says.
    Decoded,
}

/// Streaming a region failed.
#[derive(Debug, Error)]
pub enum StreamError<E> {
    /// A chunk could not be read.
    #[error(transparent)]
    Read(RegionReadError),
    /// The sink refused the data.
    #[error("writing restored data failed: {0}")]
    Sink(E),
}

/// A chunk that failed verification, and where it is used.
#[derive(Debug, Clone)]
pub struct BadChunk {
    /// The rank.
    pub rank: u32,
    /// The region.
    pub region: String,
    /// Offset within the region.
    pub offset: u64,
    /// The chunk.
    pub hash: ChunkHash,
    /// What is wrong.
    pub problem: String,
}

/// Result of verifying one epoch.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The epoch.
    pub epoch: u64,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Raw bytes checked.
    pub bytes_checked: u64,
    /// Every bad chunk use.
    pub bad: Vec<BadChunk>,
}

impl VerifyReport {
    /// Whether every chunk is good.
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty()
    }
}
