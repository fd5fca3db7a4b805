//! Re-opening a rank's regular files at restart: same path, flags, fd number
//! and offset, with files opened for writing cut back to their size at the
//! checkpoint so that output after a restart is byte-identical to an
//! uninterrupted run.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use cryo_core::manifest::{FdRecord, FdRestore, RankRecord};
use nix::fcntl::{fcntl, open, FcntlArg, FdFlag, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{dup2, ftruncate, lseek, Whence};

use crate::error::RestoreError;

/// What to do with a file opened for writing that grew after the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePolicy {
    /// Cut it back to its size at the checkpoint (the default).
    Truncate,
    /// Leave it as it is.
    Keep,
}

impl FilePolicy {
    /// Parses `truncate` or `keep`.
    pub fn parse(text: &str) -> Option<FilePolicy> {
        match text {
            "truncate" => Some(FilePolicy::Truncate),
            "keep" => Some(FilePolicy::Keep),
            _ => None,
        }
    }
}

/// What a file restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesRestored {
    /// Fds re-opened.
    pub restored: Vec<i32>,
    /// Files cut back to their checkpoint size.
    pub truncated: Vec<String>,
}

fn is_writable(flags: i32) -> bool {
    matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

/// Restores every fd of `record` marked [`FdRestore::Restore`]. Fds listed
/// in `reserved` (the runtime's own) are never touched.
pub fn restore_files(
    record: &RankRecord,
    policy: FilePolicy,
    reserved: &[RawFd],
) -> Result<FilesRestored, RestoreError> {
    let mut done = FilesRestored::default();
    // Check every file before touching any, so that a refused restart
    // changes nothing.
    for fd in record
        .fds
        .iter()
        .filter(|fd| fd.restore == FdRestore::Restore)
    {
        check_file(record.rank, fd)?;
    }
    for fd in record
        .fds
        .iter()
        .filter(|fd| fd.restore == FdRestore::Restore)
    {
        if reserved.contains(&fd.fd) {
            return Err(file_io(
                record.rank,
                fd,
                "reserve fd",
                io::Error::other("the fd number is used by the cryo runtime"),
            ));
        }
        if restore_one(record.rank, fd, policy)? {
            done.truncated.push(fd.path.clone());
        }
        done.restored.push(fd.fd);
    }
    Ok(done)
}

fn file_io(rank: u32, fd: &FdRecord, step: &'static str, source: io::Error) -> RestoreError {
    RestoreError::FileIo {
        rank,
        fd: fd.fd,
        path: fd.path.clone(),
        step,
        source,
    }
}

fn check_file(rank: u32, fd: &FdRecord) -> Result<u64, RestoreError> {
    let meta = match fs::metadata(&fd.path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(RestoreError::FileVanished {
                rank,
                fd: fd.fd,
                path: fd.path.clone(),
            })
        }
        Err(err) => return Err(file_io(rank, fd, "stat", err)),
    };
    let size = meta.len();
    if size < fd.offset {
        return Err(RestoreError::FileShrank {
            rank,
            fd: fd.fd,
            path: fd.path.clone(),
            size,
            offset: fd.offset,
        });
    }
    Ok(size)
}

