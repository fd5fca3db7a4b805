//! Chunk encoding: hash, byte-shuffle filter, zstd.
//!
//! A chunk is a fixed-size slice of a region. Its name is the BLAKE3 hash of
//! its raw bytes. BLAKE3 rather than XXH3-128: a chunk name stands for its
//! content across ranks, epochs and restarts, so a collision would restore
//! the wrong bytes without a trace. BLAKE3 is collision-resistant, and at
//! several GB/s per core it costs a fraction of zstd's ~450 MB/s per core.
//!
//! Rank state is mostly `f64`. Their sign/exponent bytes repeat while the low
//! mantissa bytes are noise, and zstd sees neither pattern in interleaved
//! bytes. The shuffle filter (as in Blosc) transposes 8-byte words into eight
//! byte planes first, so the repetitive planes compress and the noise does
//! not hide them. A chunk is stored raw when compression would not pay.
//!
//! A restore does not recompute names: BLAKE3 (4.4 GB/s per core here) took
//! 40% of a restart's CPU. Since format 2.1 a chunk's header carries a *raw
//! check*, XXH3-64 of its decoded bytes seeded with the first 8 bytes of
//! its name (about 30 GB/s): it fails for damaged bytes, for a decoder that
//! went wrong and for another chunk found in this one's place (its check
//! was seeded with another name). It catches accidents, not forgery; but
//! whoever can write chunks can as well rewrite the manifests that name
//! them. `cryo verify` recomputes every name ([`decode_into_rehash`]).

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::header::{CodecId, FileKind, Header, HeaderError, HEADER_LEN};
use crate::format::limits::MAX_CHUNK_SIZE;

/// Default zstd level: 1 is the fastest level that still compresses
/// smooth doubles well after the shuffle; negative levels lose too much ratio.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Header flag: the payload is a zstd frame.
pub const FLAG_ZSTD: u32 = 1 << 0;
/// Header flag: the raw bytes were byte-shuffled with an 8-byte stride.
pub const FLAG_SHUFFLE8: u32 = 1 << 1;
/// Header flag: the header carries the raw check (format 2.1 and later).
pub const FLAG_RAW_CHECK: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_ZSTD | FLAG_SHUFFLE8 | FLAG_RAW_CHECK;

/// The raw check of a chunk's decoded bytes: XXH3-64 seeded with its name.
pub fn raw_check(raw: &[u8], name: &ChunkHash) -> u64 {
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&name.0[..8]);
    xxhash_rust::xxh3::xxh3_64_with_seed(raw, u64::from_le_bytes(seed))
}

/// A chunk's content hash (BLAKE3-256), which is also its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes raw chunk bytes.
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A string is not a 64-digit lower-case hex chunk name.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0:?} is not a chunk name (64 lower-case hex digits)")]
pub struct BadChunkName(pub String);

impl FromStr for ChunkHash {
    type Err = BadChunkName;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadChunkName(text.to_owned());
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = digit(pair[0]).ok_or_else(bad)? << 4 | digit(pair[1]).ok_or_else(bad)?;
        }
        Ok(ChunkHash(out))
    }
}

/// The pre-compression filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Filter {
    /// No filter.
    None,
    /// Byte-shuffle with an 8-byte stride (`f64`, `i64`).
    #[default]
    Shuffle8,
}

/// How chunks are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkCodec {
    /// zstd level; 0 stores chunks uncompressed.
    pub level: i32,
    /// Filter applied before zstd.
    pub filter: Filter,
}

impl Default for ChunkCodec {
    fn default() -> Self {
        ChunkCodec {
            level: DEFAULT_ZSTD_LEVEL,
            filter: Filter::Shuffle8,
        }
    }
}

/// A chunk ready to be written: header and payload.
#[derive(Debug)]
pub struct EncodedChunk {
    /// Content hash of the raw bytes.
    pub hash: ChunkHash,
    /// Length of the raw bytes.
    pub raw_len: u32,
    /// The complete file: header followed by payload.
    pub file: Vec<u8>,
}

