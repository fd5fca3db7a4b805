//! The table of files a rank wrote and closed before a checkpoint (format
//! 2.2), saved as the region `cryo:closed-files` of kind
//! [`RegionKind::ClosedFiles`](crate::format::manifest::RegionKind).
//!
//! A log that a program opens, appends to and closes at every step is not
//! open at the checkpoint, so no fd record names it; yet the steps re-run
//! after a restart append their lines a second time. The runtime notes such
//! files when they are closed, with their size then; at each checkpoint it
//! records that size and their size at the checkpoint, each with a hash of
//! the bytes just before it (the *tail*). A restart cuts a file back to
//! a recorded size only when its bytes there still hash the same: it grew
//! after the checkpoint, and nothing before the cut point changed as far
//! as the tail shows.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::format::codec::{self, CodecError};

/// The region that holds a rank's table.
pub const CLOSED_FILES_REGION: &str = "cryo:closed-files";
/// How many bytes before the recorded size the tail hash covers.
pub const TAIL_BYTES: u64 = 4096;
/// The most files one rank's table holds; the least recently closed go
/// first (a log closed at every step stays).
pub const MAX_CLOSED_FILES: usize = 256;
/// The largest encoded table a restart reads: room for the most files a
/// table holds, each with the longest path (`PATH_MAX`).
pub const MAX_TABLE_BYTES: u64 = 2 << 20;

/// A file's size at some moment, and the [`tail_hash`] of its bytes just
/// before that size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Size in bytes.
    pub size: u64,
    /// Hash of the tail before `size`.
    pub tail: u64,
}

/// One file a rank wrote and closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedFile {
    /// Absolute path at the last close.
    pub path: String,
    /// At the checkpoint: where a file only this rank recorded is cut
    /// back to (what the rank wrote by any means before it parked).
    pub at_checkpoint: Mark,
    /// At the size the file had right after the rank's last close before
    /// the checkpoint (hashed at the checkpoint: appending after the close
    /// does not change those bytes): where a file several ranks recorded
    /// is cut back to (the largest over the ranks), so that lines another
    /// rank appended after it resumed from the checkpoint are not kept.
    pub at_close: Mark,
    /// It was open with `O_APPEND`: growth after the checkpoint is certainly
    /// output to undo, and a file that cannot be cut back is reported.
    /// Otherwise (a Fortran unit with `position='append'` sets no flag) it
    /// is cut only when the tail matches, and left quietly when not.
    pub appended: bool,
}

/// A rank's table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedFiles {
    /// One entry per path.
    pub files: Vec<ClosedFile>,
}

impl ClosedFiles {
    /// The table's bytes as saved in its region.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// A table read back from its region.
    pub fn decode(bytes: &[u8]) -> Result<ClosedFiles, CodecError> {
        codec::decode(bytes)
    }
}

/// Where the tail of a file of `size` bytes starts.
pub fn tail_start(size: u64) -> u64 {
    size.saturating_sub(TAIL_BYTES)
}

/// The hash of a file's tail (the bytes from [`tail_start`] to its size),
/// seeded with the size so that an empty tail of a different length differs.
pub fn tail_hash(size: u64, tail: &[u8]) -> u64 {
    xxh3_64(tail) ^ size.rotate_left(17)
}

/// The key under which ranks compare a file: its path.
pub fn path_key(path: &str) -> u64 {
    xxh3_64(path.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_damage_is_refused() {
        let mark = Mark {
            size: 9000,
            tail: tail_hash(9000, b"abc"),
        };
        let table = ClosedFiles {
            files: vec![ClosedFile {
                path: "/work/log".into(),
                at_checkpoint: mark,
                at_close: mark,
                appended: true,
            }],
        };
        let bytes = table.encode().unwrap();
        assert_eq!(ClosedFiles::decode(&bytes).unwrap(), table);
        assert!(ClosedFiles::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(ClosedFiles::decode(&longer).is_err());
    }

    #[test]
    fn the_fullest_table_fits_the_limit() {
        let mark = Mark {
            size: u64::MAX,
            tail: u64::MAX,
        };
        let table = ClosedFiles {
            files: (0..MAX_CLOSED_FILES)
                .map(|n| ClosedFile {
                    path: format!("/{n:04}{}", "x".repeat(4090)),
                    at_checkpoint: mark,
                    at_close: mark,
                    appended: true,
                })
                .collect(),
        };
        assert!(table.encode().unwrap().len() as u64 <= MAX_TABLE_BYTES);
    }

    #[test]
    fn the_tail_covers_the_last_bytes_before_the_size() {
        assert_eq!(tail_start(100), 0);
        assert_eq!(tail_start(TAIL_BYTES + 5), 5);
        assert_ne!(tail_hash(0, b""), tail_hash(1, b""));
        assert_ne!(tail_hash(3, b"abc"), tail_hash(3, b"abd"));
    }
}
