//! Durable file writes: temp file, `sync_all`, rename or link, directory fsync.
//!
//! Nothing is ever rewritten in place. A file appears under its final name
//! only once its bytes are on stable storage, so a crash leaves either the
//! old state or the new one, never a torn file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Mode of every directory cryo creates: the job's user only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file cryo creates.
pub const FILE_MODE: u32 = 0o600;

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

/// Creates `path` and its parents with mode 0700.
pub fn create_dir_all(path: &Path) -> Result<(), IoStepError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .step("create directory", path)
}

/// Checks that `path` is a real directory of this user's: not a symbolic
/// link (which would lead chunk writes, or GC's deletions, out of the store)
/// and not owned by another user. A directory that others may enter is
/// narrowed to 0700 rather than refused: it is ours, only too open.
pub fn check_private_dir(path: &Path) -> Result<(), IoStepError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refuse = |why: String| {
        IoStepError::new(
            "check store directory",
            path,
            io::Error::new(io::ErrorKind::PermissionDenied, why),
        )
    };
    let meta = fs::symlink_metadata(path).step("lstat", path)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link; refused, the store never follows links out of itself".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(format!(
            "is owned by uid {}, not by this user (uid {me}); refused",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)).step("chmod 0700", path)?;
    }
    Ok(())
}

/// fsyncs a directory so that entries created or renamed in it persist.
pub fn sync_dir(path: &Path) -> Result<(), IoStepError> {
    let dir = File::open(path).step("open directory", path)?;
    dir.sync_all().step("fsync directory", path)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temp-file path next to `final_path` (same directory, so the
/// rename is atomic). Temp names start with `.tmp-` so readers skip them.
pub fn temp_path_for(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    final_path.with_file_name(format!(".tmp-{name}-{}-{unique}", std::process::id()))
}

/// Writes `parts` to a temp file beside `path` and syncs it. Returns the temp
/// path; the caller publishes it.
fn write_temp(path: &Path, parts: &[&[u8]]) -> Result<PathBuf, IoStepError> {
    let temp = temp_path_for(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)
            .step("create", &temp)?;
        for part in parts {
            file.write_all(part).step("write", &temp)?;
        }
        file.sync_all().step("sync_all", &temp)
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(err) => {
            let _ = fs::remove_file(&temp);
            Err(err)
        }
    }
}

/// Writes `parts` to a new temp file beside `path` without syncing it, and
/// returns the temp path. For batches: the caller makes the data durable for
/// the whole batch at once ([`sync_filesystem`]) and only then publishes each
/// file with [`publish_replace`], so a final name never points to bytes that
/// are not on stable storage.
pub fn write_temp_unsynced(path: &Path, parts: &[&[u8]]) -> Result<PathBuf, IoStepError> {
    let temp = temp_path_for(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)
            .step("create", &temp)?;
        for part in parts {
            file.write_all(part).step("write", &temp)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(err) => {
            let _ = fs::remove_file(&temp);
            Err(err)
        }
    }
}

/// Renames a synced temp file onto `path`, replacing any file there. The
/// directory is not synced: call [`sync_dir`] once after a batch.
pub fn publish_replace(temp: &Path, path: &Path) -> Result<(), IoStepError> {
    fs::rename(temp, path)
        .step("rename", path)
        .inspect_err(|_| {
            let _ = fs::remove_file(temp);
        })
}

/// Flushes every dirty page and inode of the filesystem holding `anchor`
/// (an open file or directory there) with one `syncfs(2)`: one journal
/// commit for a whole batch instead of one per file. Since Linux 5.8 it
/// reports writeback errors that happened since `anchor` was opened, so open
/// it before writing the batch.
pub fn sync_filesystem(anchor: &File, path: &Path) -> Result<(), IoStepError> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor number; `anchor` is an open
    // file that outlives the call.
    let rc = unsafe { libc::syncfs(anchor.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(IoStepError::new("syncfs", path, io::Error::last_os_error()))
    }
}

/// Durably writes `parts` to `path`, replacing any file there. The directory
/// is not synced: call [`sync_dir`] once after a batch.
pub fn write_replace(path: &Path, parts: &[&[u8]]) -> Result<(), IoStepError> {
    let temp = write_temp(path, parts)?;
    fs::rename(&temp, path)
        .step("rename", path)
        .inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
}

/// Outcome of [`write_new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The file was created.
    Created,
    /// A file already had that name; nothing was changed.
    AlreadyExists,
}

/// Durably writes `parts` to `path` only if no file has that name, then
/// syncs the directory. `link(2)` is atomic and refuses to replace, also on
/// NFS, where `renameat2(RENAME_NOREPLACE)` may not exist.
pub fn write_new(path: &Path, parts: &[&[u8]]) -> Result<Published, IoStepError> {
    let temp = write_temp(path, parts)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            return Ok(Published::AlreadyExists)
        }
        Err(err) => return Err(IoStepError::new("link", path, err)),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(Published::Created)
}

/// Reads a whole file of at most `max` bytes, refusing larger ones before
/// allocating.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, ReadCappedError> {
    let mut bytes = Vec::new();
    read_capped_into(path, max, &mut bytes)?;
    Ok(bytes)
}

/// [`read_capped`] into `bytes` (cleared first), whose capacity is reused:
/// reading many files through one buffer allocates once.
pub fn read_capped_into(path: &Path, max: u64, bytes: &mut Vec<u8>) -> Result<(), ReadCappedError> {
    use std::io::Read;
    bytes.clear();
    // A metadata file that is a symbolic link would be read from outside
    // the store: refused (ELOOP).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                ReadCappedError::Missing(path.to_owned())
            } else if err.raw_os_error() == Some(libc::ELOOP) {
                ReadCappedError::Io(IoStepError::new(
                    "open",
                    path,
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "is a symbolic link; refused, the store never follows links out of itself",
                    ),
                ))
            } else {
                ReadCappedError::Io(IoStepError::new("open", path, err))
            }
        })?;
    let len = file
        .metadata()
        .step("stat", path)
        .map_err(ReadCappedError::Io)?
        .len();
    if len > max {
        return Err(ReadCappedError::TooLarge {
            path: path.to_owned(),
            len,
            max,
        });
    }
    bytes.reserve(usize::try_from(len).unwrap_or(0));
    file.take(max + 1)
        .read_to_end(bytes)
        .step("read", path)
        .map_err(ReadCappedError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadCappedError::TooLarge {
            path: path.to_owned(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn write_new_refuses_to_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        assert_eq!(
            write_new(&path, &[b"one"]).expect("write"),
            Published::Created
        );
        assert_eq!(
            write_new(&path, &[b"two"]).expect("write"),
            Published::AlreadyExists
        );
        assert_eq!(fs::read(&path).expect("read"), b"one");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        // no temp files left behind
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn read_capped_refuses_large_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big");
        fs::write(&path, vec![0u8; 100]).expect("write");
        assert!(matches!(
            read_capped(&path, 99),
            Err(ReadCappedError::TooLarge { len: 100, .. })
        ));
        assert_eq!(read_capped(&path, 100).expect("read").len(), 100);
        assert!(matches!(
            read_capped(&dir.path().join("nope"), 1),
            Err(ReadCappedError::Missing(_))
        ));
    }
}