/// A chunk could not be encoded.
#[derive(Debug, Error)]
pub enum ChunkEncodeError {
    /// The chunk is larger than [`MAX_CHUNK_SIZE`].
    #[error("chunk of {0} bytes exceeds the maximum of {MAX_CHUNK_SIZE}")]
    TooLarge(usize),
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Zstd(std::io::Error),
}

/// A stored chunk is not what its name says.
#[derive(Debug, Error)]
pub enum ChunkDecodeError {
    /// The header is bad.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The file length disagrees with the header.
    #[error("chunk file is {actual} bytes, header says {expected}")]
    LengthMismatch {
        /// Header plus declared payload.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The payload checksum does not match.
    #[error("chunk payload checksum mismatch (file corrupt)")]
    PayloadChecksum,
    /// Flags this build does not know.
    #[error("chunk has unknown flags {0:#x}")]
    UnknownFlags(u32),
    /// Decoded length disagrees with the manifest.
    #[error("chunk decodes to {actual} bytes, manifest expects {expected}")]
    RawLength {
        /// From the manifest.
        expected: u64,
        /// From the chunk.
        actual: u64,
    },
    /// zstd refused the payload.
    #[error("zstd decompression failed: {0}")]
    Zstd(std::io::Error),
    /// The decoded bytes do not hash to the chunk's name.
    #[error("content hash mismatch: decodes to {actual}")]
    HashMismatch {
        /// Hash of what was decoded.
        actual: ChunkHash,
    },
    /// The decoded bytes fail the raw check: damaged, or another chunk.
    #[error(
        "decoded bytes fail the chunk's raw check (XXH3-64 {actual:#018x}, header says \
         {expected:#018x}): damaged, or not the chunk its name says"
    )]
    RawCheck {
        /// The check in the header.
        expected: u64,
        /// The check of what was decoded.
        actual: u64,
    },
}

struct Scratch {
    level: i32,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    shuffled: Vec<u8>,
    compressed: Vec<u8>,
}

thread_local! {
    // Per-thread zstd contexts and filter buffer: creating a context per chunk
    // costs more than compressing a small one, and a fresh buffer per chunk
    // would page-fault its way through memory.
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch {
        level: i32::MIN,
        compressor: None,
        decompressor: None,
        shuffled: Vec::new(),
        compressed: Vec::new(),
    }) };
}

pub use crate::format::shuffle::{shuffle8, unshuffle8};

/// Frees this thread's zstd contexts and buffers (a restarted rank gives
/// the memory back to the application once its state is restored).
pub fn release_scratch() {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.level = i32::MIN;
        scratch.compressor = None;
        scratch.decompressor = None;
        scratch.shuffled = Vec::new();
        scratch.compressed = Vec::new();
    });
}

impl ChunkCodec {
    /// Hashes and encodes `raw` into a chunk file image.
    pub fn encode(&self, raw: &[u8]) -> Result<EncodedChunk, ChunkEncodeError> {
        self.encode_hashed(raw, ChunkHash::of(raw))
    }

    /// Encodes `raw`, whose hash the caller has computed already (to skip
    /// compressing chunks the store has), into an owned file image.
    pub fn encode_hashed(
        &self,
        raw: &[u8],
        hash: ChunkHash,
    ) -> Result<EncodedChunk, ChunkEncodeError> {
        self.encode_with(raw, hash, |parts| {
            let mut file = Vec::with_capacity(parts.stored_len());
            file.extend_from_slice(&parts.header);
            file.extend_from_slice(parts.payload);
            EncodedChunk {
                hash: parts.hash,
                raw_len: parts.raw_len,
                file,
            }
        })
    }

