//! What a checkpoint records: the epoch manifest and each rank's part.
//!
//! A manifest is small metadata; the bulk data lives in chunks it names by
//! hash. Every value read from disk goes through [`Manifest::validate`] or
//! [`RankRecord::validate`] before use, so a hostile file cannot smuggle in
//! duplicate ranks, overlapping chunks or paths with `..`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::chunk::ChunkHash;
use crate::format::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::format::pack::ChunkPlace;
pub use crate::format::paths::{is_clean_absolute_path, is_working_directory};
use crate::format::process::{AttrsError, ProcessAttrs};
use crate::names::{check_job_name, check_region_name, NameError};

/// Kind of an open file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A pipe or FIFO.
    Pipe,
    /// A socket.
    Socket,
    /// A character device (terminals, `/dev/null`).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// An anonymous inode (eventfd, epoll, memfd…).
    AnonInode,
    /// A file deleted while open.
    Deleted,
    /// Anything else.
    Other,
}

/// Whether an fd is brought back on restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdRestore {
    /// Re-opened at the same number, flags and offset.
    Restore,
    /// Not restored, and why: something the application opened that a
    /// restart cannot give back (a warning at checkpoint time).
    NotRestored(String),
    /// Not restored because it is not the application's to restore: the
    /// cryo runtime's own fds, and what the MPI library or the launcher
    /// opened before `cryo_init` (format 1.1). No warning.
    NotOurs(String),
    /// An unlinked file opened again (through `/proc/self/fd`, say) apart
    /// from the fd whose saved contents a restart recreates it from, this
    /// fd's number: opened again through that fd once it is back, with its
    /// own flags and offset, so both reach one file again (format 2.6).
    ReopenOf(i32),
}

/// One open file descriptor of a rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRecord {
    /// The descriptor number.
    pub fd: i32,
    /// What it refers to.
    pub kind: FdKind,
    /// Path (for files) or the `/proc/<pid>/fd` link text.
    pub path: String,
    /// `open(2)` flags from fdinfo.
    pub flags: i32,
    /// File offset from fdinfo.
    pub offset: u64,
    /// The file's size at checkpoint (regular files).
    pub size_at_checkpoint: u64,
    /// Restore decision.
    pub restore: FdRestore,
    /// The lower fd whose open file description this fd shares (it was
    /// made by `dup`, `dup2`, `fcntl(F_DUPFD)` or inherited so): restored
    /// with `dup2` from that fd, so both share one offset and status
    /// flags again (format 1.1; `kcmp(KCMP_FILE)` at capture).
    pub shares_with: Option<i32>,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// Anonymous memory.
    Anonymous,
    /// A file, from this offset.
    File {
        /// Absolute path of the file.
        path: String,
        /// Offset into the file.
        offset: u64,
    },
}

/// One memory mapping of a rank, as seen in `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRecord {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_SHARED` or `MAP_PRIVATE`.
    pub shared: bool,
    /// What backs it.
    pub backing: Backing,
    /// The cryo region this mapping belongs to, if any.
    pub region: Option<String>,
}

