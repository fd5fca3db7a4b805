//! Reading an epoch back: regions decoded in parallel and verified chunk by
//! chunk, and `verify` over a whole epoch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;
use thiserror::Error;

use crate::format::chunk::{
    check_stored, decode_into, decode_into_rehash, ChunkDecodeError, ChunkHash,
};
use crate::format::header::HEADER_LEN;
use crate::format::limits::MAX_STORED_CHUNK_LEN;
use crate::format::manifest::{ChunkRef, Manifest, RegionRecord};
use crate::format::pack::{ChunkPlace, PackError, PackId, ENTRY_HEADER_LEN};
use crate::store::fs::{IoStepError, ReadCappedError};
use crate::store::pack_read::{check_entry_at, BlobError};
use crate::store::JobStore;

/// A chunk could not be read back.
#[derive(Debug, Error)]
pub enum ChunkReadError {
    /// The chunk file, or the pack that holds it, is missing, and no other
    /// pack holds it.
    #[error("chunk {hash} is missing ({})", path.display())]
    Missing {
        /// The chunk.
        hash: ChunkHash,
        /// Where it should be.
        path: PathBuf,
    },
    /// The chunk is corrupt.
    #[error("chunk {hash} is corrupt ({}): {source}", path.display())]
    Corrupt {
        /// The chunk.
        hash: ChunkHash,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ChunkDecodeError,
    },
    /// The pack entry that should hold the chunk is damaged or truncated.
    #[error("chunk {hash} is corrupt ({} at offset {offset}): {source}", path.display())]
    BadEntry {
        /// The chunk.
        hash: ChunkHash,
        /// The pack.
        path: PathBuf,
        /// The entry's offset.
        offset: u64,
        /// What is wrong.
        source: PackError,
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

    fn from_blob(hash: &ChunkHash, err: BlobError) -> ChunkReadError {
        match err {
            BlobError::Missing(path) => ChunkReadError::Missing { hash: *hash, path },
            BlobError::Bad {
                path,
                offset,
                source,
            } => ChunkReadError::BadEntry {
                hash: *hash,
                path,
                offset,
                source,
            },
            BlobError::Io(err) => ChunkReadError::Io(err),
        }
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

/// Largest single read of a restore: consecutive entries of a pack are
/// read together up to this size.
const SPAN_BYTES: u64 = 16 << 20;
/// Smallest span a restore aims for (a chunk bigger than this is still read
/// whole): a parallel filesystem serves reads of a stripe (1 MiB) or more
/// at full speed.
const MIN_SPAN_BYTES: u64 = 1 << 20;
/// Spans a restore aims to give each thread. Threads take spans whole, so
/// the last span of a thread is time the others may spend idle: with a
/// handful of 16 MiB spans over two threads, a 256 MiB restore took 15–40%
/// longer than with spans of 1–4 MiB.
const SPANS_PER_THREAD: u64 = 16;
/// Entries closer than this in a pack share one read (the bytes between
/// them are read and skipped).
const SPAN_GAP: u64 = 256 << 10;

thread_local! {
    static VERIFY_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    // Each reader thread reads chunks through one buffer: a restart
    // allocates (and page-faults) it once, not once per chunk.
    static CHUNK_FILE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    // The same for the spans of a pack read at once.
    static SPAN_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Frees the read buffers, zstd contexts and filter buffers that restores
/// and verifications keep on each thread of rayon's pool and on this one
/// (up to about 18 MiB a thread). A restarted rank calls it once its state
/// is back: the memory is the application's, and a many-core node runs
/// many ranks.
pub fn release_read_buffers() {
    fn release() {
        for buf in [&VERIFY_BUF, &CHUNK_FILE_BUF, &SPAN_BUF] {
            buf.with(|buf| *buf.borrow_mut() = Vec::new());
        }
        crate::format::chunk::release_scratch();
    }
    rayon::broadcast(|_| release());
    release();
}

/// The largest read of a restore of `stored` bytes on `threads` threads:
/// about [`SPANS_PER_THREAD`] spans each, within [`MIN_SPAN_BYTES`] and
/// [`SPAN_BYTES`].
fn span_limit(stored: u64, threads: usize) -> u64 {
    let threads = u64::try_from(threads.max(1)).unwrap_or(u64::MAX);
    (stored / threads.saturating_mul(SPANS_PER_THREAD)).clamp(MIN_SPAN_BYTES, SPAN_BYTES)
}

/// Bytes of read buffers that restores and verifications left on this
/// thread (what [`release_read_buffers`] frees, zstd's contexts aside).
pub fn held_read_buffer_bytes() -> usize {
    [&VERIFY_BUF, &CHUNK_FILE_BUF, &SPAN_BUF]
        .iter()
        .map(|buf| buf.with(|buf| buf.borrow().capacity()))
        .sum()
}

/// A chunk and the memory it is restored into.
type Slice<'a, 'b> = (&'a ChunkRef, &'b mut [u8]);

impl JobStore {
    /// Reads `chunk` into `dest` (its raw length) and checks it against its
    /// name (see [`decode_into`]).
    pub fn read_chunk_into(&self, chunk: &ChunkRef, dest: &mut [u8]) -> Result<(), ChunkReadError> {
        self.with_chunk_blob(chunk, |blob| decode_into(blob, &chunk.hash, dest))
    }

    /// [`JobStore::read_chunk_into`], recomputing the chunk's name from the
    /// decoded bytes as well (see [`decode_into_rehash`]).
    pub fn rehash_chunk_into(
        &self,
        chunk: &ChunkRef,
        dest: &mut [u8],
    ) -> Result<(), ChunkReadError> {
        self.with_chunk_blob(chunk, |blob| decode_into_rehash(blob, &chunk.hash, dest))
    }

    /// Checks `chunk` as stored (see [`check_stored`]): present, whole and
    /// undamaged, holding its raw length, without decoding it.
    pub fn check_chunk(&self, chunk: &ChunkRef) -> Result<(), ChunkReadError> {
        self.with_chunk_blob(chunk, |blob| {
            check_stored(blob, u64::from(chunk.len)).map(drop)
        })
    }

    /// Reads `chunk`'s stored bytes (its chunk header and payload) into
    /// this thread's buffer and hands them to `use_blob`. A packed chunk is
    /// read at its place; if that pack is gone or holds something else
    /// there, it is looked up in the job index (a repack moved it).
    fn with_chunk_blob(
        &self,
        chunk: &ChunkRef,
        use_blob: impl FnOnce(&[u8]) -> Result<(), ChunkDecodeError>,
    ) -> Result<(), ChunkReadError> {
        let hash = &chunk.hash;
        CHUNK_FILE_BUF.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            let (path, blob) = match chunk.place {
                ChunkPlace::Loose => {
                    let path = self.read_loose(hash, buf)?;
                    (path, &buf[..])
                }
                ChunkPlace::Pack { pack, offset } => {
                    let path = self.read_packed(chunk, &pack, offset, buf)?;
                    (path, &buf[ENTRY_HEADER_LEN..])
                }
            };
            use_blob(blob).map_err(|source| ChunkReadError::Corrupt {
                hash: *hash,
                path,
                source,
            })
        })
    }

    /// Reads a format 1 chunk file into `buf`.
    fn read_loose(&self, hash: &ChunkHash, buf: &mut Vec<u8>) -> Result<PathBuf, ChunkReadError> {
        let path = self.chunk_path(hash);
        let max = (HEADER_LEN + MAX_STORED_CHUNK_LEN) as u64;
        self.fs
            .read_capped_into(&path, max, buf)
            .map_err(|err| match err {
                ReadCappedError::Missing(path) => ChunkReadError::Missing { hash: *hash, path },
                ReadCappedError::TooLarge { path, len, .. } => ChunkReadError::Oversized {
                    hash: *hash,
                    path,
                    len,
                },
                ReadCappedError::Io(err) => ChunkReadError::Io(err),
            })?;
        Ok(path)
    }

    /// Reads a packed chunk's entry into `buf`: at `pack`/`offset`, or
    /// where the job index says it moved.
    fn read_packed(
        &self,
        chunk: &ChunkRef,
        pack: &PackId,
        offset: u64,
        buf: &mut Vec<u8>,
    ) -> Result<PathBuf, ChunkReadError> {
        let hash = &chunk.hash;
        let first = match self.read_entry(pack, offset, hash, chunk.stored_len, buf) {
            Ok(path) => return Ok(path),
            Err(BlobError::Io(err)) => return Err(ChunkReadError::Io(err)),
            Err(err) => err,
        };
        // Moved by a repack: the chunk index file first, every pack's own
        // index last.
        if let Some((
            stored_len,
            ChunkPlace::Pack {
                pack: moved,
                offset: at,
            },
        )) = self.find_recorded(hash)
        {
            if (moved, at) != (*pack, offset) {
                match self.read_entry(&moved, at, hash, stored_len, buf) {
                    Ok(path) => return Ok(path),
                    Err(BlobError::Io(err)) => return Err(ChunkReadError::Io(err)),
                    Err(_) => {}
                }
            }
        }
        match self.find_packed(hash).map_err(ChunkReadError::Io)? {
            Some((moved, entry)) if (moved, entry.offset) != (*pack, offset) => self
                .read_entry(&moved, entry.offset, hash, entry.blob_len, buf)
                .map_err(|err| ChunkReadError::from_blob(hash, err)),
            _ => Err(ChunkReadError::from_blob(hash, first)),
        }
    }

    /// Restores a region into `dest` (exactly `region.len` bytes), decoding
    /// chunks in parallel straight into place.
    pub fn restore_region(
        &self,
        region: &RegionRecord,
        dest: &mut [u8],
    ) -> Result<(), RegionReadError> {
        self.restore_region_skipping(region, dest, false)
    }

    /// [`Self::restore_region`] into memory that holds zeros already (a
    /// fresh anonymous mapping): chunks of zeros are not written, so pages
    /// the rank never used stay untouched, as they were before the
    /// checkpoint, instead of being faulted in. A rank that used a page of
    /// a large region comes back using that page, not the whole region.
    pub fn restore_region_onto_zeros(
        &self,
        region: &RegionRecord,
        dest: &mut [u8],
    ) -> Result<(), RegionReadError> {
        self.restore_region_skipping(region, dest, true)
    }

    fn restore_region_skipping(
        &self,
        region: &RegionRecord,
        dest: &mut [u8],
        skip_zeros: bool,
    ) -> Result<(), RegionReadError> {
        if dest.len() as u64 != region.len {
            return Err(RegionReadError {
                region: region.name.clone(),
                offset: 0,
                source: ChunkReadError::Io(IoStepError::new(
                    "restore region",
                    PathBuf::from(&region.name),
                    std::io::Error::other(format!(
                        "destination is {} bytes, region is {}",
                        dest.len(),
                        region.len
                    )),
                )),
            });
        }
        // Chunks tile the region (checked by Manifest::validate), so the
        // destination splits into disjoint slices, one per chunk.
        let mut slices = Vec::with_capacity(region.chunks.len());
        let mut zeros = ZeroHashes::default();
        let mut rest = dest;
        for chunk in &region.chunks {
            let (head, tail) = rest.split_at_mut(chunk.len as usize);
            if !(skip_zeros && zeros.is_zeros(chunk)) {
                slices.push((chunk, head));
            }
            rest = tail;
        }
        self.fill(slices)
            .map_err(|(offset, source)| RegionReadError {
                region: region.name.clone(),
                offset,
                source,
            })
    }

    /// Restores each chunk into its slice, in parallel. Packed chunks are
    /// sorted by pack and offset and read in spans (see [`span_limit`]), so
    /// a pack is read with large sequential reads and packs in parallel;
    /// a span that fails in any way is redone chunk by chunk, which finds
    /// moved chunks and names the exact problem.
    fn fill(&self, slices: Vec<Slice<'_, '_>>) -> Result<(), (u64, ChunkReadError)> {
        let (mut packed, loose): (Vec<_>, Vec<_>) = slices
            .into_iter()
            .partition(|(chunk, _)| matches!(chunk.place, ChunkPlace::Pack { .. }));
        let stored: u64 = packed
            .iter()
            .map(|(chunk, _)| ENTRY_HEADER_LEN as u64 + u64::from(chunk.stored_len))
            .sum();
        let span_bytes = span_limit(stored, rayon::current_num_threads());
        packed.sort_by_key(|(chunk, _)| match chunk.place {
            ChunkPlace::Pack { pack, offset } => (pack, offset),
            ChunkPlace::Loose => (PackId([0; 12]), 0),
        });
        let mut spans: Vec<Vec<Slice<'_, '_>>> = loose.into_iter().map(|s| vec![s]).collect();
        let mut span: Vec<Slice<'_, '_>> = Vec::new();
        let mut span_start = (PackId([0; 12]), 0u64);
        let mut span_end = 0u64;
        for slice in packed {
            let ChunkPlace::Pack { pack, offset } = slice.0.place else {
                continue;
            };
            let end = offset + (ENTRY_HEADER_LEN as u64) + u64::from(slice.0.stored_len);
            let joins = !span.is_empty()
                && pack == span_start.0
                && offset >= span_end
                && offset - span_end <= SPAN_GAP
                && end - span_start.1 <= span_bytes;
            if !joins && !span.is_empty() {
                spans.push(std::mem::take(&mut span));
            }
            if span.is_empty() {
                span_start = (pack, offset);
            }
            span_end = end;
            span.push(slice);
        }
        if !span.is_empty() {
            spans.push(span);
        }
        spans.into_par_iter().try_for_each(|span| {
            let mut span = span;
            if span.len() > 1 && self.fill_span(&mut span).is_ok() {
                return Ok(());
            }
            // Chunk by chunk in region order, so that the error names the
            // first bad chunk of the region, not the first in the pack.
            span.sort_by_key(|(chunk, _)| chunk.offset);
            span.iter_mut().try_for_each(|(chunk, dest)| {
                self.read_chunk_into(chunk, dest)
                    .map_err(|err| (chunk.offset, err))
            })
        })
    }

    /// Reads a span of one pack with one read and decodes each chunk of it.
    fn fill_span(&self, span: &mut [Slice<'_, '_>]) -> Result<(), ()> {
        let place = |chunk: &ChunkRef| match chunk.place {
            ChunkPlace::Pack { pack, offset } => Some((pack, offset)),
            ChunkPlace::Loose => None,
        };
        let (pack, start) = place(span[0].0).ok_or(())?;
        let last = span[span.len() - 1].0;
        let (_, last_offset) = place(last).ok_or(())?;
        let end = last_offset + ENTRY_HEADER_LEN as u64 + u64::from(last.stored_len);
        SPAN_BUF.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            let len = usize::try_from(end - start).map_err(drop)?;
            self.read_pack_span(&pack, start, len, buf).map_err(drop)?;
            for (chunk, dest) in span.iter_mut() {
                let (_, offset) = place(chunk).ok_or(())?;
                let at = usize::try_from(offset - start).map_err(drop)?;
                check_entry_at(buf, at, offset, &chunk.hash, chunk.stored_len).map_err(drop)?;
                let blob =
                    &buf[at + ENTRY_HEADER_LEN..at + ENTRY_HEADER_LEN + chunk.stored_len as usize];
                decode_into(blob, &chunk.hash, dest).map_err(drop)?;
            }
            Ok(())
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
            self.fill(slices).map_err(|(offset, source)| {
                StreamError::Read(RegionReadError {
                    region: region.name.clone(),
                    offset,
                    source,
                })
            })?;
            sink(region.chunks[start].offset, &buffer).map_err(StreamError::Sink)?;
            start = end;
        }
        Ok(())
    }

    /// Re-reads and re-hashes every chunk of `manifest`, each distinct chunk
    /// once, in parallel. Reports every bad chunk by rank and region.
    pub fn verify_manifest(&self, manifest: &Manifest) -> VerifyReport {
        self.verify_one(manifest, Depth::Decoded)
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
        self.verify_one(manifest, Depth::Stored)
    }

    /// One manifest's report at `depth`.
    fn verify_one(&self, manifest: &Manifest, depth: Depth) -> VerifyReport {
        self.verify_manifests_to(std::slice::from_ref(manifest), depth)
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
        let mut unique: HashMap<ChunkHash, ChunkRef> = HashMap::new();
        for manifest in manifests {
            for (_, _, chunk) in manifest.chunk_refs() {
                unique.insert(chunk.hash, *chunk);
            }
        }
        let unique: Vec<ChunkRef> = unique.into_values().collect();
        let failures: HashMap<ChunkHash, String> = unique
            .par_iter()
            .filter_map(|chunk| {
                let checked = match depth {
                    Depth::Stored => self.check_chunk(chunk),
                    Depth::Decoded => VERIFY_BUF.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        buf.resize(chunk.len as usize, 0);
                        self.rehash_chunk_into(chunk, &mut buf)
                    }),
                };
                checked.err().map(|err| (chunk.hash, err.to_string()))
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
    /// Decoded, checked and hashed: the contents are the ones the chunk's
    /// name says, recomputed.
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

/// The hashes of chunks of zeros, by length (a region's chunks have one
/// length, its last one another).
#[derive(Default)]
struct ZeroHashes(Vec<(u32, ChunkHash)>);

impl ZeroHashes {
    /// Whether `chunk` holds only zeros, by its hash.
    fn is_zeros(&mut self, chunk: &ChunkRef) -> bool {
        let hash = match self.0.iter().find(|(len, _)| *len == chunk.len) {
            Some((_, hash)) => *hash,
            None => {
                let hash = ChunkHash::of(&vec![0u8; chunk.len as usize]);
                self.0.push((chunk.len, hash));
                hash
            }
        };
        hash == chunk.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_shrink_until_each_thread_has_many_within_the_bounds() {
        // 82 MiB stored on 2 threads: 32 spans of about 2.6 MiB.
        let span = span_limit(82 << 20, 2);
        assert!((2 << 20..3 << 20).contains(&span), "{span}");
        assert_eq!(span_limit(4 << 30, 2), SPAN_BYTES);
        assert_eq!(span_limit(4 << 20, 2), MIN_SPAN_BYTES);
        assert_eq!(span_limit(0, 0), MIN_SPAN_BYTES);
        assert_eq!(span_limit(u64::MAX, usize::MAX), MIN_SPAN_BYTES);
    }
}