    /// Encodes `raw` and hands the result to `use_parts` without copying
    /// it: the payload is this thread's reused compression buffer, or `raw`
    /// itself when it is stored uncompressed. The hot path of a checkpoint
    /// thus allocates nothing per chunk and writes each byte once.
    /// `use_parts` must not encode on this thread.
    pub fn encode_with<R>(
        &self,
        raw: &[u8],
        hash: ChunkHash,
        use_parts: impl FnOnce(&EncodedParts<'_>) -> R,
    ) -> Result<R, ChunkEncodeError> {
        let raw_len = match u32::try_from(raw.len()) {
            Ok(len) if raw.len() <= MAX_CHUNK_SIZE => len,
            _ => return Err(ChunkEncodeError::TooLarge(raw.len())),
        };
        let check = raw_check(raw, &hash);
        let stored_raw = || EncodedParts {
            hash,
            raw_len,
            header: Header::new(
                FileKind::Chunk,
                CodecId::Raw,
                FLAG_RAW_CHECK,
                raw,
                raw.len() as u64,
            )
            .with_raw_check(check)
            .encode(),
            payload: raw,
        };
        if self.level == 0 {
            return Ok(use_parts(&stored_raw()));
        }
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let shuffle = self.filter == Filter::Shuffle8 && raw.len() % 8 == 0 && !raw.is_empty();
            let input: &[u8] = if shuffle {
                scratch.shuffled.resize(raw.len(), 0);
                shuffle8(raw, &mut scratch.shuffled);
                &scratch.shuffled
            } else {
                raw
            };
            if scratch.level != self.level || scratch.compressor.is_none() {
                scratch.compressor =
                    Some(zstd::bulk::Compressor::new(self.level).map_err(ChunkEncodeError::Zstd)?);
                scratch.level = self.level;
            }
            let compressor = scratch
                .compressor
                .as_mut()
                .ok_or_else(|| ChunkEncodeError::Zstd(std::io::Error::other("no zstd context")))?;
            let bound = zstd::zstd_safe::compress_bound(input.len());
            // Grown once per thread, then reused: no per-chunk page faults.
            if scratch.compressed.len() < bound {
                scratch.compressed.resize(bound, 0);
            }
            let written = compressor
                .compress_to_buffer(input, &mut scratch.compressed[..bound])
                .map_err(ChunkEncodeError::Zstd)?;
            // Store raw when zstd saves less than 1/64: decoding costs more than it saves.
            if written + raw.len() / 64 >= raw.len() {
                return Ok(use_parts(&stored_raw()));
            }
            let payload = &scratch.compressed[..written];
            let flags = FLAG_ZSTD | FLAG_RAW_CHECK | if shuffle { FLAG_SHUFFLE8 } else { 0 };
            let header = Header::new(
                FileKind::Chunk,
                CodecId::Raw,
                flags,
                payload,
                raw.len() as u64,
            )
            .with_raw_check(check);
            Ok(use_parts(&EncodedParts {
                hash,
                raw_len,
                header: header.encode(),
                payload,
            }))
        })
    }
}

/// An encoded chunk borrowed from its encoder: header and payload, written
/// one after the other.
#[derive(Debug)]
pub struct EncodedParts<'a> {
    /// Content hash of the raw bytes.
    pub hash: ChunkHash,
    /// Length of the raw bytes.
    pub raw_len: u32,
    /// The file's header.
    pub header: [u8; HEADER_LEN],
    /// The file's payload.
    pub payload: &'a [u8],
}

impl EncodedParts<'_> {
    /// Bytes of the chunk file.
    pub fn stored_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Checks a chunk file image as stored, without decoding it: its header,
/// its length, the checksum of its payload, its flags, and that it holds
/// `raw_len` bytes. A missing, truncated or damaged file fails; only a
/// well-formed file with other contents than its name says needs
/// [`decode_into`]'s hash check to be found.
pub fn check_stored(file: &[u8], raw_len: u64) -> Result<Header, ChunkDecodeError> {
    let header = Header::decode(file, FileKind::Chunk)?;
    let actual_len = file.len() as u64;
    let declared = HEADER_LEN as u64 + header.payload_len;
    if actual_len != declared {
        return Err(ChunkDecodeError::LengthMismatch {
            expected: declared,
            actual: actual_len,
        });
    }
    if !header.payload_matches(&file[HEADER_LEN..]) {
        return Err(ChunkDecodeError::PayloadChecksum);
    }
    if header.flags & !KNOWN_FLAGS != 0 {
        return Err(ChunkDecodeError::UnknownFlags(header.flags));
    }
    if header.flags & FLAG_RAW_CHECK == 0 && header.raw_check != 0 {
        return Err(HeaderError::ReservedNotZero(FileKind::Chunk).into());
    }
    if header.raw_len != raw_len {
        return Err(ChunkDecodeError::RawLength {
            expected: raw_len,
            actual: header.raw_len,
        });
    }
    Ok(header)
}