/// How a region's memory is provided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionKind {
    /// Anonymous memory mapped by cryo; contents saved.
    Anonymous,
    /// A shared file mapping; the file holds the contents, which are also
    /// saved so a lost file can be detected.
    FileShared {
        /// Absolute path of the backing file.
        path: String,
        /// Offset into the file.
        offset: u64,
    },
    /// A private file mapping; contents saved (they may differ from the file).
    FilePrivate {
        /// Absolute path of the backing file.
        path: String,
        /// Offset into the file.
        offset: u64,
    },
    /// A buffer owned by the application, registered with `protect`.
    Protected,
    /// The contents of a regular file that was open at `fd` but had no
    /// path left (unlinked while open); recreated as an unlinked file at
    /// restart (format 1.1). Named `cryo:fd:<fd>`.
    UnlinkedFile {
        /// The fd that held the file.
        fd: i32,
    },
    /// A file mapping the application made itself after `cryo_init`
    /// (a plain `mmap`), re-established at the same address at restart
    /// (format 1.1). Named `cryo:map:<start>`.
    AppMapping {
        /// Absolute path of the mapped file.
        path: String,
        /// Offset into the file.
        offset: u64,
        /// `MAP_SHARED` rather than `MAP_PRIVATE`.
        shared: bool,
        /// `PROT_*` bits.
        prot: u32,
        /// Length of the mapping; the region holds its first `len` bytes
        /// (those within the file).
        map_len: u64,
    },
    /// The contents of a regular file open at `fd` for writing in place
    /// (not `O_APPEND`), written back at restart so that bytes overwritten
    /// after the checkpoint are undone (format 1.1). Named `cryo:file:<fd>`.
    FileContents {
        /// The fd (the lowest the file was open for writing through).
        fd: i32,
    },
    /// The table of files the rank wrote and closed before the checkpoint
    /// (`crate::format::closed`), whose growth since a restart cuts back
    /// (format 2.2). Named `cryo:closed-files`.
    ClosedFiles,
    /// The whole contents of a file on a filesystem of the rank's node (a
    /// restart on another node would not find it) that no fd of the rank
    /// saves: one it wrote and closed before the checkpoint (named
    /// `cryo:closed:<n>`), or one it maps (`cryo:mapped-file:<n>`). Made
    /// again where it is missing, before fds and mappings come back
    /// (format 2.3, then named `ClosedFileContents`).
    NodeFileContents {
        /// Absolute path of the file.
        path: String,
    },
    /// What the rank changed of its process after `cryo_init`
    /// (`crate::format::process_state`, format 2.8). Named
    /// `cryo:process-state`.
    ProcessState,
}

/// A reference from a region to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Offset within the region.
    pub offset: u64,
    /// Raw length.
    pub len: u32,
    /// Stored length (header plus payload), for accounting.
    pub stored_len: u32,
    /// Content hash, the chunk's name.
    pub hash: ChunkHash,
    /// Where it is stored (format 2.0).
    pub place: ChunkPlace,
}

/// One named region of a rank and the chunks that hold its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// Region name, unique within the rank.
    pub name: String,
    /// Virtual address in the rank.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// How the memory is provided.
    pub kind: RegionKind,
    /// Chunks in offset order, covering `0..len` exactly.
    pub chunks: Vec<ChunkRef>,
}

/// Byte counts for one rank's or one epoch's write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteStats {
    /// Raw bytes presented for storage.
    pub raw_bytes: u64,
    /// Chunks presented.
    pub chunks: u64,
    /// Chunks that were new and written.
    pub new_chunks: u64,
    /// Stored bytes written for new chunks.
    pub new_stored_bytes: u64,
    /// Raw bytes of new chunks.
    pub new_raw_bytes: u64,
}

impl WriteStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &WriteStats) {
        self.raw_bytes += other.raw_bytes;
        self.chunks += other.chunks;
        self.new_chunks += other.new_chunks;
        self.new_stored_bytes += other.new_stored_bytes;
        self.new_raw_bytes += other.new_raw_bytes;
    }
}

/// Everything saved about one rank at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// MPI rank.
    pub rank: u32,
    /// Node the rank ran on.
    pub node: String,
    /// Its pid there.
    pub pid: u32,
    /// Open file descriptors.
    pub fds: Vec<FdRecord>,
    /// Memory mappings.
    pub mappings: Vec<MappingRecord>,
    /// Saved regions.
    pub regions: Vec<RegionRecord>,
    /// What writing this rank cost.
    pub stats: WriteStats,
    /// What this rank held that a restart will not give back, beyond the
    /// fds marked [`FdRestore::NotRestored`]: a held file lock, a mapping
    /// that cannot be re-established (format 1.1).
    pub warnings: Vec<String>,
    /// The rank's working directory, which a restart returns it to; empty
    /// when unknown (written before format 2.4, or deleted then).
    pub cwd: String,
    /// Its umask and the modes of the files it saved (format 2.5).
    pub process: ProcessAttrs,
}

