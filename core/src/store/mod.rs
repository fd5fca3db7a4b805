//! The checkpoint store on a shared directory.
//!
//! ```text
//! STORE/
//!   <job>/                          one directory per job (validated name)
//!     lock                          flock: shared while an epoch is written,
//!                                   exclusive while GC sweeps chunks
//!     epochs/<epoch:020>.manifest   committed manifests, one per epoch
//!     pending/<epoch:020>/          an epoch being written
//!       rank-<rank:06>.part         one rank's part, durable before commit
//!     chunks/<hh>/<hash>            content-addressed chunks, hh = first
//!                                   two hex digits of the BLAKE3 hash
//! ```
//!
//! Chunks are shared by every rank and epoch of the job: a chunk that already
//! exists is not written again, so every checkpoint after the first only
//! writes what changed. An epoch exists only once its manifest is published
//! with `link(2)`, which happens after every chunk and rank part is durable;
//! a crash at any earlier point leaves the previous committed epoch as it
//! was. Files starting with `.tmp-` are unpublished temp files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use thiserror::Error;

use self::durable::{
    create_dir_all, read_capped, sync_dir, IoStep, IoStepError, Published, ReadCappedError,
    FILE_MODE,
};
use crate::format::chunk::ChunkHash;
use crate::format::codec::{self, CodecError};
use crate::format::header::{CodecId, FileKind, Header, HeaderError, HEADER_LEN};
use crate::format::legacy::MetaFile;
use crate::format::limits::MAX_ENCODED_LEN;
use crate::format::manifest::{Manifest, ManifestError, RankRecord};
use crate::names::{check_job_name, NameError};

pub mod durable;
pub mod gc;
pub mod reader;
pub mod writer;

/// A checkpoint store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The part of a store that belongs to one job.
#[derive(Debug, Clone)]
pub struct JobStore {
    dir: PathBuf,
    name: String,
}

/// The store could not be opened or listed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store directory does not exist.
    #[error("store {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The path is not a directory.
    #[error("store {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A bad job name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The job has no directory in the store.
    #[error("job {job:?} has no checkpoints in {}", store.display())]
    UnknownJob {
        /// The job.
        job: String,
        /// The store.
        store: PathBuf,
    },
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

/// A metadata file (manifest or rank part) could not be loaded.
#[derive(Debug, Error)]
#[error("{kind} {}: {problem}", path.display())]
pub struct LoadError {
    /// What the file should have been.
    pub kind: FileKind,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: LoadProblem,
}

