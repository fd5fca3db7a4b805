//! Metadata layouts of earlier minor versions, decoded and converted to the
//! current types so that every older image still restores.
//!
//! bincode is not self-describing: a field added in a minor version changes
//! the layout, so each file is decoded with the layout of the version its
//! header names ([`MetaFile::decode_version`]).
//!
//! * 1.0 → 1.1: `FdRecord::shares_with`, `RankRecord::warnings`, the
//!   `FdRestore::NotOurs` and `RegionKind::{UnlinkedFile, AppMapping}`
//!   variants (appended, so 1.0's variant indices are unchanged).
//! * 1.1 → 2.0: `ChunkRef::place`, where the chunk is stored (a pack entry
//!   or, for every chunk of format 1, a file of its own).
//! * 2.0 → 2.1: the raw check in a chunk's header (no metadata change).
//! * 2.1 → 2.2: the `RegionKind::ClosedFiles` variant (appended: a 2.1
//!   payload decodes with the current layout).
//! * 2.2 → 2.3: the `RegionKind::NodeFileContents` variant (appended; then
//!   named `ClosedFileContents`).
//! * 2.3 → 2.4: `RankRecord::cwd`, the rank's working directory.
//! * 2.4 → 2.5: `RankRecord::process`, its umask and the modes of the
//!   files it saved.
//! * 2.5 → 2.6: the `FdRestore::ReopenOf` variant (appended: a 2.5
//!   payload decodes with the current layout).
//! * 2.6 → 2.7: `ProcessAttrs::tails`, the last bytes of the files held
//!   open whose contents were not saved.
//! * 2.7 → 2.8: the `RegionKind::ProcessState` variant (appended: a 2.7
//!   payload decodes with the current layout).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::format::chunk::ChunkHash;
use crate::format::codec::{self, CodecError};
use crate::format::header::FormatVersion;
use crate::format::manifest::{
    ChunkRef, FdKind, FdRecord, FdRestore, Manifest, MappingRecord, RankRecord, RegionKind,
    RegionRecord, WriteStats,
};
use crate::format::pack::ChunkPlace;
use crate::format::process::ProcessAttrs;

/// A metadata file's value, decoded with the layout of its version.
pub trait MetaFile: Serialize + DeserializeOwned {
    /// Decodes a payload written with format `version` (same major, minor
    /// not newer than this build's: the header check comes first).
    fn decode_version(version: FormatVersion, payload: &[u8]) -> Result<Self, CodecError> {
        let _ = version;
        codec::decode(payload)
    }
}

impl MetaFile for Manifest {
    fn decode_version(version: FormatVersion, payload: &[u8]) -> Result<Self, CodecError> {
        match (version.major, version.minor) {
            (1, 0) => Ok(codec::decode::<ManifestOf<RankRecordV1_0>>(payload)?.into()),
            (1, _) => Ok(codec::decode::<ManifestOf<RankRecordV1_1>>(payload)?.into()),
            (2, 0..=3) => {
                Ok(codec::decode::<ManifestOf<RankRecordV2_3<RegionRecord>>>(payload)?.into())
            }
            (2, 4) => Ok(codec::decode::<ManifestOf<RankRecordV2_4>>(payload)?.into()),
            (2, 5..=6) => Ok(codec::decode::<ManifestOf<RankRecordV2_6>>(payload)?.into()),
            _ => codec::decode(payload),
        }
    }
}

impl MetaFile for RankRecord {
    fn decode_version(version: FormatVersion, payload: &[u8]) -> Result<Self, CodecError> {
        match (version.major, version.minor) {
            (1, 0) => Ok(codec::decode::<RankRecordV1_0>(payload)?.into()),
            (1, _) => Ok(codec::decode::<RankRecordV1_1>(payload)?.into()),
            (2, 0..=3) => Ok(codec::decode::<RankRecordV2_3<RegionRecord>>(payload)?.into()),
            (2, 4) => Ok(codec::decode::<RankRecordV2_4>(payload)?.into()),
            (2, 5..=6) => Ok(codec::decode::<RankRecordV2_6>(payload)?.into()),
            _ => codec::decode(payload),
        }
    }
}

impl MetaFile for crate::format::manifest::ChunkIndex {}

#[derive(Deserialize)]
struct ChunkRefV1 {
    offset: u64,
    len: u32,
    stored_len: u32,
    hash: ChunkHash,
}

#[derive(Deserialize)]
struct RegionRecordV1 {
    name: String,
    addr: u64,
    len: u64,
    kind: RegionKind,
    chunks: Vec<ChunkRefV1>,
}

impl From<RegionRecordV1> for RegionRecord {
    fn from(old: RegionRecordV1) -> RegionRecord {
        RegionRecord {
            name: old.name,
            addr: old.addr,
            len: old.len,
            kind: old.kind,
            chunks: old
                .chunks
                .into_iter()
                .map(|chunk| ChunkRef {
                    offset: chunk.offset,
                    len: chunk.len,
                    stored_len: chunk.stored_len,
                    hash: chunk.hash,
                    place: ChunkPlace::Loose,
                })
                .collect(),
        }
    }
}