/// The committed record of one epoch of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Job name.
    pub job: String,
    /// Epoch number, increasing per job.
    pub epoch: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Number of ranks (MPI world size).
    pub world_size: u32,
    /// Chunk size used for this epoch.
    pub chunk_size: u32,
    /// Ranks `0..world_size`, in order.
    pub ranks: Vec<RankRecord>,
}

/// The job's chunk index as of one committed epoch: every chunk the
/// epochs committed so far stored in packs and where it is (format 2).
/// Agents read it to skip chunks the store has; a reader falls back on it
/// when a repack moved a chunk. It is a cache: losing it costs a chunk
/// written twice or a slower lookup, never data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIndex {
    /// Job name.
    pub job: String,
    /// The epoch it was written for.
    pub epoch: u64,
    /// The chunks, in no particular order.
    pub chunks: Vec<IndexedChunk>,
}

/// One chunk of a [`ChunkIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedChunk {
    /// The chunk.
    pub hash: ChunkHash,
    /// Its stored length.
    pub stored_len: u32,
    /// Where it is.
    pub place: ChunkPlace,
}

/// A manifest or rank record is inconsistent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// A bad job or region name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The manifest's job is not the one asked for.
    #[error("manifest belongs to job {found:?}, expected {expected:?}")]
    WrongJob {
        /// Expected job.
        expected: String,
        /// Job in the file.
        found: String,
    },
    /// The epoch inside disagrees with the file name.
    #[error("manifest says epoch {found}, its file name says {expected}")]
    WrongEpoch {
        /// From the file name.
        expected: u64,
        /// From the content.
        found: u64,
    },
    /// Rank list does not match the world size.
    #[error("manifest has {found} ranks, world size is {world_size}")]
    RankCount {
        /// Declared world size.
        world_size: u32,
        /// Ranks present.
        found: usize,
    },
    /// A rank appears out of order, twice, or out of range.
    #[error("rank entry {index} is rank {rank}, expected {index}")]
    RankOrder {
        /// Position in the list.
        index: usize,
        /// Rank found there.
        rank: u32,
    },
    /// A zero world size.
    #[error("world size is zero")]
    EmptyWorld,
    /// A bad chunk size.
    #[error("chunk size {0} is outside {min}..={max}", min = MIN_CHUNK_SIZE, max = MAX_CHUNK_SIZE)]
    ChunkSize(u32),
    /// A region name appears twice in a rank.
    #[error("rank {rank}: region {name:?} appears twice")]
    DuplicateRegion {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
    },
    /// Chunks do not tile the region.
    #[error("rank {rank} region {name:?}: {problem}")]
    ChunkLayout {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A process attribute out of range.
    #[error("rank {rank}: {source}")]
    Attrs {
        /// The rank.
        rank: u32,
        /// What is wrong.
        source: AttrsError,
    },
    /// A path that is not absolute and normal.
    #[error("rank {rank}: path {path:?} is not an absolute path without `..`")]
    BadPath {
        /// The rank.
        rank: u32,
        /// The path.
        path: String,
    },
    /// An fd number appears twice.
    #[error("rank {rank}: fd {fd} appears twice")]
    DuplicateFd {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
    },
    /// An fd shares its open file with an fd that is not a lower fd of
    /// the same rank, or an unlinked file's saved contents are missing.
    #[error("rank {rank}: fd {fd}: {problem}")]
    FdLink {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// What is wrong.
        problem: String,
    },
    /// A mapping with `end <= start`.
    #[error("rank {rank}: mapping {start:#x}-{end:#x} is empty or inverted")]
    BadMapping {
        /// The rank.
        rank: u32,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
}

/// Checks `shares_with` and unlinked-file links of one rank's fds.
fn check_fd_links(
    rank: u32,
    fds: &[FdRecord],
    regions: &[RegionRecord],
) -> Result<(), ManifestError> {
    let by_fd: HashMap<i32, &FdRecord> = fds.iter().map(|fd| (fd.fd, fd)).collect();
    let bad = |fd: i32, problem: String| ManifestError::FdLink { rank, fd, problem };
    for fd in fds {
        if let Some(leader) = fd.shares_with {
            let Some(target) = by_fd.get(&leader) else {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which is not recorded"),
                ));
            };
            if leader >= fd.fd {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which is not lower"),
                ));
            }
            if target.shares_with.is_some() {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which itself shares another's"),
                ));
            }
        }
        if let FdRestore::ReopenOf(of) = fd.restore {
            let restored_unlinked = by_fd.get(&of).is_some_and(|other| {
                (other.kind, &other.restore, other.shares_with)
                    == (FdKind::Deleted, &FdRestore::Restore, None)
            });
            if fd.kind != FdKind::Deleted || fd.shares_with.is_some() || !restored_unlinked {
                return Err(bad(
                    fd.fd,
                    format!("opened again through fd {of}, which is not an unlinked file restored"),
                ));
            }
        }
        if fd.kind == FdKind::Deleted
            && fd.restore == FdRestore::Restore
            && fd.shares_with.is_none()
        {
            let has_contents = regions.iter().any(|region| {
                matches!(region.kind, RegionKind::UnlinkedFile { fd: owner } if owner == fd.fd)
            });
            if !has_contents {
                return Err(bad(
                    fd.fd,
                    "an unlinked file to restore without saved contents".into(),
                ));
            }
        }
    }
    Ok(())
}