/// What is wrong with a metadata file.
#[derive(Debug, Error)]
pub enum LoadProblem {
    /// It is missing or unreadable.
    #[error(transparent)]
    Read(#[from] ReadCappedError),
    /// Its header is bad.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Its length disagrees with the header.
    #[error("truncated or extended: file holds {actual} payload bytes, header says {declared}")]
    Length {
        /// From the header.
        declared: u64,
        /// Present.
        actual: u64,
    },
    /// The payload checksum does not match.
    #[error("payload checksum mismatch (file corrupt)")]
    Checksum,
    /// The payload does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// It decodes but is inconsistent.
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

/// Encodes a metadata value into a complete file image.
pub fn encode_meta_file<T: Serialize>(kind: FileKind, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = codec::encode(value)?;
    let header = Header::new(
        kind,
        CodecId::Bincode2FixintLe,
        0,
        &payload,
        payload.len() as u64,
    );
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(&header.encode());
    file.extend_from_slice(&payload);
    Ok(file)
}

/// Decodes a metadata file image of `kind`.
pub fn decode_meta_file<T: MetaFile>(kind: FileKind, bytes: &[u8]) -> Result<T, LoadProblem> {
    let header = Header::decode(bytes, kind)?;
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if actual != header.payload_len {
        return Err(LoadProblem::Length {
            declared: header.payload_len,
            actual,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if !header.payload_matches(payload) {
        return Err(LoadProblem::Checksum);
    }
    Ok(T::decode_version(header.version, payload)?)
}

fn load_meta_file<T: MetaFile>(kind: FileKind, path: &Path) -> Result<T, LoadError> {
    let wrap = |problem: LoadProblem| LoadError {
        kind,
        path: path.to_owned(),
        problem,
    };
    let bytes = read_capped(path, HEADER_LEN as u64 + MAX_ENCODED_LEN as u64)
        .map_err(|err| wrap(err.into()))?;
    decode_meta_file(kind, &bytes).map_err(wrap)
}

impl Store {
    /// Opens an existing store.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(meta) if meta.is_dir() => Ok(Store { root }),
            Ok(_) => Err(StoreError::NotADirectory(root)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing(root)),
            Err(err) => Err(IoStepError::new("stat store", &root, err).into()),
        }
    }

    /// Opens a store, creating its directory (mode 0700) if needed.
    pub fn create(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        create_dir_all(&root)?;
        Store::open(root)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Job names present in the store, sorted. Entries that are not valid
    /// job names are ignored.
    pub fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let mut jobs = Vec::new();
        for entry in fs::read_dir(&self.root).step("list store", &self.root)? {
            let entry = entry.step("list store", &self.root)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if check_job_name(&name).is_ok() && entry.path().join("epochs").is_dir() {
                jobs.push(name);
            }
        }
        jobs.sort();
        Ok(jobs)
    }

    /// The job's part of the store, which may not exist yet.
    pub fn job(&self, name: &str) -> Result<JobStore, StoreError> {
        check_job_name(name)?;
        Ok(JobStore {
            dir: self.root.join(name),
            name: name.to_owned(),
        })
    }

    /// The job's part of the store, which must already exist.
    pub fn existing_job(&self, name: &str) -> Result<JobStore, StoreError> {
        let job = self.job(name)?;
        if !job.epochs_dir().is_dir() {
            return Err(StoreError::UnknownJob {
                job: name.to_owned(),
                store: self.root.clone(),
            });
        }
        Ok(job)
    }
}

/// An epoch directory or file name did not parse.
fn parse_epoch_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The job's lock, held shared by writers and exclusive by GC.
#[derive(Debug)]
pub struct JobLock {
    _lock: Flock<File>,
}

/// An epoch is being written; GC must wait.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds the lock in a conflicting mode.
    #[error("job {job:?} is busy: an epoch is being written")]
    Busy {
        /// The job.
        job: String,
    },
    /// The lock file could not be opened or locked.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

/// State of an epoch in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochState {
    /// The manifest is published.
    Committed,
    /// Rank parts exist but no manifest: being written, or abandoned.
    Partial {
        /// Rank parts present.
        parts: usize,
    },
}

/// Commit of an epoch failed.
#[derive(Debug, Error)]
pub enum CommitError {
    /// A rank's part is missing.
    #[error("job {job:?} epoch {epoch}: rank {rank} has no durable part")]
    MissingRank {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
    },
    /// A part is unreadable or invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A part says it is another rank.
    #[error("{}: part claims rank {found}", path.display())]
    RankMismatch {
        /// The part.
        path: PathBuf,
        /// Rank inside.
        found: u32,
    },
    /// The assembled manifest is invalid.
    #[error("job {job:?} epoch {epoch}: {source}")]
    Invalid {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
        /// What is wrong.
        source: ManifestError,
    },
    /// The epoch is already committed.
    #[error("job {job:?} epoch {epoch} is already committed")]
    AlreadyCommitted {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
    },
    /// Encoding failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

impl JobStore {
    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of committed manifests.
    pub fn epochs_dir(&self) -> PathBuf {
        self.dir.join("epochs")
    }

    /// Directory of epochs being written.
    pub fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    /// The chunk area.
    pub fn chunks_dir(&self) -> PathBuf {
        self.dir.join("chunks")
    }

    /// Path of a committed manifest.
    pub fn manifest_path(&self, epoch: u64) -> PathBuf {
        self.epochs_dir().join(format!("{epoch:020}.manifest"))
    }

    /// Directory of a pending epoch.
    pub fn pending_epoch_dir(&self, epoch: u64) -> PathBuf {
        self.pending_dir().join(format!("{epoch:020}"))
    }

    /// Path of a rank's part of a pending epoch.
    pub fn part_path(&self, epoch: u64, rank: u32) -> PathBuf {
        self.pending_epoch_dir(epoch)
            .join(format!("rank-{rank:06}.part"))
    }

    /// Path of a chunk.
    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks_dir().join(&hex[..2]).join(hex)
    }

    /// Creates the job's directories (mode 0700) and all 256 chunk fan-out
    /// directories, so that chunk writes never create directories.
    ///
    /// Every call also checks that the job's directories are real, private
    /// directories of this user ([`durable::check_private_dir`]), so that a
    /// directory replaced by a symbolic link or handed to another user is
    /// refused before anything is written through it.
    pub fn ensure_layout(&self) -> Result<(), IoStepError> {
        if self.chunks_dir().join("ff").is_dir() && self.pending_dir().is_dir() {
            return self.check_layout();
        }
        create_dir_all(&self.epochs_dir())?;
        create_dir_all(&self.pending_dir())?;
        for byte in 0..=255u8 {
            create_dir_all(&self.chunks_dir().join(format!("{byte:02x}")))?;
        }
        sync_dir(&self.chunks_dir())?;
        sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        self.check_layout()
    }

    /// Checks the job's directories and the 256 chunk fan-outs (one `lstat`
    /// each).
    pub fn check_layout(&self) -> Result<(), IoStepError> {
        for dir in [
            self.dir.clone(),
            self.epochs_dir(),
            self.pending_dir(),
            self.chunks_dir(),
        ] {
            durable::check_private_dir(&dir)?;
        }
        for byte in 0..=255u8 {
            durable::check_private_dir(&self.chunks_dir().join(format!("{byte:02x}")))?;
        }
        Ok(())
    }

    fn open_lock_file(&self) -> Result<File, IoStepError> {
        let path = self.dir.join("lock");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .step("open lock", &path)
    }

    /// Takes the job lock shared (writers), waiting for a running GC.
    pub fn lock_shared(&self) -> Result<JobLock, IoStepError> {
        let file = self.open_lock_file()?;
        let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, errno)| {
            IoStepError::new("flock shared", self.dir.join("lock"), errno.into())
        })?;
        Ok(JobLock { _lock: lock })
    }

