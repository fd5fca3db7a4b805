//! Pack files (format 2): many chunks in one file, each behind a small
//! entry header, and an index at the end.
//!
//! A parallel filesystem cannot carry one file per 1 MiB chunk, so each
//! agent appends its ranks' new chunks to a pack of its own. A pack is
//! self-describing: the entries can be walked from the start without the
//! index ([`scan`]), so a pack whose writer died before it wrote the index
//! is still readable and `cryo verify` can rebuild its index. All integers
//! are little-endian.
//!
//! ```text
//! pack header (32 bytes, offset 0)
//!      0  8 magic "CRYOPACK"
//!      8  2 format major    10  2 format minor
//!     12  4 reserved, zero
//!     16 12 pack id (the file's name, 24 hex digits)
//!     28  4 CRC-32C of bytes 0..28
//! entry (at any offset after the header, one per chunk)
//!      0  4 magic "CPEN"
//!      4  4 blob length: the chunk's stored bytes that follow (its 64-byte
//!           chunk header, which carries flags, raw length and a payload
//!           checksum, then its payload)
//!      8 32 BLAKE3 hash of the chunk's raw bytes
//!     40  4 reserved, zero
//!     44  4 CRC-32C of bytes 0..44
//!     48    the blob
//! index (after the last entry; written when the pack is sealed)
//!           one 48-byte record per entry, in offset order:
//!      0 32 hash   32 8 entry offset   40 4 blob length   44 4 raw length
//! footer (last 48 bytes of a sealed pack)
//!      0  8 magic "CRYOPIDX"
//!      8  8 index offset    16 8 entry count    24 8 XXH3-64 of the index
//!     32 12 reserved, zero
//!     44  4 CRC-32C of bytes 0..44
//! ```

use std::fmt;
use std::str::FromStr;

use crc::{Crc, CRC_32_ISCSI};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::chunk::ChunkHash;
use crate::format::header::HEADER_LEN;
use crate::format::limits::{MAX_CHUNK_SIZE, MAX_STORED_CHUNK_LEN};

/// Length of the pack header.
pub const PACK_HEADER_LEN: usize = 32;
/// Length of an entry header.
pub const ENTRY_HEADER_LEN: usize = 48;
/// Length of one index record.
pub const INDEX_RECORD_LEN: usize = 48;
/// Length of the footer.
pub const FOOTER_LEN: usize = 48;
/// Format major and minor written in pack headers.
pub const PACK_VERSION: (u16, u16) = (2, 0);
/// Default size at which a writer starts a new pack: large enough that a
/// node writes a handful of files per checkpoint, small enough that a
/// repack copies a bounded amount.
pub const DEFAULT_PACK_SIZE: u64 = 1 << 30;
/// Largest blob an entry may declare.
// About 64.5 MiB: fits a u32.
#[allow(clippy::cast_possible_truncation)]
pub const MAX_BLOB_LEN: u32 = (HEADER_LEN + MAX_STORED_CHUNK_LEN) as u32;

const PACK_MAGIC: [u8; 8] = *b"CRYOPACK";
const ENTRY_MAGIC: [u8; 4] = *b"CPEN";
const FOOTER_MAGIC: [u8; 8] = *b"CRYOPIDX";
const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// A pack's identity and file name: 96 random bits, 24 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackId(pub [u8; 12]);

impl PackId {
    /// Lower-case hex, 24 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for PackId {
    type Err = PackError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || PackError::BadName(text.to_owned());
        if text.len() != 24 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 12];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(PackId(out))
    }
}

/// Where a chunk is stored: in a pack, or (format 1) in a file of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChunkPlace {
    /// A format 1 chunk file, `chunks/<hh>/<hash>`.
    Loose,
    /// An entry of a pack. After a repack moved the chunk, the pack may be
    /// gone: the reader then finds the chunk through the packs' indexes.
    Pack {
        /// The pack.
        pack: PackId,
        /// Offset of the entry header in the pack.
        offset: u64,
    },
}

/// One chunk of a pack, as its index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The chunk.
    pub hash: ChunkHash,
    /// Offset of its entry header.
    pub offset: u64,
    /// Length of its blob (chunk header and payload).
    pub blob_len: u32,
    /// Its raw (decoded) length.
    pub raw_len: u32,
}