impl RankRecord {
    /// A record of `rank`, run as `pid` on `node`, that holds nothing yet.
    pub fn new(rank: u32, node: impl Into<String>, pid: u32) -> RankRecord {
        RankRecord {
            rank,
            node: node.into(),
            pid,
            fds: Vec::new(),
            mappings: Vec::new(),
            regions: Vec::new(),
            stats: WriteStats::default(),
            warnings: Vec::new(),
            cwd: String::new(),
            process: ProcessAttrs::default(),
        }
    }

    /// Checks internal consistency: names, chunk tiling, paths.
    pub fn validate(&self, chunk_size: u32) -> Result<(), ManifestError> {
        let rank = self.rank;
        let mut names = HashSet::new();
        for region in &self.regions {
            check_region_name(&region.name)?;
            if !names.insert(region.name.as_str()) {
                return Err(ManifestError::DuplicateRegion {
                    rank,
                    name: region.name.clone(),
                });
            }
            let layout = |problem: String| ManifestError::ChunkLayout {
                rank,
                name: region.name.clone(),
                problem,
            };
            let mut next = 0u64;
            for chunk in &region.chunks {
                if chunk.offset != next {
                    return Err(layout(format!(
                        "chunk at offset {} where {} was expected",
                        chunk.offset, next
                    )));
                }
                if chunk.len == 0 || chunk.len > chunk_size {
                    return Err(layout(format!(
                        "chunk length {} outside 1..={chunk_size}",
                        chunk.len
                    )));
                }
                next = next
                    .checked_add(u64::from(chunk.len))
                    .ok_or_else(|| layout("chunk offsets overflow".into()))?;
            }
            if next != region.len {
                return Err(layout(format!(
                    "chunks cover {next} bytes, region is {} bytes",
                    region.len
                )));
            }
            region
                .addr
                .checked_add(region.len)
                .ok_or_else(|| layout("address range overflows".into()))?;
            if let RegionKind::AppMapping { map_len, .. } = &region.kind {
                if region.len > *map_len {
                    return Err(layout(format!(
                        "saved {} bytes of a {map_len}-byte mapping",
                        region.len
                    )));
                }
            }
            match &region.kind {
                RegionKind::FileShared { path, .. }
                | RegionKind::FilePrivate { path, .. }
                | RegionKind::AppMapping { path, .. }
                | RegionKind::NodeFileContents { path }
                    if !is_clean_absolute_path(path) =>
                {
                    return Err(ManifestError::BadPath {
                        rank,
                        path: path.clone(),
                    });
                }
                _ => {}
            }
        }
        // A restart changes into it (empty: not recorded).
        if !(self.cwd.is_empty() || is_working_directory(&self.cwd)) {
            return Err(ManifestError::BadPath {
                rank,
                path: self.cwd.clone(),
            });
        }
        self.process
            .check()
            .map_err(|source| ManifestError::Attrs { rank, source })?;
        if let Some(path) = self.process.paths().find(|p| !is_clean_absolute_path(p)) {
            return Err(ManifestError::BadPath {
                rank,
                path: path.to_owned(),
            });
        }
        let mut fds = HashSet::new();
        for fd in &self.fds {
            if !fds.insert(fd.fd) {
                return Err(ManifestError::DuplicateFd { rank, fd: fd.fd });
            }
            if fd.restore == FdRestore::Restore
                && fd.shares_with.is_none()
                && !is_clean_absolute_path(&fd.path)
            {
                return Err(ManifestError::BadPath {
                    rank,
                    path: fd.path.clone(),
                });
            }
        }
        check_fd_links(rank, &self.fds, &self.regions)?;
        for mapping in &self.mappings {
            if mapping.end <= mapping.start {
                return Err(ManifestError::BadMapping {
                    rank,
                    start: mapping.start,
                    end: mapping.end,
                });
            }
        }
        Ok(())
    }