    /// Takes the job lock exclusively without waiting (GC).
    pub fn try_lock_exclusive(&self) -> Result<JobLock, LockError> {
        let file = self.open_lock_file()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(JobLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Busy {
                job: self.name.clone(),
            }),
            Err((_, errno)) => {
                Err(IoStepError::new("flock exclusive", self.dir.join("lock"), errno.into()).into())
            }
        }
    }

    fn list_epoch_entries(&self, dir: &Path, suffix: &str) -> Result<Vec<u64>, IoStepError> {
        let mut epochs = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(epochs),
            Err(err) => return Err(IoStepError::new("list", dir, err)),
        };
        for entry in entries {
            let entry = entry.step("list", dir)?;
            if let Some(epoch) = entry
                .file_name()
                .to_str()
                .and_then(|n| parse_epoch_name(n, suffix))
            {
                epochs.push(epoch);
            }
        }
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// Committed epochs, oldest first.
    pub fn committed_epochs(&self) -> Result<Vec<u64>, IoStepError> {
        self.list_epoch_entries(&self.epochs_dir(), ".manifest")
    }

    /// The newest committed epoch.
    pub fn latest_committed(&self) -> Result<Option<u64>, IoStepError> {
        Ok(self.committed_epochs()?.last().copied())
    }

    /// Epochs with a pending directory and no manifest, with their part counts.
    pub fn partial_epochs(&self) -> Result<Vec<(u64, usize)>, IoStepError> {
        let committed: HashSet<u64> = self.committed_epochs()?.into_iter().collect();
        let mut out = Vec::new();
        for epoch in self.list_epoch_entries(&self.pending_dir(), "")? {
            if committed.contains(&epoch) {
                continue;
            }
            let dir = self.pending_epoch_dir(epoch);
            let parts = fs::read_dir(&dir)
                .step("list", &dir)?
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .count();
            out.push((epoch, parts));
        }
        Ok(out)
    }

    /// Every epoch and its state, oldest first.
    pub fn epochs(&self) -> Result<BTreeMap<u64, EpochState>, IoStepError> {
        let mut all: BTreeMap<u64, EpochState> = self
            .committed_epochs()?
            .into_iter()
            .map(|epoch| (epoch, EpochState::Committed))
            .collect();
        for (epoch, parts) in self.partial_epochs()? {
            all.insert(epoch, EpochState::Partial { parts });
        }
        Ok(all)
    }

    /// Loads and validates a committed manifest.
    pub fn load_manifest(&self, epoch: u64) -> Result<Manifest, LoadError> {
        let path = self.manifest_path(epoch);
        let manifest: Manifest = load_meta_file(FileKind::Manifest, &path)?;
        manifest
            .validate(&self.name, epoch)
            .map_err(|err| LoadError {
                kind: FileKind::Manifest,
                path,
                problem: err.into(),
            })?;
        Ok(manifest)
    }

    /// Loads a rank's part of a pending epoch (unvalidated shape).
    pub fn load_part(&self, epoch: u64, rank: u32) -> Result<RankRecord, LoadError> {
        load_meta_file(FileKind::RankPart, &self.part_path(epoch, rank))
    }

    /// Durably writes a rank's part of a pending epoch, replacing an earlier
    /// attempt. The caller has made the part's chunks durable first.
    pub fn write_part(&self, epoch: u64, record: &RankRecord) -> Result<(), CommitError> {
        let dir = self.pending_epoch_dir(epoch);
        create_dir_all(&dir)?;
        let file = encode_meta_file(FileKind::RankPart, record)?;
        durable::write_replace(&self.part_path(epoch, record.rank), &[&file])?;
        sync_dir(&dir)?;
        sync_dir(&self.pending_dir())?;
        Ok(())
    }

    /// Assembles the parts of ranks `0..world_size` into a manifest and
    /// publishes it. This is the commit point of the epoch. Holds the job
    /// lock shared so GC cannot sweep the epoch's chunks meanwhile.
    pub fn commit_epoch(
        &self,
        epoch: u64,
        world_size: u32,
        chunk_size: u32,
    ) -> Result<Manifest, CommitError> {
        let _lock = self.lock_shared()?;
        if self.manifest_path(epoch).exists() {
            return Err(CommitError::AlreadyCommitted {
                job: self.name.clone(),
                epoch,
            });
        }
        let mut ranks = Vec::with_capacity(world_size as usize);
        for rank in 0..world_size {
            let path = self.part_path(epoch, rank);
            if !path.exists() {
                return Err(CommitError::MissingRank {
                    job: self.name.clone(),
                    epoch,
                    rank,
                });
            }
            let record = self.load_part(epoch, rank)?;
            if record.rank != rank {
                return Err(CommitError::RankMismatch {
                    path,
                    found: record.rank,
                });
            }
            ranks.push(record);
        }
        let manifest = Manifest {
            job: self.name.clone(),
            epoch,
            created_unix_ms: now_unix_ms(),
            world_size,
            chunk_size,
            ranks,
        };
        manifest
            .validate(&self.name, epoch)
            .map_err(|source| CommitError::Invalid {
                job: self.name.clone(),
                epoch,
                source,
            })?;
        let file = encode_meta_file(FileKind::Manifest, &manifest)?;
        create_dir_all(&self.epochs_dir())?;
        match durable::write_new(&self.manifest_path(epoch), &[&file])? {
            Published::Created => {}
            Published::AlreadyExists => {
                return Err(CommitError::AlreadyCommitted {
                    job: self.name.clone(),
                    epoch,
                })
            }
        }
        tracing::info!(job = %self.name, epoch, ranks = world_size, "epoch.committed");
        // The pending parts are now redundant; losing this cleanup to a crash
        // only leaves a directory that GC removes.
        let _ = self.discard_pending(epoch);
        Ok(manifest)
    }

    /// Removes a pending epoch's parts (after commit, or to abort it).
    pub fn discard_pending(&self, epoch: u64) -> Result<(), IoStepError> {
        let dir = self.pending_epoch_dir(epoch);
        match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.pending_dir()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(IoStepError::new("remove pending epoch", dir, err)),
        }
    }

    /// Per-epoch sizes for listing; reads the manifest.
    pub fn summarize(&self, epoch: u64) -> Result<EpochSummary, LoadError> {
        let manifest = self.load_manifest(epoch)?;
        Ok(EpochSummary::of(&manifest))
    }
}