/// Restores one fd; returns whether the file was truncated.
fn restore_one(rank: u32, fd: &FdRecord, policy: FilePolicy) -> Result<bool, RestoreError> {
    let size = check_file(rank, fd)?;
    let saved = OFlag::from_bits_truncate(fd.flags);
    let cloexec = saved.contains(OFlag::O_CLOEXEC);
    let flags = (saved - (OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_EXCL)) | OFlag::O_CLOEXEC;
    let temp: RawFd = open(fd.path.as_str(), flags, Mode::empty())
        .map_err(|errno| file_io(rank, fd, "open", errno.into()))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let temp = unsafe { OwnedFd::from_raw_fd(temp) };
    let target = if temp.as_raw_fd() == fd.fd {
        temp
    } else {
        // dup2 clears close-on-exec on the new fd; it is set below if saved.
        let new = dup2(temp.as_raw_fd(), fd.fd)
            .map_err(|errno| file_io(rank, fd, "dup2", errno.into()))?;
        drop(temp);
        // SAFETY: dup2 installed `new` (== fd.fd) for us; the fd table slot
        // is ours from here on, handed to the application by number.
        unsafe { OwnedFd::from_raw_fd(new) }
    };
    let fd_flags = if cloexec {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(target.as_raw_fd(), FcntlArg::F_SETFD(fd_flags))
        .map_err(|errno| file_io(rank, fd, "fcntl F_SETFD", errno.into()))?;
    let mut truncated = false;
    if is_writable(fd.flags) && policy == FilePolicy::Truncate && size > fd.size_at_checkpoint {
        let len = i64::try_from(fd.size_at_checkpoint).map_err(|_| {
            file_io(
                rank,
                fd,
                "ftruncate",
                io::Error::other("size overflows off_t"),
            )
        })?;
        ftruncate(&target, len).map_err(|errno| file_io(rank, fd, "ftruncate", errno.into()))?;
        truncated = true;
    }
    let offset = i64::try_from(fd.offset).map_err(|_| {
        file_io(
            rank,
            fd,
            "lseek",
            io::Error::other("offset overflows off_t"),
        )
    })?;
    lseek(target.as_raw_fd(), offset, Whence::SeekSet)
        .map_err(|errno| file_io(rank, fd, "lseek", errno.into()))?;
    // The fd now belongs to the application, which knows it by number.
    std::mem::forget(target);
    tracing::debug!(rank, fd = fd.fd, path = %fd.path, offset = fd.offset, truncated, "fd.restored");
    Ok(truncated)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Seek, Write};

    use cryo_core::manifest::{FdKind, WriteStats};

    use super::*;

    fn record(fds: Vec<FdRecord>) -> RankRecord {
        RankRecord {
            rank: 2,
            node: "n".into(),
            pid: 1,
            fds,
            mappings: vec![],
            regions: vec![],
            stats: WriteStats::default(),
        }
    }

    fn fd_record(fd: i32, path: &str, flags: i32, offset: u64, size: u64) -> FdRecord {
        FdRecord {
            fd,
            kind: FdKind::Regular,
            path: path.into(),
            flags,
            offset,
            size_at_checkpoint: size,
            restore: FdRestore::Restore,
        }
    }

    #[test]
    fn restores_truncates_and_seeks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"line1\nline2\nafter checkpoint\n").unwrap();
        let target = 777;
        let rec = record(vec![fd_record(
            target,
            path.to_str().unwrap(),
            libc::O_WRONLY | libc::O_APPEND,
            12,
            12,
        )]);
        let done = restore_files(&rec, FilePolicy::Truncate, &[]).unwrap();
        assert_eq!(done.restored, vec![target]);
        assert_eq!(std::fs::read(&path).unwrap(), b"line1\nline2\n");
        // SAFETY: restore_files installed fd 777 for us; we own it now.
        let mut file = unsafe { std::fs::File::from_raw_fd(target) };
        file.write_all(b"line3\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"line1\nline2\nline3\n");
    }

    #[test]
    fn read_only_file_keeps_its_size_and_gets_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input");
        std::fs::write(&path, b"0123456789").unwrap();
        let rec = record(vec![fd_record(
            778,
            path.to_str().unwrap(),
            libc::O_RDONLY,
            4,
            4,
        )]);
        restore_files(&rec, FilePolicy::Truncate, &[]).unwrap();
        // SAFETY: restore_files installed fd 778 for us; we own it now.
        let mut file = unsafe { std::fs::File::from_raw_fd(778) };
        assert_eq!(file.stream_position().unwrap(), 4);
        let mut rest = String::new();
        file.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "456789");
    }

    #[test]
    fn vanished_and_shrunk_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.log");
        let rec = record(vec![fd_record(
            779,
            gone.to_str().unwrap(),
            libc::O_WRONLY,
            0,
            0,
        )]);
        let err = restore_files(&rec, FilePolicy::Truncate, &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("gone.log") && text.contains("rank 2") && text.contains("vanished"),
            "{text}"
        );

        let small = dir.path().join("small.log");
        std::fs::write(&small, b"abc").unwrap();
        let rec = record(vec![fd_record(
            780,
            small.to_str().unwrap(),
            libc::O_WRONLY,
            10,
            10,
        )]);
        let err = restore_files(&rec, FilePolicy::Truncate, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                RestoreError::FileShrank {
                    size: 3,
                    offset: 10,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn keep_policy_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"abcdef").unwrap();
        let rec = record(vec![fd_record(
            781,
            path.to_str().unwrap(),
            libc::O_WRONLY,
            3,
            3,
        )]);
        restore_files(&rec, FilePolicy::Keep, &[]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        let _ = nix::unistd::close(781);
    }
}
