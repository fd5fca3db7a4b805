//! Durable file writes: temp file, `sync_all`, rename or link, directory fsync.
//!
//! Nothing is ever rewritten in place. A file appears under its final name
//! only once its bytes are on stable storage, so a crash leaves either the
//! old state or the new one, never a torn file.
//!
//! The protocol ([`Durable`]) is written once over [`StoreFs`]; [`RealFs`]
//! is the filesystem itself. The free functions are shorthands on the real
//! filesystem for files outside a store (the job registry, token files).

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::fs::{FileStat, IoStep, IoStepError, ReadCappedError, StoreFs, DIR_MODE, FILE_MODE};

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl StoreFs for RealFs {
    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        Ok(FileStat {
            is_dir: meta.is_dir(),
            len: meta.len(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        })
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), IoStepError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
            .step("create directory", path)
    }

    fn check_private_dir(&self, path: &Path) -> Result<(), IoStepError> {
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
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
                .step("chmod 0700", path)?;
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(path)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect()
    }

    fn write_file(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(), IoStepError> {
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(path)
                .step("create", path)?;
            for part in parts {
                file.write_all(part).step("write", path)?;
            }
            if sync {
                file.sync_all().step("sync_all", path)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(path);
        }
        result
    }

    fn read_capped_into(
        &self,
        path: &Path,
        max: u64,
        bytes: &mut Vec<u8>,
    ) -> Result<(), ReadCappedError> {
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

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn open_dir(&self, path: &Path) -> io::Result<File> {
        File::open(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), IoStepError> {
        let dir = File::open(path).step("open directory", path)?;
        dir.sync_all().step("fsync directory", path)
    }

    fn sync_filesystem(&self, anchor: &File, _path: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs only reads the descriptor number; `anchor` is an open
        // file that outlives the call.
        let rc = unsafe { libc::syncfs(anchor.as_raw_fd()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn open_lock(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }

    fn create_pack(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }

    fn write_at(&self, file: &File, _path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut at = offset;
        for part in parts {
            file.write_all_at(part, at)?;
            at += part.len() as u64;
        }
        Ok(())
    }

    fn sync_data(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_data()
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }

    fn read_at(&self, file: &File, _path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }

    fn advise_willneed(&self, file: &File, _path: &Path, offset: u64, len: u64) -> io::Result<()> {
        let end = match len {
            0 => file.metadata()?.len(),
            len => offset.saturating_add(len),
        };
        // Linux reads at most one readahead window per piece of advice and
        // drops the rest: advise window by window. Each returns once its
        // reads are queued, so many are in flight at once.
        let window = readahead_window(file);
        let range = |v: u64| {
            libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        let mut at = offset;
        while at < end {
            let piece = (end - at).min(window);
            // SAFETY: advice on a descriptor `file` keeps open; no memory
            // is passed.
            let rc = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(file),
                    range(at)?,
                    range(piece)?,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            at += piece;
        }
        Ok(())
    }
}

/// The readahead window of the device or filesystem that holds `file`
/// (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`), between 128 KiB (the kernel's
/// default, and the most it is sure to honour) and 16 MiB.
fn readahead_window(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    const DEFAULT: u64 = 128 << 10;
    let Ok(meta) = file.metadata() else {
        return DEFAULT;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(DEFAULT, |kib| (kib << 10).clamp(DEFAULT, 16 << 20))
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

/// Outcome of [`Durable::write_new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The file was created.
    Created,
    /// A file already had that name; nothing was changed.
    AlreadyExists,
}

/// The durable-write protocol over any [`StoreFs`]. Implemented for every
/// one, and not meant to be implemented otherwise: it is the one copy of the
/// protocol.
pub trait Durable: StoreFs {
    /// Writes `parts` to a new temp file beside `path` without syncing it,
    /// and returns the temp path. For batches: the caller makes the data
    /// durable for the whole batch at once
    /// ([`sync_filesystem`](StoreFs::sync_filesystem)) and only then
    /// publishes each file with [`publish_replace`](Durable::publish_replace),
    /// so a final name never points to bytes that are not on stable storage.
    fn write_temp_unsynced(&self, path: &Path, parts: &[&[u8]]) -> Result<PathBuf, IoStepError> {
        let temp = temp_path_for(path);
        self.write_file(&temp, parts, false)?;
        Ok(temp)
    }

    /// Renames a synced temp file onto `path`, replacing any file there. The
    /// directory is not synced: call [`sync_dir`](StoreFs::sync_dir) once
    /// after a batch.
    fn publish_replace(&self, temp: &Path, path: &Path) -> Result<(), IoStepError> {
        self.rename(temp, path)
            .step("rename", path)
            .inspect_err(|_| {
                let _ = self.remove_file(temp);
            })
    }

    /// Durably writes `parts` to `path`, replacing any file there. The
    /// directory is not synced: call [`sync_dir`](StoreFs::sync_dir) once
    /// after a batch.
    fn write_replace(&self, path: &Path, parts: &[&[u8]]) -> Result<(), IoStepError> {
        let temp = temp_path_for(path);
        self.write_file(&temp, parts, true)?;
        self.publish_replace(&temp, path)
    }

    /// Durably writes `parts` to `path` only if no file has that name, then
    /// syncs the directory. `link(2)` is atomic and refuses to replace, also
    /// on NFS, where `renameat2(RENAME_NOREPLACE)` may not exist.
    fn write_new(&self, path: &Path, parts: &[&[u8]]) -> Result<Published, IoStepError> {
        let temp = temp_path_for(path);
        self.write_file(&temp, parts, true)?;
        let linked = self.hard_link(&temp, path);
        let _ = self.remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(Published::AlreadyExists)
            }
            Err(err) => return Err(IoStepError::new("link", path, err)),
        }
        if let Some(dir) = path.parent() {
            self.sync_dir(dir)?;
        }
        Ok(Published::Created)
    }

    /// Reads a whole file of at most `max` bytes, refusing larger ones
    /// before allocating.
    fn read_capped(&self, path: &Path, max: u64) -> Result<Vec<u8>, ReadCappedError> {
        let mut bytes = Vec::new();
        self.read_capped_into(path, max, &mut bytes)?;
        Ok(bytes)
    }
}

impl<F: StoreFs + ?Sized> Durable for F {}

/// [`StoreFs::create_dir_all`] on the real filesystem.
pub fn create_dir_all(path: &Path) -> Result<(), IoStepError> {
    RealFs.create_dir_all(path)
}

/// [`StoreFs::check_private_dir`] on the real filesystem.
pub fn check_private_dir(path: &Path) -> Result<(), IoStepError> {
    RealFs.check_private_dir(path)
}

/// [`StoreFs::sync_dir`] on the real filesystem.
pub fn sync_dir(path: &Path) -> Result<(), IoStepError> {
    RealFs.sync_dir(path)
}

/// [`Durable::write_replace`] on the real filesystem.
pub fn write_replace(path: &Path, parts: &[&[u8]]) -> Result<(), IoStepError> {
    RealFs.write_replace(path, parts)
}

/// [`Durable::read_capped`] on the real filesystem.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, ReadCappedError> {
    RealFs.read_capped(path, max)
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
            RealFs.write_new(&path, &[b"one"]).expect("write"),
            Published::Created
        );
        assert_eq!(
            RealFs.write_new(&path, &[b"two"]).expect("write"),
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