/// Decodes a chunk file image into `dest`, whose length is the raw length
/// the manifest expects, and checks the result against the chunk's name
/// `expected`: by the raw check where the chunk has one, otherwise by
/// hashing it.
pub fn decode_into(
    file: &[u8],
    expected: &ChunkHash,
    dest: &mut [u8],
) -> Result<(), ChunkDecodeError> {
    decode_checked(file, expected, dest, false)
}

/// [`decode_into`], and then the name recomputed from the decoded bytes
/// whatever the header says: what `cryo verify` does.
pub fn decode_into_rehash(
    file: &[u8],
    expected: &ChunkHash,
    dest: &mut [u8],
) -> Result<(), ChunkDecodeError> {
    decode_checked(file, expected, dest, true)
}

fn decode_checked(
    file: &[u8],
    expected: &ChunkHash,
    dest: &mut [u8],
    rehash: bool,
) -> Result<(), ChunkDecodeError> {
    let header = decode_unchecked(file, dest)?;
    let has_check = header.flags & FLAG_RAW_CHECK != 0;
    if has_check {
        check_raw(&header, expected, dest)?;
    }
    if rehash || !has_check {
        check_name(expected, dest)?;
    }
    Ok(())
}

fn check_raw(header: &Header, expected: &ChunkHash, dest: &[u8]) -> Result<(), ChunkDecodeError> {
    let actual = raw_check(dest, expected);
    if actual != header.raw_check {
        return Err(ChunkDecodeError::RawCheck {
            expected: header.raw_check,
            actual,
        });
    }
    Ok(())
}

fn check_name(expected: &ChunkHash, dest: &[u8]) -> Result<(), ChunkDecodeError> {
    let actual = ChunkHash::of(dest);
    if actual != *expected {
        return Err(ChunkDecodeError::HashMismatch { actual });
    }
    Ok(())
}

/// Decodes a checked chunk file image into `dest` and returns its header;
/// the decoded bytes are not checked yet.
fn decode_unchecked(file: &[u8], dest: &mut [u8]) -> Result<Header, ChunkDecodeError> {
    let header = check_stored(file, dest.len() as u64)?;
    let payload = &file[HEADER_LEN..];
    if header.flags & FLAG_ZSTD == 0 {
        if payload.len() != dest.len() {
            return Err(ChunkDecodeError::RawLength {
                expected: dest.len() as u64,
                actual: payload.len() as u64,
            });
        }
        dest.copy_from_slice(payload);
    } else {
        SCRATCH.with(|scratch| -> Result<(), ChunkDecodeError> {
            let scratch = &mut *scratch.borrow_mut();
            if scratch.decompressor.is_none() {
                scratch.decompressor =
                    Some(zstd::bulk::Decompressor::new().map_err(ChunkDecodeError::Zstd)?);
            }
            let decompressor = scratch
                .decompressor
                .as_mut()
                .ok_or_else(|| ChunkDecodeError::Zstd(std::io::Error::other("no zstd context")))?;
            let shuffled = header.flags & FLAG_SHUFFLE8 != 0;
            let target: &mut [u8] = if shuffled {
                if dest.len() % 8 != 0 {
                    return Err(ChunkDecodeError::UnknownFlags(header.flags));
                }
                scratch.shuffled.resize(dest.len(), 0);
                &mut scratch.shuffled
            } else {
                dest
            };
            let written = decompressor
                .decompress_to_buffer(payload, target)
                .map_err(ChunkDecodeError::Zstd)?;
            if written != target.len() {
                return Err(ChunkDecodeError::RawLength {
                    expected: target.len() as u64,
                    actual: written as u64,
                });
            }
            if shuffled {
                unshuffle8(&scratch.shuffled, dest);
            }
            Ok(())
        })?;
    }
    Ok(header)
}

#[cfg(test)]
#[path = "chunk_tests.rs"]
mod tests;
