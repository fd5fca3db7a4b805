//! The filesystem operations the store performs, behind one small trait.
//!
//! Every file the store creates, reads, renames, lists, syncs or removes
//! goes through [`StoreFs`]: [`RealFs`](super::durable::RealFs) in
//! production, [`FaultFs`](super::fault_fs::FaultFs) in tests, which wraps
//! the real one and fails chosen calls with `ENOSPC` or `EIO`. So what the
//! store does with a full disk or a failing read (which error comes back,
//! what is left behind, whether the previous epoch survives) is tested
//! without root, a small tmpfs or a bad disk.
//!
//! The operations are the ones the store's call sites need and no more. The
//! durable-write protocol built from them (temp file, `sync_all`, rename or
//! link, directory fsync) is [`Durable`](super::durable::Durable), written
//! once over this trait.
//!
//! Two kinds of result: an operation whose failure the caller interprets
//! (`NotFound`, `AlreadyExists`) or names in its own words (the same remove
//! is "remove chunk" in GC and "remove manifest" in retention) returns an
//! [`io::Result`]; the others return their error already tagged with the
//! step that failed ([`IoStepError`]).

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Mode of every directory cryo creates: the job's user only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file cryo creates.
pub const FILE_MODE: u32 = 0o600;

/// What [`StoreFs::stat`] tells about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// It is a directory.
    pub is_dir: bool,
    /// Its length in bytes.
    pub len: u64,
    /// Its owner's user id.
    pub uid: u32,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

/// The filesystem as the store uses it. Implementations are shared by every
/// writer thread (`Send + Sync`) and called once per file operation, so the
/// store's parallel chunk writes take no lock of the trait's.
pub trait StoreFs: fmt::Debug + Send + Sync {
    /// `stat(2)` of `path`, following symbolic links.
    fn stat(&self, path: &Path) -> io::Result<FileStat>;

    /// Creates directory `path` and its missing parents, mode 0700. Step:
    /// `create directory`.
    fn create_dir_all(&self, path: &Path) -> Result<(), IoStepError>;

    /// Checks that `path` is a real directory of this user's: not a symbolic
    /// link (which would lead chunk writes, or GC's deletions, out of the
    /// store) and not owned by another user. A directory that others may
    /// enter is narrowed to 0700 rather than refused: it is ours, only too
    /// open.
    fn check_private_dir(&self, path: &Path) -> Result<(), IoStepError>;

    /// The names in directory `path`, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;

    /// Creates the new file `path` (mode 0600; an existing file is an
    /// error), writes `parts` to it in order and, if `sync`, `sync_all`s
    /// it. On failure the file is removed. Steps: `create`, `write`,
    /// `sync_all`.
    fn write_file(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(), IoStepError>;

    /// Reads the whole file `path` into `bytes` (cleared first, capacity
    /// reused), refusing one over `max` bytes before allocating, and a
    /// symbolic link (the store never reads through one). Steps: `open`,
    /// `stat`, `read`.
    fn read_capped_into(
        &self,
        path: &Path,
        max: u64,
        bytes: &mut Vec<u8>,
    ) -> Result<(), ReadCappedError>;

    /// `rename(2)`: replaces any file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// `link(2)`: fails with `AlreadyExists` rather than replace `to`, also
    /// on NFS.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Removes directory `path` and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Opens directory `path`, to anchor a later
    /// [`sync_filesystem`](StoreFs::sync_filesystem).
    fn open_dir(&self, path: &Path) -> io::Result<File>;

    /// fsyncs directory `path`, so that entries created, renamed or removed
    /// in it persist. Steps: `open directory`, `fsync directory`.
    fn sync_dir(&self, path: &Path) -> Result<(), IoStepError>;

    /// Flushes every dirty page and inode of the filesystem holding
    /// `anchor` (opened from `path` with [`open_dir`](StoreFs::open_dir))
    /// with one `syncfs(2)`. Since Linux 5.8 it reports writeback errors
    /// that happened since `anchor` was opened, so open it before writing
    /// the batch.
    fn sync_filesystem(&self, anchor: &File, path: &Path) -> io::Result<()>;

    /// Opens (creating if needed, mode 0600, never through a symbolic link)
    /// the job's lock file for `flock(2)`.
    fn open_lock(&self, path: &Path) -> io::Result<File>;

    /// Creates the new file `path` (mode 0600; an existing file or a
    /// symbolic link is an error), open for writes at offsets: a pack.
    fn create_pack(&self, path: &Path) -> io::Result<File>;

    /// Writes `parts` one after the other at `offset` of `file` (opened from
    /// `path`), all of them or an error. Writers at disjoint offsets may
    /// call it on one file in parallel.
    fn write_at(&self, file: &File, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()>;

    /// `fdatasync(2)` of `file` (opened from `path`): its bytes so far are
    /// on stable storage.
    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()>;

    /// Opens `path` for reading, never through a symbolic link.
    fn open_read(&self, path: &Path) -> io::Result<File>;

    /// Reads exactly `buf.len()` bytes at `offset` of `file` (opened from
    /// `path`); a file that ends first is `UnexpectedEof`.
    fn read_at(&self, file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Asks the kernel to read `len` bytes at `offset` of `file` (opened
    /// from `path`; 0 means to its end) into the page cache in the
    /// background (`POSIX_FADV_WILLNEED`). Returns once the reads are
    /// queued, not done; a filesystem without a page cache may ignore it.
    fn advise_willneed(&self, file: &File, path: &Path, offset: u64, len: u64) -> io::Result<()>;

    /// Whether `path` is a directory (following links); false on any error.
    fn is_dir(&self, path: &Path) -> bool {
        self.stat(path).is_ok_and(|stat| stat.is_dir)
    }

    /// Whether `path` exists (following links); false on any error.
    fn exists(&self, path: &Path) -> bool {
        self.stat(path).is_ok()
    }
}

/// An I/O step failed on a path.
#[derive(Debug, Error)]
#[error("{step} {}: {source}", path.display())]
pub struct IoStepError {
    /// The step that failed (`create`, `write`, `sync_all`, `rename`…).
    pub step: &'static str,
    /// The path it failed on.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl IoStepError {
    /// Tags `source` with a step and a path.
    pub fn new(step: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        IoStepError {
            step,
            path: path.into(),
            source,
        }
    }

    /// A lock that another writer thread poisoned by panicking, at `step`
    /// on `path`.
    pub fn panicked(step: &'static str, path: impl Into<PathBuf>) -> Self {
        IoStepError::new(step, path, io::Error::other("a writer thread panicked"))
    }

    /// Whether the error is "no space left on device" or "quota exceeded".
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        )
    }
}

/// Shorthand for tagging an I/O result.
pub trait IoStep<T> {
    /// Tags the error with `step` and `path`.
    fn step(self, step: &'static str, path: &Path) -> Result<T, IoStepError>;
}

impl<T> IoStep<T> for io::Result<T> {
    fn step(self, step: &'static str, path: &Path) -> Result<T, IoStepError> {
        self.map_err(|err| IoStepError::new(step, path, err))
    }
}

/// A capped read failed.
#[derive(Debug, Error)]
pub enum ReadCappedError {
    /// The file does not exist.
    #[error("{} is missing", .0.display())]
    Missing(PathBuf),
    /// The file is over the cap.
    #[error("{} is {len} bytes, above the limit of {max}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Another I/O error.
    #[error(transparent)]
    Io(#[from] IoStepError),
}