impl IndexEntry {
    /// Offset just past the entry.
    pub fn end(&self) -> u64 {
        self.offset + ENTRY_HEADER_LEN as u64 + u64::from(self.blob_len)
    }
}

/// A pack, or part of one, is not what it should be.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PackError {
    /// Not a pack file name.
    #[error("{0:?} is not a pack name (24 lower-case hex digits)")]
    BadName(String),
    /// A magic number is wrong.
    #[error("bad magic in the {0}")]
    BadMagic(&'static str),
    /// A checksum does not match.
    #[error("bad checksum in the {0}")]
    BadChecksum(&'static str),
    /// The file ends before a structure it must hold.
    #[error("truncated: {what} needs bytes up to {needed}, the pack has {len}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: u64,
    },
    /// A pack written by an incompatible version.
    #[error("pack format {0}.{1} is not supported by this build (it reads 2.0)")]
    Version(u16, u16),
    /// Reserved bytes are set.
    #[error("reserved bytes of the {0} are not zero")]
    Reserved(&'static str),
    /// An entry reaches past the entries area.
    #[error("entry at {offset} ({len} bytes) reaches past the end of the entries at {end}")]
    BeyondEnd {
        /// Entry offset.
        offset: u64,
        /// Entry length.
        len: u64,
        /// End of the entries area.
        end: u64,
    },
    /// Two index entries overlap or are out of order.
    #[error("index entries at {first} and {second} overlap or are out of order")]
    Overlap {
        /// The earlier entry.
        first: u64,
        /// The entry that starts inside it.
        second: u64,
    },
    /// A length field is out of range.
    #[error("entry at {offset}: {field} {len} is out of range")]
    Length {
        /// Entry offset.
        offset: u64,
        /// Which field.
        field: &'static str,
        /// Its value.
        len: u64,
    },
    /// The pack's header names another pack than its file name.
    #[error("the header names pack {found}, the file is pack {expected}")]
    WrongId {
        /// The file's name.
        expected: PackId,
        /// The header's.
        found: PackId,
    },
    /// The entry header at a place names another chunk.
    #[error("the entry at {offset} holds chunk {found}, not the one wanted")]
    OtherChunk {
        /// The offset.
        offset: u64,
        /// What it holds.
        found: ChunkHash,
    },
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn need(bytes: &[u8], len: usize, what: &'static str) -> Result<(), PackError> {
    if bytes.len() < len {
        return Err(PackError::Truncated {
            what,
            needed: len as u64,
            len: bytes.len() as u64,
        });
    }
    Ok(())
}

/// The header that starts pack `id`.
pub fn encode_pack_header(id: PackId) -> [u8; PACK_HEADER_LEN] {
    let mut out = [0u8; PACK_HEADER_LEN];
    out[0..8].copy_from_slice(&PACK_MAGIC);
    out[8..10].copy_from_slice(&PACK_VERSION.0.to_le_bytes());
    out[10..12].copy_from_slice(&PACK_VERSION.1.to_le_bytes());
    out[16..28].copy_from_slice(&id.0);
    let crc = CRC32C.checksum(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Whether `bytes` start like a pack (for `cryo describe`).
pub fn is_pack(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..8] == PACK_MAGIC
}

/// Parses a pack header and returns the pack's id.
pub fn parse_pack_header(bytes: &[u8]) -> Result<PackId, PackError> {
    need(bytes, PACK_HEADER_LEN, "the pack header")?;
    if bytes[..8] != PACK_MAGIC {
        return Err(PackError::BadMagic("pack header"));
    }
    if CRC32C.checksum(&bytes[..28]) != u32_at(bytes, 28) {
        return Err(PackError::BadChecksum("pack header"));
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    if major != PACK_VERSION.0 || minor > PACK_VERSION.1 {
        return Err(PackError::Version(major, minor));
    }
    if bytes[12..16].iter().any(|&b| b != 0) {
        return Err(PackError::Reserved("pack header"));
    }
    let mut id = [0u8; 12];
    id.copy_from_slice(&bytes[16..28]);
    Ok(PackId(id))
}

/// The header of an entry holding chunk `hash` as `blob_len` stored bytes.
pub fn encode_entry_header(hash: &ChunkHash, blob_len: u32) -> [u8; ENTRY_HEADER_LEN] {
    let mut out = [0u8; ENTRY_HEADER_LEN];
    out[0..4].copy_from_slice(&ENTRY_MAGIC);
    out[4..8].copy_from_slice(&blob_len.to_le_bytes());
    out[8..40].copy_from_slice(&hash.0);
    let crc = CRC32C.checksum(&out[..44]);
    out[44..48].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Parses an entry header at `offset` (for messages): the chunk's hash and
/// its blob length.
pub fn parse_entry_header(bytes: &[u8], offset: u64) -> Result<(ChunkHash, u32), PackError> {
    need(bytes, ENTRY_HEADER_LEN, "an entry header")?;
    if bytes[..4] != ENTRY_MAGIC {
        return Err(PackError::BadMagic("entry header"));
    }
    if CRC32C.checksum(&bytes[..44]) != u32_at(bytes, 44) {
        return Err(PackError::BadChecksum("entry header"));
    }
    if bytes[40..44].iter().any(|&b| b != 0) {
        return Err(PackError::Reserved("entry header"));
    }
    let blob_len = u32_at(bytes, 4);
    if (blob_len as usize) < HEADER_LEN || blob_len > MAX_BLOB_LEN {
        return Err(PackError::Length {
            offset,
            field: "blob length",
            len: u64::from(blob_len),
        });
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[8..40]);
    Ok((ChunkHash(hash), blob_len))
}

/// The index and footer that seal a pack whose entries end at
/// `index_offset`. `entries` must be in offset order.
pub fn encode_index(entries: &[IndexEntry], index_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_RECORD_LEN + FOOTER_LEN);
    for entry in entries {
        out.extend_from_slice(&entry.hash.0);
        out.extend_from_slice(&entry.offset.to_le_bytes());
        out.extend_from_slice(&entry.blob_len.to_le_bytes());
        out.extend_from_slice(&entry.raw_len.to_le_bytes());
    }
    let xxh = xxhash_rust::xxh3::xxh3_64(&out);
    let mut footer = [0u8; FOOTER_LEN];
    footer[0..8].copy_from_slice(&FOOTER_MAGIC);
    footer[8..16].copy_from_slice(&index_offset.to_le_bytes());
    footer[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    footer[24..32].copy_from_slice(&xxh.to_le_bytes());
    let crc = CRC32C.checksum(&footer[..44]);
    footer[44..48].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&footer);
    out
}

/// What a sealed pack's footer says: where the index starts and how many
/// records it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the index (the end of the entries).
    pub index_offset: u64,
    /// Records in the index.
    pub count: u64,
    /// XXH3-64 of the index records.
    pub index_xxh3: u64,
}

impl Footer {
    /// Bytes of the index and the footer together.
    pub fn tail_len(&self) -> u64 {
        self.count * INDEX_RECORD_LEN as u64 + FOOTER_LEN as u64
    }
}

/// Parses the footer, the last [`FOOTER_LEN`] bytes of a pack of
/// `pack_len` bytes. `Ok(None)`: the pack has no footer (it was never
/// sealed) and must be scanned.
pub fn parse_footer(bytes: &[u8], pack_len: u64) -> Result<Option<Footer>, PackError> {
    need(bytes, FOOTER_LEN, "the footer")?;
    if bytes[..8] != FOOTER_MAGIC {
        return Ok(None);
    }
    if CRC32C.checksum(&bytes[..44]) != u32_at(bytes, 44) {
        return Err(PackError::BadChecksum("footer"));
    }
    if bytes[32..44].iter().any(|&b| b != 0) {
        return Err(PackError::Reserved("footer"));
    }
    let footer = Footer {
        index_offset: u64_at(bytes, 8),
        count: u64_at(bytes, 16),
        index_xxh3: u64_at(bytes, 24),
    };
    let tail = footer
        .count
        .checked_mul(INDEX_RECORD_LEN as u64)
        .and_then(|n| n.checked_add(FOOTER_LEN as u64));
    let expected_len = tail.and_then(|tail| footer.index_offset.checked_add(tail));
    if footer.index_offset < PACK_HEADER_LEN as u64 || expected_len != Some(pack_len) {
        return Err(PackError::Truncated {
            what: "the index the footer describes",
            needed: expected_len.unwrap_or(u64::MAX),
            len: pack_len,
        });
    }
    Ok(Some(footer))
}

/// Parses and checks the index records of a sealed pack (the `footer.count`
/// records before the footer): their checksum, that each entry lies between
/// the pack header and the index, and that no two overlap.
pub fn parse_index(records: &[u8], footer: &Footer) -> Result<Vec<IndexEntry>, PackError> {
    let count = usize::try_from(footer.count).map_err(|_| PackError::Length {
        offset: footer.index_offset,
        field: "entry count",
        len: footer.count,
    })?;
    let len = count.saturating_mul(INDEX_RECORD_LEN);
    need(records, len, "the index")?;
    let records = &records[..len];
    if xxhash_rust::xxh3::xxh3_64(records) != footer.index_xxh3 {
        return Err(PackError::BadChecksum("index"));
    }
    let mut entries = Vec::with_capacity(count);
    let mut previous: Option<IndexEntry> = None;
    for record in records.chunks_exact(INDEX_RECORD_LEN) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&record[..32]);
        let entry = IndexEntry {
            hash: ChunkHash(hash),
            offset: u64_at(record, 32),
            blob_len: u32_at(record, 40),
            raw_len: u32_at(record, 44),
        };
        check_entry(&entry, footer.index_offset)?;
        if let Some(previous) = previous {
            if entry.offset < previous.end() {
                return Err(PackError::Overlap {
                    first: previous.offset,
                    second: entry.offset,
                });
            }
        }
        previous = Some(entry);
        entries.push(entry);
    }
    Ok(entries)
}

fn check_entry(entry: &IndexEntry, entries_end: u64) -> Result<(), PackError> {
    if (entry.blob_len as usize) < HEADER_LEN || entry.blob_len > MAX_BLOB_LEN {
        return Err(PackError::Length {
            offset: entry.offset,
            field: "blob length",
            len: u64::from(entry.blob_len),
        });
    }
    if entry.raw_len as usize > MAX_CHUNK_SIZE {
        return Err(PackError::Length {
            offset: entry.offset,
            field: "raw length",
            len: u64::from(entry.raw_len),
        });
    }
    if entry.offset < PACK_HEADER_LEN as u64 || entry.end() > entries_end {
        return Err(PackError::BeyondEnd {
            offset: entry.offset,
            len: ENTRY_HEADER_LEN as u64 + u64::from(entry.blob_len),
            end: entries_end,
        });
    }
    Ok(())
}

/// What walking a pack's entries found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The entries, in offset order.
    pub entries: Vec<IndexEntry>,
    /// Where the walk stopped.
    pub end: u64,
    /// Why it stopped before the end of the bytes, if it did: an entry that
    /// does not parse, or one that runs past the end (a writer that died
    /// mid-write).
    pub stopped: Option<PackError>,
}

