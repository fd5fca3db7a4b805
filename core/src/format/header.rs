//! The fixed 64-byte header that starts every file cryo writes.
//!
//! The header is read without the general codec, so that `cryo describe` can
//! say what a file is (its kind, version and lengths) even when this build
//! cannot load it. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    8 magic          one value per file kind (see [`FileKind`])
//!      8    2 version major  a different major is refused
//!     10    2 version minor  a newer minor is refused, an older one accepted
//!     12    2 version patch  any patch is accepted
//!     14    2 codec id       how the payload is encoded (see [`CodecId`])
//!     16    4 flags          kind-specific (chunk: compression and filter)
//!     20    4 header length  64 in this version; lets later versions grow it
//!     24    8 payload length bytes that follow the header, as stored
//!     32    8 raw length     payload length once decoded (decompressed)
//!     40    8 payload xxh3   XXH3-64 of the stored payload bytes
//!     48    8 raw check      chunks (from 2.1): XXH3-64 of the decoded bytes,
//!                            seeded with the chunk's name; zero otherwise
//!     56    4 reserved       zero
//!     60    4 header crc     CRC-32C of bytes 0..60
//! ```

use std::fmt;

use crc::{Crc, CRC_32_ISCSI};
use thiserror::Error;

use crate::format::limits::{MAX_CHUNK_SIZE, MAX_ENCODED_LEN, MAX_STORED_CHUNK_LEN};

/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 64;
const HEADER_LEN_U32: u32 = 64;

const HEADER_CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// The image format version written by this build. It is versioned apart from
/// the crate: bump the minor for backward-compatible additions, the major for
/// anything an older reader would misread.
pub const FORMAT_VERSION: FormatVersion = FormatVersion {
    major: 2,
    minor: 8,
    patch: 0,
};

/// The last minor of each older major this build still reads: format 1
/// stored chunks one per file, and its files restore unchanged
/// ([`crate::format::legacy`] converts their metadata).
pub const OLDER_MAJORS: [FormatVersion; 1] = [FormatVersion {
    major: 1,
    minor: 1,
    patch: 0,
}];

/// A format version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FormatVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Backward-compatible additions.
    pub minor: u16,
    /// Fixes that do not change the layout.
    pub patch: u16,
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What a cryo file holds, told by its magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// The committed manifest of one epoch.
    Manifest,
    /// One rank's part of an epoch, written by its agent before commit.
    RankPart,
    /// A content-addressed chunk of region data.
    Chunk,
    /// The job's chunk index as of one epoch (format 2).
    ChunkIndex,
}

impl FileKind {
    /// Every kind, for lookups by magic.
    pub const ALL: [FileKind; 4] = [
        FileKind::Manifest,
        FileKind::RankPart,
        FileKind::Chunk,
        FileKind::ChunkIndex,
    ];

    /// The magic number that starts files of this kind.
    pub const fn magic(self) -> u64 {
        match self {
            FileKind::Manifest => u64::from_le_bytes(*b"CRYOMANF"),
            FileKind::RankPart => u64::from_le_bytes(*b"CRYOPART"),
            FileKind::Chunk => u64::from_le_bytes(*b"CRYOCHNK"),
            FileKind::ChunkIndex => u64::from_le_bytes(*b"CRYOCIDX"),
        }
    }

    /// The kind whose magic this is, if any.
    pub fn from_magic(magic: u64) -> Option<FileKind> {
        Self::ALL.into_iter().find(|kind| kind.magic() == magic)
    }

    /// Largest payload accepted for this kind, checked before allocating.
    pub const fn max_payload(self) -> u64 {
        match self {
            FileKind::Manifest | FileKind::RankPart | FileKind::ChunkIndex => {
                MAX_ENCODED_LEN as u64
            }
            FileKind::Chunk => MAX_STORED_CHUNK_LEN as u64,
        }
    }

    /// A short name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            FileKind::Manifest => "epoch manifest",
            FileKind::RankPart => "rank part",
            FileKind::Chunk => "chunk",
            FileKind::ChunkIndex => "chunk index",
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a payload is encoded. Kept in the header so the codec can be swapped
/// without guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CodecId {
    /// Raw bytes (chunks; compression is told by the flags).
    Raw = 0,
    /// bincode 2, fixed-int little-endian encoding, see [`crate::format::codec`].
    Bincode2FixintLe = 1,
}