pub use gc::{GcError, GcReport};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sizes of one committed epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: u64,
    /// Commit time.
    pub created_unix_ms: u64,
    /// Ranks.
    pub ranks: u32,
    /// Logical bytes of all regions of all ranks.
    pub logical_bytes: u64,
    /// Raw bytes of the distinct chunks referenced.
    pub unique_raw_bytes: u64,
    /// Stored bytes of the distinct chunks referenced.
    pub unique_stored_bytes: u64,
    /// Stored bytes newly written by this epoch.
    pub new_stored_bytes: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
}

impl EpochSummary {
    /// Computes the summary of a manifest.
    pub fn of(manifest: &Manifest) -> EpochSummary {
        let mut unique: HashMap<ChunkHash, (u64, u64)> = HashMap::new();
        let mut logical = 0u64;
        for (_, _, chunk) in manifest.chunk_refs() {
            logical += u64::from(chunk.len);
            unique
                .entry(chunk.hash)
                .or_insert((u64::from(chunk.len), u64::from(chunk.stored_len)));
        }
        let stats = manifest.stats();
        EpochSummary {
            epoch: manifest.epoch,
            created_unix_ms: manifest.created_unix_ms,
            ranks: manifest.world_size,
            logical_bytes: logical,
            unique_raw_bytes: unique.values().map(|v| v.0).sum(),
            unique_stored_bytes: unique.values().map(|v| v.1).sum(),
            new_stored_bytes: stats.new_stored_bytes,
            unique_chunks: unique.len() as u64,
        }
    }

    /// Raw over stored bytes of the distinct chunks.
    pub fn compression_ratio(&self) -> f64 {
        if self.unique_stored_bytes == 0 {
            return 1.0;
        }
        self.unique_raw_bytes as f64 / self.unique_stored_bytes as f64
    }

    /// Fraction of logical bytes saved by deduplication within the epoch.
    pub fn dedup_savings(&self) -> f64 {
        if self.logical_bytes == 0 {
            return 0.0;
        }
        1.0 - self.unique_raw_bytes as f64 / self.logical_bytes as f64
    }
}
