//! The checkpoint store on a shared directory.
//!
//! ```text
//! STORE/
//!   <job>/                          one directory per job (validated name)
//!     lock                          flock: shared while an epoch is written,
//!                                   exclusive while GC sweeps chunks
//!     epochs/<epoch:020>.manifest   committed manifests, one per epoch
//!     epochs/<epoch:020>.index      the job's chunk index as of the newest
//!                                   epoch (format 2; a cache)
//!     pending/<epoch:020>/          an epoch being written
//!       rank-<rank:06>.part         one rank's part, durable before commit
//!     packs/<hh>/<id>.pack          format 2: content-addressed chunks
//!                                   appended to packs, a few per agent and
//!                                   epoch (hh = first two hex digits of id)
//!     chunks/<hh>/<hash>            format 1: one file per chunk (read, and
//!                                   collected, but no longer written)
//! ```
//!
//! Chunks are shared by every rank and epoch of the job: a chunk the
//! previous epoch or a sibling rank stored is not written again, so every
//! checkpoint after the first only writes what changed. An epoch exists only
//! once its manifest is published with `link(2)`, which happens after every
//! chunk and rank part is durable; a crash at any earlier point leaves the
//! previous committed epoch as it was. Files starting with `.tmp-` are
//! unpublished temp files.
//!
//! Every file operation goes through the store's [`StoreFs`]: the real
//! filesystem for [`Store::open`] and [`Store::create`], any other (a
//! [`FaultFs`](fault_fs::FaultFs) in tests) for [`Store::open_with_fs`].
//!
//! ```text
//! mod.rs      Store, JobStore: paths, layout checks, the job lock, listing
//! fs.rs       StoreFs, the operations the store performs, and their errors
//! durable.rs  RealFs, and the durable-write protocol over any StoreFs
//! fault_fs.rs FaultFs: fails chosen operations with ENOSPC, EIO…
//! meta.rs     loading manifests and rank parts (capped, checked, decoded)
//! writer.rs   an epoch's chunks in parallel, each rank's part
//! packs.rs    the packs an epoch writer appends chunks to
//! commit.rs   the manifest published: the commit point
//! chunk_index.rs the job's chunk index, written after each commit
//! pack_read.rs a chunk read by its place, pack indexes, the job index
//! reader.rs   verified restore (large reads, packs in parallel), verify
//! prefetch.rs a rank's chunks read into the cache ahead of its restore
//! gc.rs       retention and GC (loose chunks)
//! repack.rs   GC of packs: delete the dead, repack the mostly dead
//! summary.rs  an epoch's sizes for listing
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use self::durable::RealFs;
use self::fs::{FileStat, IoStep, IoStepError, StoreFs};
use crate::format::chunk::ChunkHash;
use crate::format::pack::PackId;
use crate::names::{check_job_name, NameError};

mod chunk_index;
mod commit;
pub mod durable;
pub mod fault_fs;
#[cfg(test)]
mod fault_tests;
pub mod fs;
pub mod gc;
mod loose;
mod meta;
pub mod pack_read;
mod packs;
pub mod prefetch;
pub mod reader;
mod repack;
mod summary;
#[cfg(test)]
mod test_support;
pub mod writer;

pub use commit::{now_unix_ms, CommitError};
pub use gc::{GcError, GcOptions, GcReport};
pub use meta::{decode_meta_file, encode_meta_file, LoadError, LoadProblem};
pub use summary::EpochSummary;

/// A checkpoint store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    fs: Arc<dyn StoreFs>,
}