/// Rebuilds a pack's index by walking its entries from the pack header on,
/// checking each entry header and each chunk header's length fields. The
/// chunk payloads are not checked here (the reader checks them).
pub fn scan(pack: &[u8]) -> Result<Scan, PackError> {
    let read = |at: u64, buf: &mut [u8]| -> Result<(), ()> {
        let at = usize::try_from(at).map_err(drop)?;
        let src = pack.get(at..at + buf.len()).ok_or(())?;
        buf.copy_from_slice(src);
        Ok(())
    };
    match scan_with(pack.len() as u64, read) {
        Ok(scan) => scan,
        Err(()) => Err(PackError::Truncated {
            what: "the pack",
            needed: 0,
            len: pack.len() as u64,
        }),
    }
}

/// [`scan`] over a pack of `pack_len` bytes read through `read(offset,
/// buf)`, which fills `buf` from `offset` or fails (an I/O error: the outer
/// result). Reads the header, the footer and 112 bytes per entry, never the
/// payloads, so a 1 GiB pack is walked with a few thousand small reads.
pub fn scan_with<E>(
    pack_len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Result<Scan, PackError>, E> {
    let head = match read_head(pack_len, &mut read)? {
        Ok(head) => head,
        Err(err) => return Ok(Err(err)),
    };
    // A sealed pack's entries end where its index starts; a footer that does
    // not parse is walked over as far as the entries go.
    let limit = match head.footer {
        Ok(Some(footer)) => footer.index_offset,
        _ => pack_len,
    };
    walk_entries(limit, read).map(Ok)
}

/// A pack's header and footer, read once.
struct Head {
    id: PackId,
    /// `Ok(None)`: the pack has no footer.
    footer: Result<Option<Footer>, PackError>,
}

/// Reads and checks the pack header, and reads the footer if the pack is
/// long enough to have one.
fn read_head<E>(
    pack_len: u64,
    read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Result<Head, PackError>, E> {
    if pack_len < PACK_HEADER_LEN as u64 {
        return Ok(Err(PackError::Truncated {
            what: "the pack header",
            needed: PACK_HEADER_LEN as u64,
            len: pack_len,
        }));
    }
    let mut header = [0u8; PACK_HEADER_LEN];
    read(0, &mut header)?;
    let id = match parse_pack_header(&header) {
        Ok(id) => id,
        Err(err) => return Ok(Err(err)),
    };
    let mut footer = Ok(None);
    if pack_len >= (PACK_HEADER_LEN + FOOTER_LEN) as u64 {
        let mut bytes = [0u8; FOOTER_LEN];
        read(pack_len - FOOTER_LEN as u64, &mut bytes)?;
        footer = parse_footer(&bytes, pack_len);
    }
    Ok(Ok(Head { id, footer }))
}

/// Walks the entries from the pack header up to `limit`, reading 112 bytes
/// per entry.
fn walk_entries<E>(
    limit: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Scan, E> {
    let mut at = PACK_HEADER_LEN as u64;
    let mut entries = Vec::new();
    let mut head = [0u8; ENTRY_HEADER_LEN + HEADER_LEN];
    let stopped = loop {
        if at == limit {
            break None;
        }
        if at + head.len() as u64 > limit {
            break Some(PackError::Truncated {
                what: "an entry",
                needed: at + head.len() as u64,
                len: limit,
            });
        }
        read(at, &mut head)?;
        let (hash, blob_len) = match parse_entry_header(&head, at) {
            Ok(parsed) => parsed,
            Err(err) => break Some(err),
        };
        let end = at + ENTRY_HEADER_LEN as u64 + u64::from(blob_len);
        if end > limit {
            break Some(PackError::BeyondEnd {
                offset: at,
                len: end - at,
                end: limit,
            });
        }
        let raw_len = u64_at(&head, ENTRY_HEADER_LEN + 32);
        entries.push(IndexEntry {
            hash,
            offset: at,
            blob_len,
            raw_len: u32::try_from(raw_len).unwrap_or(u32::MAX),
        });
        at = end;
    };
    Ok(Scan {
        entries,
        end: at,
        stopped,
    })
}

/// How a pack's index was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexSource {
    /// From the pack's footer.
    Sealed {
        /// Where the index starts (the end of the entries).
        index_offset: u64,
    },
    /// The pack has no footer (its writer stopped before sealing it): its
    /// entries were walked.
    Scanned {
        /// Where the walk stopped.
        end: u64,
        /// Why it stopped before the end, if it did.
        stopped: Option<PackError>,
    },
}

/// A pack's id, entries, and how the entries were found.
pub type ReadIndex = (PackId, Vec<IndexEntry>, IndexSource);

/// Reads the index of a pack of `pack_len` bytes through `read`: from its
/// footer if it has one, else by [`scan_with`]. Checks the pack header
/// either way and returns the pack's id with the entries.
pub fn read_index_with<E>(
    pack_len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Result<ReadIndex, PackError>, E> {
    let Head { id, footer } = match read_head(pack_len, &mut read)? {
        Ok(head) => head,
        Err(err) => return Ok(Err(err)),
    };
    match footer {
        Ok(Some(footer)) => {
            let Ok(len) = usize::try_from(footer.tail_len() - FOOTER_LEN as u64) else {
                return Ok(Err(PackError::Length {
                    offset: footer.index_offset,
                    field: "entry count",
                    len: footer.count,
                }));
            };
            let mut records = vec![0u8; len];
            read(footer.index_offset, &mut records)?;
            Ok(parse_index(&records, &footer).map(|entries| {
                let source = IndexSource::Sealed {
                    index_offset: footer.index_offset,
                };
                (id, entries, source)
            }))
        }
        Ok(None) => {
            let scan = walk_entries(pack_len, read)?;
            let source = IndexSource::Scanned {
                end: scan.end,
                stopped: scan.stopped,
            };
            Ok(Ok((id, scan.entries, source)))
        }
        Err(err) => Ok(Err(err)),
    }
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
