//! The store's files as the runtime opens them: out of the application's
//! fd numbers, and known as the runtime's at a checkpoint.
//!
//! A restore and the prefetch keep pack files open (`JobStore` caches them
//! for its later reads). Opened like any file, they would take the lowest
//! free numbers, the very numbers a restart puts the application's fds back
//! at ("the new process already uses fd 3"), and a checkpoint taken while
//! they are open would record them as the application's files. So every
//! file the runtime's store opens for reading is moved at or above
//! [`RUNTIME_FD_FLOOR`](crate::runtime::RUNTIME_FD_FLOOR) (close-on-exec), as the runtime's other fds are,
//! and remembered: [`open_now`] names those still open, for the park to
//! send as the runtime's.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cryo_core::store::durable::RealFs;
use cryo_core::store::fs::{FileStat, IoStepError, ReadCappedError, StoreFs};

/// Every store file the runtime opened: its fd and identity.
static OPENED: Mutex<Vec<(RawFd, u64, u64)>> = Mutex::new(Vec::new());

/// The real filesystem, with the fds of files opened for reading moved out
/// of the application's way.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RuntimeFs;

impl RuntimeFs {
    /// The store's filesystem as the runtime uses it.
    pub(crate) fn shared() -> Arc<dyn StoreFs> {
        Arc::new(RuntimeFs)
    }
}

/// The fds the runtime's store still has open (the same file as when it
/// opened them), to be named as the runtime's at a park.
pub(crate) fn open_now() -> Vec<RawFd> {
    let mut opened = OPENED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    opened.retain(|&(fd, dev, ino)| same_file(fd, dev, ino));
    opened.iter().map(|&(fd, _, _)| fd).collect()
}

fn same_file(fd: RawFd, dev: u64, ino: u64) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

impl StoreFs for RuntimeFs {
    fn open_read(&self, path: &Path) -> io::Result<File> {
        let file = RealFs.open_read(path)?;
        let high = crate::runtime::move_high(OwnedFd::from(file)).map_err(io::Error::from)?;
        let st = nix::sys::stat::fstat(high.as_raw_fd()).map_err(io::Error::from)?;
        OPENED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((high.as_raw_fd(), st.st_dev, st.st_ino));
        Ok(File::from(high))
    }

    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        RealFs.stat(path)
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), IoStepError> {
        RealFs.create_dir_all(path)
    }

    fn check_private_dir(&self, path: &Path) -> Result<(), IoStepError> {
        RealFs.check_private_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        RealFs.list_dir(path)
    }

    fn write_file(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(), IoStepError> {
        RealFs.write_file(path, parts, sync)
    }

    fn read_capped_into(
        &self,
        path: &Path,
        max: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ReadCappedError> {
        RealFs.read_capped_into(path, max, buf)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs.rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs.hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        RealFs.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        RealFs.remove_dir_all(path)
    }

    fn open_dir(&self, path: &Path) -> io::Result<File> {
        RealFs.open_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), IoStepError> {
        RealFs.sync_dir(path)
    }

    fn sync_filesystem(&self, anchor: &File, path: &Path) -> io::Result<()> {
        RealFs.sync_filesystem(anchor, path)
    }

    fn open_lock(&self, path: &Path) -> io::Result<File> {
        RealFs.open_lock(path)
    }

    fn create_pack(&self, path: &Path) -> io::Result<File> {
        RealFs.create_pack(path)
    }

    fn write_at(&self, file: &File, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        RealFs.write_at(file, path, offset, parts)
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        RealFs.sync_data(file, path)
    }

    fn read_at(&self, file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        RealFs.read_at(file, path, offset, buf)
    }

    fn advise_willneed(&self, file: &File, path: &Path, offset: u64, len: u64) -> io::Result<()> {
        RealFs.advise_willneed(file, path, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RUNTIME_FD_FLOOR;

    #[test]
    fn files_opened_for_reading_are_high_close_on_exec_and_known_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        std::fs::write(&path, b"bytes").unwrap();
        let file = RuntimeFs.open_read(&path).unwrap();
        let fd = file.as_raw_fd();
        assert!(fd >= RUNTIME_FD_FLOOR, "fd {fd}");
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0);
        assert!(open_now().contains(&fd));
        drop(file);
        // Closed, or reused for another file: no longer the runtime's.
        assert!(!open_now().contains(&fd));
    }
}