    /// Raw bytes across all regions.
    pub fn region_bytes(&self) -> u64 {
        self.regions.iter().map(|region| region.len).sum()
    }
}

impl Manifest {
    /// Checks the manifest against the job and epoch it was loaded for.
    pub fn validate(&self, job: &str, epoch: u64) -> Result<(), ManifestError> {
        check_job_name(&self.job)?;
        if self.job != job {
            return Err(ManifestError::WrongJob {
                expected: job.to_owned(),
                found: self.job.clone(),
            });
        }
        if self.epoch != epoch {
            return Err(ManifestError::WrongEpoch {
                expected: epoch,
                found: self.epoch,
            });
        }
        self.validate_shape()
    }

    /// Checks rank list, chunk size and every rank.
    pub fn validate_shape(&self) -> Result<(), ManifestError> {
        if self.world_size == 0 {
            return Err(ManifestError::EmptyWorld);
        }
        let chunk_size = self.chunk_size as usize;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        if self.ranks.len() != self.world_size as usize {
            return Err(ManifestError::RankCount {
                world_size: self.world_size,
                found: self.ranks.len(),
            });
        }
        for (index, rank) in self.ranks.iter().enumerate() {
            if rank.rank as usize != index {
                return Err(ManifestError::RankOrder {
                    index,
                    rank: rank.rank,
                });
            }
            rank.validate(self.chunk_size)?;
        }
        Ok(())
    }

    /// Write statistics summed over ranks.
    pub fn stats(&self) -> WriteStats {
        let mut total = WriteStats::default();
        for rank in &self.ranks {
            total.add(&rank.stats);
        }
        total
    }

    /// Iterates over every chunk reference with its rank and region.
    pub fn chunk_refs(&self) -> impl Iterator<Item = (u32, &RegionRecord, &ChunkRef)> {
        self.ranks.iter().flat_map(|rank| {
            rank.regions
                .iter()
                .flat_map(move |region| region.chunks.iter().map(move |c| (rank.rank, region, c)))
        })
    }
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
pub(crate) mod tests;
