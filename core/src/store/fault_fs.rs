//! A [`StoreFs`] that fails chosen operations, for tests.
//!
//! [`FaultFs`] passes every call to the filesystem it wraps, except the ones
//! its faults select: the `n`-th call of an operation, or every call of an
//! operation on a path a predicate accepts. Those fail with the errno the
//! fault names (`ENOSPC` for a full disk, `EIO` for a failing one), as the
//! kernel would report it at that step, and change nothing on disk. A store
//! opened with [`Store::open_with_fs`](super::Store::open_with_fs) over a
//! `FaultFs` shows what the store does with a full disk or a bad read
//! without root or a real failing device.
//!
//! Faults are fixed when the `FaultFs` is built and calls are counted with
//! atomics, so a fault injected into parallel chunk writes takes no lock.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;

use super::durable::RealFs;
use super::fs::{FileStat, IoStepError, ReadCappedError, StoreFs};

/// An operation of [`StoreFs`], as a fault selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsOp {
    /// [`StoreFs::stat`] (and so `is_dir`, `exists`).
    Stat,
    /// [`StoreFs::create_dir_all`].
    CreateDir,
    /// [`StoreFs::check_private_dir`].
    CheckDir,
    /// [`StoreFs::list_dir`].
    ListDir,
    /// [`StoreFs::write_file`], failing at its `write` step.
    Write,
    /// [`StoreFs::write_file`] with `sync`, failing at its `sync_all` step
    /// once the bytes are written (as a full disk with delayed allocation,
    /// or NFS, reports it).
    SyncFile,
    /// [`StoreFs::read_capped_into`], failing at its `read` step.
    Read,
    /// [`StoreFs::rename`]; a predicate sees the destination.
    Rename,
    /// [`StoreFs::hard_link`]; a predicate sees the new name.
    Link,
    /// [`StoreFs::remove_file`].
    Remove,
    /// [`StoreFs::remove_dir_all`].
    RemoveDirAll,
    /// [`StoreFs::open_dir`].
    OpenDir,
    /// [`StoreFs::sync_dir`], failing at its `fsync directory` step.
    SyncDir,
    /// [`StoreFs::sync_filesystem`].
    SyncFs,
    /// [`StoreFs::open_lock`].
    OpenLock,
    /// [`StoreFs::create_pack`].
    CreatePack,
    /// [`StoreFs::write_at`]: a chunk appended to a pack, or its index.
    WriteAt,
    /// [`StoreFs::sync_data`].
    SyncData,
    /// [`StoreFs::open_read`].
    OpenRead,
    /// [`StoreFs::read_at`].
    ReadAt,
    /// [`StoreFs::advise_willneed`].
    Advise,
}

impl FsOp {
    const COUNT: usize = 21;

    fn index(self) -> usize {
        self as usize
    }
}

/// Which calls of an operation a fault fails.
#[derive(Clone)]
enum Trigger {
    /// The `n`-th call (1-based), counted from the `FaultFs`'s creation.
    Nth(u64),
    /// Every call on a path the predicate accepts.
    Matching(Arc<dyn Fn(&Path) -> bool + Send + Sync>),
}

impl fmt::Debug for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Nth(n) => write!(f, "Nth({n})"),
            Trigger::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

#[derive(Debug, Clone)]
struct Fault {
    op: FsOp,
    trigger: Trigger,
    errno: Errno,
}

/// A filesystem that fails chosen calls. See the module documentation.
#[derive(Debug)]
pub struct FaultFs {
    inner: Arc<dyn StoreFs>,
    faults: Vec<Fault>,
    /// Operations slowed down (a slow filesystem widens race windows).
    delays: Vec<(FsOp, std::time::Duration)>,
    calls: [AtomicU64; FsOp::COUNT],
    injected: AtomicU64,
}

impl FaultFs {
    /// Wraps `inner`, with no faults yet.
    pub fn new(inner: Arc<dyn StoreFs>) -> FaultFs {
        FaultFs {
            inner,
            faults: Vec::new(),
            delays: Vec::new(),
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            injected: AtomicU64::new(0),
        }
    }

    /// Wraps the real filesystem.
    pub fn real() -> FaultFs {
        FaultFs::new(Arc::new(RealFs))
    }

    /// Fails the `n`-th call (1-based) of `op` with `errno`.
    pub fn fail_nth(mut self, op: FsOp, n: u64, errno: Errno) -> FaultFs {
        self.faults.push(Fault {
            op,
            trigger: Trigger::Nth(n),
            errno,
        });
        self
    }

    /// Fails every call of `op` on a path `matches` accepts with `errno`.
    pub fn fail_matching(
        mut self,
        op: FsOp,
        matches: impl Fn(&Path) -> bool + Send + Sync + 'static,
        errno: Errno,
    ) -> FaultFs {
        self.faults.push(Fault {
            op,
            trigger: Trigger::Matching(Arc::new(matches)),
            errno,
        });
        self
    }