/// The part of a store that belongs to one job.
#[derive(Debug, Clone)]
pub struct JobStore {
    dir: PathBuf,
    name: String,
    fs: Arc<dyn StoreFs>,
    packs: Arc<pack_read::PackCache>,
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
    #[error(
        "job {job:?} has no checkpoints in {} (`cryo ls {}` lists the jobs it holds)",
        store.display(),
        store.display()
    )]
    UnknownJob {
        /// The job.
        job: String,
        /// The store.
        store: PathBuf,
    },
    /// The job's folder is there but this user may not enter it: another
    /// user's job.
    #[error("job {job:?} in {} is another user's: its folder cannot be entered (permission denied)", store.display())]
    NotYours {
        /// The job.
        job: String,
        /// The store.
        store: PathBuf,
    },
    /// This user may not make a job's folder in the store: another user's
    /// folder, closed to others (the first user's job made it).
    #[error(
        "store {} is another user's (uid {owner}, mode {mode:04o}): this user cannot keep a job \
         in it. A store that several users share must be made by an admin with mode 1777 \
         (`chmod 1777 {}`); or name a store of your own (--store, CRYO_STORE)",
        store.display(),
        store.display()
    )]
    ClosedToUser {
        /// The store.
        store: PathBuf,
        /// Its owner's user id.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

impl Store {
    /// Opens an existing store on the real filesystem.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        Store::open_with_fs(root, Arc::new(RealFs))
    }

    /// Opens a store, creating its directory (mode 0700) if needed, on the
    /// real filesystem.
    pub fn create(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        Store::create_with_fs(root, Arc::new(RealFs))
    }

    /// Opens an existing store whose every file operation goes through `fs`.
    pub fn open_with_fs(
        root: impl Into<PathBuf>,
        fs: Arc<dyn StoreFs>,
    ) -> Result<Store, StoreError> {
        let root = root.into();
        match fs.stat(&root) {
            Ok(stat) if stat.is_dir => Ok(Store { root, fs }),
            Ok(_) => Err(StoreError::NotADirectory(root)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing(root)),
            Err(err) => Err(IoStepError::new("stat store", &root, err).into()),
        }
    }

    /// [`Store::create`] through `fs`.
    pub fn create_with_fs(
        root: impl Into<PathBuf>,
        fs: Arc<dyn StoreFs>,
    ) -> Result<Store, StoreError> {
        let root = root.into();
        // Something else at that path is named as such, not as a failed
        // directory creation.
        if fs.stat(&root).is_ok_and(|stat| !stat.is_dir) {
            return Err(StoreError::NotADirectory(root));
        }
        fs.create_dir_all(&root)?;
        Store::open_with_fs(root, fs)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Job names present in the store, sorted. Entries that are not valid
    /// job names are ignored.
    pub fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let mut jobs = self.named_as_jobs()?;
        jobs.retain(|name| self.fs.is_dir(&self.root.join(name).join("epochs")));
        Ok(jobs)
    }

    /// Folders of the store, named as jobs, that this user cannot look
    /// into (another user's jobs: each job's folder is 0700), which
    /// [`Store::jobs`] cannot list.
    pub fn jobs_closed_to_us(&self) -> Result<Vec<String>, StoreError> {
        let mut closed = self.named_as_jobs()?;
        closed.retain(|name| {
            let dir = self.root.join(name);
            self.fs.is_dir(&dir)
                && (self.fs.stat(&dir.join("epochs")))
                    .is_err_and(|err| err.kind() == std::io::ErrorKind::PermissionDenied)
        });
        Ok(closed)
    }

    /// The store's entries whose names are job names, sorted.
    fn named_as_jobs(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = (self.fs.list_dir(&self.root))
            .step("list store", &self.root)?
            .into_iter()
            .filter_map(|name| name.into_string().ok())
            .filter(|name| check_job_name(name).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The job's part of the store, which may not exist yet.
    pub fn job(&self, name: &str) -> Result<JobStore, StoreError> {
        check_job_name(name)?;
        Ok(JobStore {
            dir: self.root.join(name),
            name: name.to_owned(),
            fs: Arc::clone(&self.fs),
            packs: Arc::default(),
        })
    }

    /// The job's part of the store, its directories made if it has none
    /// ([`JobStore::ensure_layout`]). A store this user may not make the
    /// job's folder in is [`StoreError::ClosedToUser`].
    pub fn prepared_job(&self, name: &str) -> Result<JobStore, StoreError> {
        let job = self.job(name)?;
        match job.ensure_layout() {
            Ok(()) => Ok(job),
            Err(err) if err.source.kind() == io::ErrorKind::PermissionDenied => {
                let closed = (!self.fs.exists(&job.dir))
                    .then(|| self.fs.stat(&self.root).ok())
                    .flatten()
                    .filter(|stat| closed_to(stat, nix::unistd::geteuid().as_raw()));
                Err(match closed {
                    Some(stat) => StoreError::ClosedToUser {
                        store: self.root.clone(),
                        owner: stat.uid,
                        mode: stat.mode,
                    },
                    None => err.into(),
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The job's part of the store, which must already exist.
    pub fn existing_job(&self, name: &str) -> Result<JobStore, StoreError> {
        let job = self.job(name)?;
        match self.fs.stat(&job.epochs_dir()) {
            Ok(stat) if stat.is_dir => Ok(job),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(StoreError::NotYours {
                    job: name.to_owned(),
                    store: self.root.clone(),
                })
            }
            _ => Err(StoreError::UnknownJob {
                job: name.to_owned(),
                store: self.root.clone(),
            }),
        }
    }
}

/// Whether a store directory of `stat` in which user `uid` was denied
/// making a folder is closed to it as another user's (one of its own with
/// a narrowed mode is the user's to mend, and the plain error says so).
fn closed_to(stat: &FileStat, uid: u32) -> bool {
    uid != 0 && stat.uid != uid
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

    /// The format 1 chunk area.
    pub fn chunks_dir(&self) -> PathBuf {
        self.dir.join("chunks")
    }

    /// The pack area.
    pub fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }

    /// Path of a pack.
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        let hex = id.to_hex();
        self.packs_dir().join(&hex[..2]).join(format!("{hex}.pack"))
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

    /// Path of a format 1 chunk file.
    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks_dir().join(&hex[..2]).join(hex)
    }

    /// Creates the job's directories (mode 0700). Pack fan-outs are made
    /// as packs need them ([`Self::ensure_fanout`]): a job writes a few
    /// packs, and 256 directories made up front cost its start about 25 ms
    /// here and a parallel filesystem's metadata server far more.
    ///
    /// Every call also checks that the job's directories are real, private
    /// directories of this user ([`StoreFs::check_private_dir`]), so that a
    /// directory replaced by a symbolic link or handed to another user is
    /// refused before anything is written through it.
    pub fn ensure_layout(&self) -> Result<(), IoStepError> {
        let fs = &*self.fs;
        if fs.is_dir(&self.packs_dir()) && fs.is_dir(&self.pending_dir()) {
            return self.check_layout();
        }
        fs.create_dir_all(&self.epochs_dir())?;
        fs.create_dir_all(&self.pending_dir())?;
        fs.create_dir_all(&self.packs_dir())?;
        fs.sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            fs.sync_dir(parent)?;
        }
        self.check_layout()
    }

    /// Makes sure the fan-out directory that will hold `pack` exists and is
    /// private; a new one is made durable in `packs/` before any pack in it
    /// can be.
    pub(crate) fn ensure_fanout(&self, pack: &Path) -> Result<(), IoStepError> {
        let fs = &*self.fs;
        let Some(fanout) = pack.parent() else {
            return Ok(());
        };
        if !fs.is_dir(fanout) {
            fs.create_dir_all(fanout)?;
            fs.sync_dir(&self.packs_dir())?;
        }
        fs.check_private_dir(fanout)
    }

    /// Checks the job's directories and every fan-out that exists in the
    /// pack area, and in a format 1 chunk area if there is one (one `lstat`
    /// each, after one listing per area).
    pub fn check_layout(&self) -> Result<(), IoStepError> {
        for dir in [self.dir.clone(), self.epochs_dir(), self.pending_dir()] {
            self.fs.check_private_dir(&dir)?;
        }
        let mut areas = Vec::with_capacity(2);
        if self.fs.exists(&self.packs_dir()) {
            areas.push(self.packs_dir());
        }
        if self.fs.exists(&self.chunks_dir()) {
            areas.push(self.chunks_dir());
        }
        for area in areas {
            self.fs.check_private_dir(&area)?;
            let names = self.fs.list_dir(&area).step("list", &area)?;
            for name in names {
                let is_fanout = name.to_str().is_some_and(|n| {
                    n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                });
                if is_fanout {
                    self.fs.check_private_dir(&area.join(name))?;
                }
            }
        }
        Ok(())
    }

    fn open_lock_file(&self) -> Result<File, IoStepError> {
        let path = self.dir.join("lock");
        self.fs.open_lock(&path).step("open lock", &path)
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

    pub(crate) fn list_epoch_entries(
        &self,
        dir: &Path,
        suffix: &str,
    ) -> Result<Vec<u64>, IoStepError> {
        let mut epochs = Vec::new();
        let names = match self.fs.list_dir(dir) {
            Ok(names) => names,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(epochs),
            Err(err) => return Err(IoStepError::new("list", dir, err)),
        };
        for name in names {
            if let Some(epoch) = name.to_str().and_then(|n| parse_epoch_name(n, suffix)) {
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
            let parts = self
                .fs
                .list_dir(&dir)
                .step("list", &dir)?
                .iter()
                .filter(|name| name.to_string_lossy().ends_with(".part"))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_closed_only_when_another_users() {
        let stat = |uid, mode| FileStat {
            is_dir: true,
            len: 0,
            uid,
            mode,
        };
        assert!(closed_to(&stat(1000, 0o700), 1001));
        assert!(closed_to(&stat(0, 0o755), 1001));
        // One's own store with a narrowed mode is the plain error's.
        assert!(!closed_to(&stat(1001, 0o500), 1001));
        // Root is denied by nothing of this kind.
        assert!(!closed_to(&stat(1000, 0o700), 0));
    }
}