impl CodecId {
    /// The codec with this id, if known.
    pub fn from_u16(id: u16) -> Option<CodecId> {
        match id {
            0 => Some(CodecId::Raw),
            1 => Some(CodecId::Bincode2FixintLe),
            _ => None,
        }
    }
}

/// The decoded header, before any version or length policy is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The file kind (from the magic).
    pub kind: FileKind,
    /// The format version the file was written with.
    pub version: FormatVersion,
    /// Raw codec id; may be unknown to this build.
    pub codec: u16,
    /// Kind-specific flags.
    pub flags: u32,
    /// Header length as written.
    pub header_len: u32,
    /// Stored payload length.
    pub payload_len: u64,
    /// Decoded payload length.
    pub raw_len: u64,
    /// XXH3-64 of the stored payload.
    pub payload_xxh3: u64,
    /// A chunk's check of its decoded bytes (see `format::chunk`); zero in
    /// other files and in chunks written before format 2.1.
    pub raw_check: u64,
}

/// Why a header was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("truncated header: {0} bytes, need {HEADER_LEN}")]
    Truncated(usize),
    /// The magic is not one of cryo's.
    #[error("not a cryo file (magic {0:#018x})")]
    BadMagic(u64),
    /// The header checksum does not match.
    #[error("{kind} header is corrupt (crc32c {found:#010x}, expected {expected:#010x})")]
    BadChecksum {
        /// Kind told by the magic.
        kind: FileKind,
        /// CRC stored in the file.
        found: u32,
        /// CRC computed over the header.
        expected: u32,
    },
    /// The file is of a different kind than the caller asked for.
    #[error("expected a {expected}, found a {found}")]
    WrongKind {
        /// What the caller wanted.
        expected: FileKind,
        /// What the magic says.
        found: FileKind,
    },
    /// Written by an incompatible major version.
    #[error("{kind} format {found} has major version {}, this cryo reads only 1.x and {}.x", found.major, FORMAT_VERSION.major)]
    UnsupportedMajor {
        /// The file kind.
        kind: FileKind,
        /// The version in the file.
        found: FormatVersion,
    },
    /// Written by a newer minor version that may hold fields we would drop.
    #[error(
        "{kind} format {found} is newer than this cryo ({FORMAT_VERSION}); upgrade cryo to read it"
    )]
    NewerMinor {
        /// The file kind.
        kind: FileKind,
        /// The version in the file.
        found: FormatVersion,
    },
    /// The header length field is not one we understand.
    #[error("{kind} header length {0} is not {HEADER_LEN}", kind = .1)]
    BadHeaderLen(u32, FileKind),
    /// A codec this build does not know.
    #[error("{kind} uses unknown codec id {codec}")]
    UnknownCodec {
        /// The file kind.
        kind: FileKind,
        /// The codec id in the file.
        codec: u16,
    },
    /// A length beyond the cap for this kind.
    #[error("{kind} declares a {field} of {len} bytes, above the limit of {max}")]
    LengthTooLarge {
        /// The file kind.
        kind: FileKind,
        /// Which length.
        field: &'static str,
        /// The declared length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Reserved bytes are not zero.
    #[error("{0} header has non-zero reserved bytes")]
    ReservedNotZero(FileKind),
}

impl Header {
    /// A header of the current format version for a payload.
    pub fn new(kind: FileKind, codec: CodecId, flags: u32, payload: &[u8], raw_len: u64) -> Header {
        Header {
            kind,
            version: FORMAT_VERSION,
            codec: codec as u16,
            flags,
            header_len: HEADER_LEN_U32,
            payload_len: payload.len() as u64,
            raw_len,
            payload_xxh3: xxhash_rust::xxh3::xxh3_64(payload),
            raw_check: 0,
        }
    }

    /// The same header with a chunk's check of its decoded bytes.
    pub fn with_raw_check(self, raw_check: u64) -> Header {
        Header { raw_check, ..self }
    }