    /// Makes every call of `op` take `delay` longer, as a slow or loaded
    /// filesystem would.
    pub fn slow(mut self, op: FsOp, delay: std::time::Duration) -> FaultFs {
        self.delays.push((op, delay));
        self
    }

    /// How many calls of `op` were made so far.
    pub fn calls(&self, op: FsOp) -> u64 {
        self.calls[op.index()].load(Ordering::Relaxed)
    }

    /// How many calls have failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Counts a call of `op` on `path` and returns the error of the first
    /// fault that selects it.
    fn check(&self, op: FsOp, path: &Path) -> io::Result<()> {
        let call = self.calls[op.index()].fetch_add(1, Ordering::Relaxed) + 1;
        for (slow, delay) in &self.delays {
            if *slow == op {
                std::thread::sleep(*delay);
            }
        }
        let hit = self.faults.iter().find(|fault| {
            fault.op == op
                && match &fault.trigger {
                    Trigger::Nth(n) => *n == call,
                    Trigger::Matching(matches) => matches(path),
                }
        });
        match hit {
            Some(fault) => {
                self.injected.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::from_raw_os_error(fault.errno as i32))
            }
            None => Ok(()),
        }
    }

    /// [`FaultFs::check`] for an operation whose errors carry their step.
    fn check_step(&self, op: FsOp, step: &'static str, path: &Path) -> Result<(), IoStepError> {
        self.check(op, path)
            .map_err(|err| IoStepError::new(step, path, err))
    }
}

impl StoreFs for FaultFs {
    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        self.check(FsOp::Stat, path)?;
        self.inner.stat(path)
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), IoStepError> {
        self.check_step(FsOp::CreateDir, "create directory", path)?;
        self.inner.create_dir_all(path)
    }

    fn check_private_dir(&self, path: &Path) -> Result<(), IoStepError> {
        self.check_step(FsOp::CheckDir, "lstat", path)?;
        self.inner.check_private_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.check(FsOp::ListDir, path)?;
        self.inner.list_dir(path)
    }

    fn write_file(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(), IoStepError> {
        self.check_step(FsOp::Write, "write", path)?;
        if !sync {
            return self.inner.write_file(path, parts, false);
        }
        match self.check_step(FsOp::SyncFile, "sync_all", path) {
            Ok(()) => self.inner.write_file(path, parts, true),
            Err(err) => {
                // The bytes reach the page cache; the sync is what fails.
                // Like the real write_file, leave no file behind.
                self.inner.write_file(path, parts, false)?;
                let _ = self.inner.remove_file(path);
                Err(err)
            }
        }
    }

    fn read_capped_into(
        &self,
        path: &Path,
        max: u64,
        bytes: &mut Vec<u8>,
    ) -> Result<(), ReadCappedError> {
        self.check_step(FsOp::Read, "read", path)?;
        self.inner.read_capped_into(path, max, bytes)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(FsOp::Rename, to)?;
        self.inner.rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(FsOp::Link, to)?;
        self.inner.hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check(FsOp::Remove, path)?;
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check(FsOp::RemoveDirAll, path)?;
        self.inner.remove_dir_all(path)
    }

    fn open_dir(&self, path: &Path) -> io::Result<File> {
        self.check(FsOp::OpenDir, path)?;
        self.inner.open_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), IoStepError> {
        self.check_step(FsOp::SyncDir, "fsync directory", path)?;
        self.inner.sync_dir(path)
    }

    fn sync_filesystem(&self, anchor: &File, path: &Path) -> io::Result<()> {
        self.check(FsOp::SyncFs, path)?;
        self.inner.sync_filesystem(anchor, path)
    }

    fn open_lock(&self, path: &Path) -> io::Result<File> {
        self.check(FsOp::OpenLock, path)?;
        self.inner.open_lock(path)
    }

    fn create_pack(&self, path: &Path) -> io::Result<File> {
        self.check(FsOp::CreatePack, path)?;
        self.inner.create_pack(path)
    }

    fn write_at(&self, file: &File, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        self.check(FsOp::WriteAt, path)?;
        self.inner.write_at(file, path, offset, parts)
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        self.check(FsOp::SyncData, path)?;
        self.inner.sync_data(file, path)
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        self.check(FsOp::OpenRead, path)?;
        self.inner.open_read(path)
    }

    fn read_at(&self, file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(FsOp::ReadAt, path)?;
        self.inner.read_at(file, path, offset, buf)
    }

    fn advise_willneed(&self, file: &File, path: &Path, offset: u64, len: u64) -> io::Result<()> {
        self.check(FsOp::Advise, path)?;
        self.inner.advise_willneed(file, path, offset, len)
    }
}