/// A rank record of 1.1 to 2.3, before the working directory; its
/// regions are [`RegionRecordV1`] in 1.1, [`RegionRecord`] from 2.0.
#[derive(Deserialize)]
struct RankRecordV2_3<Region> {
    rank: u32,
    node: String,
    pid: u32,
    fds: Vec<FdRecord>,
    mappings: Vec<MappingRecord>,
    regions: Vec<Region>,
    stats: WriteStats,
    warnings: Vec<String>,
}

type RankRecordV1_1 = RankRecordV2_3<RegionRecordV1>;

impl<Region: Into<RegionRecord>> From<RankRecordV2_3<Region>> for RankRecord {
    fn from(old: RankRecordV2_3<Region>) -> RankRecord {
        RankRecord {
            rank: old.rank,
            node: old.node,
            pid: old.pid,
            fds: old.fds,
            mappings: old.mappings,
            regions: old.regions.into_iter().map(Into::into).collect(),
            stats: old.stats,
            warnings: old.warnings,
            cwd: String::new(),
            process: ProcessAttrs::default(),
        }
    }
}

/// A rank record of 2.4, before its process attributes: 2.3's fields, then
/// the working directory (bincode lays a nested struct's fields out in
/// line, as if they were this one's).
#[derive(Deserialize)]
struct RankRecordV2_4 {
    before: RankRecordV2_3<RegionRecord>,
    cwd: String,
}

impl From<RankRecordV2_4> for RankRecord {
    fn from(old: RankRecordV2_4) -> RankRecord {
        RankRecord {
            cwd: old.cwd,
            ..old.before.into()
        }
    }
}

/// A rank record of 2.5 and 2.6: 2.4's fields, then the process
/// attributes before the file tails.
#[derive(Deserialize)]
struct RankRecordV2_6 {
    before: RankRecordV2_4,
    umask: Option<u32>,
    machine: String,
    saved_files: Vec<crate::format::process::SavedFile>,
    node_dirs: Vec<crate::format::process::NodeDir>,
}

impl From<RankRecordV2_6> for RankRecord {
    fn from(old: RankRecordV2_6) -> RankRecord {
        RankRecord {
            process: ProcessAttrs {
                umask: old.umask,
                machine: old.machine,
                saved_files: old.saved_files,
                node_dirs: old.node_dirs,
                tails: Vec::new(),
            },
            ..old.before.into()
        }
    }
}

/// A manifest of 1.0 to 2.6: its layout changed only in its rank records.
#[derive(Deserialize)]
struct ManifestOf<R> {
    job: String,
    epoch: u64,
    created_unix_ms: u64,
    world_size: u32,
    chunk_size: u32,
    ranks: Vec<R>,
}

impl<R: Into<RankRecord>> From<ManifestOf<R>> for Manifest {
    fn from(old: ManifestOf<R>) -> Manifest {
        Manifest {
            job: old.job,
            epoch: old.epoch,
            created_unix_ms: old.created_unix_ms,
            world_size: old.world_size,
            chunk_size: old.chunk_size,
            ranks: old.ranks.into_iter().map(Into::into).collect(),
        }
    }
}

#[derive(Deserialize)]
struct FdRecordV1_0 {
    fd: i32,
    kind: FdKind,
    path: String,
    flags: i32,
    offset: u64,
    size_at_checkpoint: u64,
    restore: FdRestore,
}

#[derive(Deserialize)]
struct RankRecordV1_0 {
    rank: u32,
    node: String,
    pid: u32,
    fds: Vec<FdRecordV1_0>,
    mappings: Vec<MappingRecord>,
    regions: Vec<RegionRecordV1>,
    stats: WriteStats,
}

impl From<FdRecordV1_0> for FdRecord {
    fn from(old: FdRecordV1_0) -> FdRecord {
        FdRecord {
            fd: old.fd,
            kind: old.kind,
            path: old.path,
            flags: old.flags,
            offset: old.offset,
            size_at_checkpoint: old.size_at_checkpoint,
            restore: old.restore,
            // 1.0 opened every fd on its own.
            shares_with: None,
        }
    }
}

impl From<RankRecordV1_0> for RankRecord {
    fn from(old: RankRecordV1_0) -> RankRecord {
        RankRecord {
            rank: old.rank,
            node: old.node,
            pid: old.pid,
            fds: old.fds.into_iter().map(FdRecord::from).collect(),
            mappings: old.mappings,
            regions: old.regions.into_iter().map(RegionRecord::from).collect(),
            stats: old.stats,
            warnings: Vec::new(),
            cwd: String::new(),
            process: ProcessAttrs::default(),
        }
    }
}