    /// Serialises the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&self.kind.magic().to_le_bytes());
        out[8..10].copy_from_slice(&self.version.major.to_le_bytes());
        out[10..12].copy_from_slice(&self.version.minor.to_le_bytes());
        out[12..14].copy_from_slice(&self.version.patch.to_le_bytes());
        out[14..16].copy_from_slice(&self.codec.to_le_bytes());
        out[16..20].copy_from_slice(&self.flags.to_le_bytes());
        out[20..24].copy_from_slice(&self.header_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        out[32..40].copy_from_slice(&self.raw_len.to_le_bytes());
        out[40..48].copy_from_slice(&self.payload_xxh3.to_le_bytes());
        out[48..56].copy_from_slice(&self.raw_check.to_le_bytes());
        let crc = HEADER_CRC.checksum(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the header's fields, checking only the magic and the CRC. Use
    /// this to describe a file; use [`Header::decode`] to load one.
    pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Truncated(bytes.len()));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let magic = u64_at(0);
        let kind = FileKind::from_magic(magic).ok_or(HeaderError::BadMagic(magic))?;
        let found = u32_at(60);
        let expected = HEADER_CRC.checksum(&bytes[0..60]);
        if found != expected {
            return Err(HeaderError::BadChecksum {
                kind,
                found,
                expected,
            });
        }
        Ok(Header {
            kind,
            version: FormatVersion {
                major: u16_at(8),
                minor: u16_at(10),
                patch: u16_at(12),
            },
            codec: u16_at(14),
            flags: u32_at(16),
            header_len: u32_at(20),
            payload_len: u64_at(24),
            raw_len: u64_at(32),
            payload_xxh3: u64_at(40),
            raw_check: u64_at(48),
        })
    }

    /// Parses and validates a header for loading a file of `kind`: version,
    /// codec, header length and length caps.
    pub fn decode(bytes: &[u8], kind: FileKind) -> Result<Header, HeaderError> {
        let header = Header::parse(bytes)?;
        if header.kind != kind {
            return Err(HeaderError::WrongKind {
                expected: kind,
                found: header.kind,
            });
        }
        header.check_loadable()?;
        let raw_check_allowed = kind == FileKind::Chunk;
        if bytes[56..60].iter().any(|&b| b != 0) || (header.raw_check != 0 && !raw_check_allowed) {
            return Err(HeaderError::ReservedNotZero(kind));
        }
        Ok(header)
    }

    /// Checks that this build can load the file: version, codec, lengths.
    pub fn check_loadable(&self) -> Result<(), HeaderError> {
        let kind = self.kind;
        let newest_minor = if self.version.major == FORMAT_VERSION.major {
            FORMAT_VERSION.minor
        } else if let Some(older) = OLDER_MAJORS
            .iter()
            .find(|older| older.major == self.version.major)
        {
            older.minor
        } else {
            return Err(HeaderError::UnsupportedMajor {
                kind,
                found: self.version,
            });
        };
        if self.version.minor > newest_minor {
            return Err(HeaderError::NewerMinor {
                kind,
                found: self.version,
            });
        }
        if self.header_len != HEADER_LEN_U32 {
            return Err(HeaderError::BadHeaderLen(self.header_len, kind));
        }
        if CodecId::from_u16(self.codec).is_none() {
            return Err(HeaderError::UnknownCodec {
                kind,
                codec: self.codec,
            });
        }
        let max = kind.max_payload();
        if self.payload_len > max {
            return Err(HeaderError::LengthTooLarge {
                kind,
                field: "payload length",
                len: self.payload_len,
                max,
            });
        }
        let max_raw = match kind {
            FileKind::Chunk => MAX_CHUNK_SIZE as u64,
            _ => max,
        };
        if self.raw_len > max_raw {
            return Err(HeaderError::LengthTooLarge {
                kind,
                field: "decoded length",
                len: self.raw_len,
                max: max_raw,
            });
        }
        Ok(())
    }

    /// Whether `payload` matches the checksum in the header.
    pub fn payload_matches(&self, payload: &[u8]) -> bool {
        payload.len() as u64 == self.payload_len
            && xxhash_rust::xxh3::xxh3_64(payload) == self.payload_xxh3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; HEADER_LEN] {
        Header::new(
            FileKind::Manifest,
            CodecId::Bincode2FixintLe,
            0,
            b"hello",
            5,
        )
        .encode()
    }

    fn recrc(bytes: &mut [u8; HEADER_LEN]) {
        let crc = HEADER_CRC.checksum(&bytes[0..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let header = Header::decode(&bytes, FileKind::Manifest).expect("decodes");
        assert_eq!(header.version, FORMAT_VERSION);
        assert_eq!(header.payload_len, 5);
        assert!(header.payload_matches(b"hello"));
        assert!(!header.payload_matches(b"hellO"));
    }

    #[test]
    fn truncated_is_refused() {
        let bytes = sample();
        assert_eq!(
            Header::decode(&bytes[..63], FileKind::Manifest),
            Err(HeaderError::Truncated(63))
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut bytes = sample();
        bytes[0] ^= 0xff;
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::BadMagic(_))
        ));
    }

    #[test]
    fn flipped_bit_fails_crc() {
        let mut bytes = sample();
        bytes[30] ^= 1;
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::BadChecksum { .. })
        ));
    }

    #[test]
    fn wrong_kind_is_refused() {
        let bytes = sample();
        assert_eq!(
            Header::decode(&bytes, FileKind::Chunk),
            Err(HeaderError::WrongKind {
                expected: FileKind::Chunk,
                found: FileKind::Manifest
            })
        );
    }

    #[test]
    fn other_major_is_refused_but_described() {
        let mut bytes = sample();
        bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
        recrc(&mut bytes);
        let err = Header::decode(&bytes, FileKind::Manifest).unwrap_err();
        assert!(matches!(err, HeaderError::UnsupportedMajor { .. }));
        assert!(
            err.to_string()
                .contains(&format!("3.{}.0", FORMAT_VERSION.minor)),
            "{err}"
        );
        // describe still works
        let parsed = Header::parse(&bytes).expect("parse ignores version");
        assert_eq!(parsed.version.major, 3);
    }

    #[test]
    fn format_1_files_are_read_up_to_its_last_minor() {
        for (minor, ok) in [(0u16, true), (1, true), (2, false)] {
            let mut bytes = sample();
            bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
            bytes[10..12].copy_from_slice(&minor.to_le_bytes());
            recrc(&mut bytes);
            assert_eq!(
                Header::decode(&bytes, FileKind::Manifest).is_ok(),
                ok,
                "1.{minor}"
            );
        }
    }

    #[test]
    fn newer_minor_is_refused_older_patch_accepted() {
        let mut bytes = sample();
        bytes[10..12].copy_from_slice(&(FORMAT_VERSION.minor + 1).to_le_bytes());
        recrc(&mut bytes);
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::NewerMinor { .. })
        ));
        let mut bytes = sample();
        bytes[12..14].copy_from_slice(&77u16.to_le_bytes());
        recrc(&mut bytes);
        assert!(Header::decode(&bytes, FileKind::Manifest).is_ok());
    }

    #[test]
    fn hostile_lengths_are_refused() {
        let mut bytes = sample();
        bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        recrc(&mut bytes);
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::LengthTooLarge {
                field: "payload length",
                ..
            })
        ));
        let mut bytes = sample();
        bytes[32..40].copy_from_slice(&(1u64 << 60).to_le_bytes());
        recrc(&mut bytes);
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::LengthTooLarge {
                field: "decoded length",
                ..
            })
        ));
    }

    #[test]
    fn unknown_codec_and_header_len_are_refused() {
        let mut bytes = sample();
        bytes[14..16].copy_from_slice(&99u16.to_le_bytes());
        recrc(&mut bytes);
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::UnknownCodec { codec: 99, .. })
        ));
        let mut bytes = sample();
        bytes[20..24].copy_from_slice(&128u32.to_le_bytes());
        recrc(&mut bytes);
        assert!(matches!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::BadHeaderLen(128, _))
        ));
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let mut bytes = sample();
        bytes[50] = 1;
        recrc(&mut bytes);
        assert_eq!(
            Header::decode(&bytes, FileKind::Manifest),
            Err(HeaderError::ReservedNotZero(FileKind::Manifest))
        );
    }

    #[test]
    fn only_a_chunk_carries_a_raw_check() {
        let chunk = Header::new(FileKind::Chunk, CodecId::Raw, 0, b"payload", 7).with_raw_check(42);
        let bytes = chunk.encode();
        assert_eq!(Header::decode(&bytes, FileKind::Chunk), Ok(chunk));
        let mut reserved = bytes;
        reserved[57] = 1;
        recrc(&mut reserved);
        assert_eq!(
            Header::decode(&reserved, FileKind::Chunk),
            Err(HeaderError::ReservedNotZero(FileKind::Chunk))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Header::parse(&bytes);
            let _ = Header::decode(&bytes, FileKind::Chunk);
        }
    }
}
