//! Re-opening a rank's files at restart: same path, flags, fd number and
//! offset, with files opened for writing cut back to their size at the
//! checkpoint so that output after a restart is byte-identical to an
//! uninterrupted run; fds that shared an open file description share one
//! again; unlinked files come back unlinked, from their saved contents;
//! directories and the portable devices come back by path.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cryo_core::format::manifest::{
    FdKind, FdRecord, FdRestore, RankRecord, RegionKind, RegionRecord,
};
use cryo_core::store::reader::StreamError;
use cryo_core::store::JobStore;
use nix::errno::Errno;
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

/// Whether status flags `flags` (`F_GETFL`, fdinfo) open a file for writing.
pub(crate) fn is_writable(flags: i32) -> bool {
    matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

/// Restores every fd of `record` marked [`FdRestore::Restore`]: each open
/// file description once (regular files and directories by path, the
/// portable devices, unlinked files recreated from their saved contents in
/// `store`), then every fd that shared one with `dup2` from it. Fds listed
/// in `reserved` (the runtime's own) are never touched.
pub fn restore_files(
    record: &RankRecord,
    store: &JobStore,
    policy: FilePolicy,
    reserved: &[RawFd],
) -> Result<FilesRestored, RestoreError> {
    let mut done = FilesRestored::default();
    let wanted: Vec<&FdRecord> = record
        .fds
        .iter()
        .filter(|fd| fd.restore == FdRestore::Restore)
        .collect();
    // Check every fd first, so that a refused restart changes nothing.
    for fd in &wanted {
        if reserved.contains(&fd.fd) {
            return Err(file_io(
                record.rank,
                fd,
                "reserve fd",
                io::Error::other("the fd number is used by the cryo runtime"),
            ));
        }
        let identity = if fd.shares_with.is_some() {
            None
        } else {
            check_source(record.rank, fd)?
        };
        check_free(record.rank, fd, identity)?;
    }
    for fd in wanted.iter().filter(|fd| fd.shares_with.is_none()) {
        let truncated = match fd.kind {
            FdKind::Deleted => {
                restore_unlinked(record, store, fd)?;
                false
            }
            _ => restore_one(record.rank, fd, policy)?,
        };
        if truncated {
            done.truncated.push(fd.path.clone());
        }
        done.restored.push(fd.fd);
    }
    for fd in &wanted {
        if let Some(leader) = fd.shares_with {
            let new = dup2(leader, fd.fd)
                .map_err(|errno| file_io(record.rank, fd, "dup2", errno.into()))?;
            set_cloexec(record.rank, fd, new)?;
            tracing::debug!(rank = record.rank, fd = fd.fd, leader, "fd.restored_shared");
            done.restored.push(fd.fd);
        }
    }
    if policy == FilePolicy::Truncate {
        restore_contents(record, store, &done.restored)?;
    }
    done.restored.sort_unstable();
    Ok(done)
}

/// Streams a saved file's contents from the store into `file` and cuts it
/// to their length.
fn write_contents(
    store: &JobStore,
    rank: u32,
    fd: &FdRecord,
    region: &RegionRecord,
    file: &fs::File,
    what: &str,
) -> Result<(), RestoreError> {
    crate::restore_threads::restore(|| {
        store.stream_region(region, 16 << 20, |offset, bytes| {
            file.write_all_at(bytes, offset)
        })
    })
    .map_err(|err| match err {
        StreamError::Read(source) => RestoreError::Contents {
            rank,
            what: format!("{what} {} ({})", fd.fd, fd.path),
            source,
        },
        StreamError::Sink(source) => file_io(rank, fd, "write contents", source),
    })?;
    file.set_len(region.len)
        .map_err(|err| file_io(rank, fd, "ftruncate", err))
}

/// Writes back the saved contents of the files that were open for writing
/// in place, through their restored fds, so that bytes overwritten after
/// the checkpoint are undone.
fn restore_contents(
    record: &RankRecord,
    store: &JobStore,
    restored: &[RawFd],
) -> Result<(), RestoreError> {
    let rank = record.rank;
    for region in &record.regions {
        let RegionKind::FileContents { fd: owner } = region.kind else {
            continue;
        };
        let Some(fd) = record.fds.iter().find(|f| f.fd == owner) else {
            continue;
        };
        if !restored.contains(&owner) {
            continue;
        }
        // SAFETY: `owner` was just restored and stays open; ManuallyDrop
        // keeps this borrow from closing it.
        let file = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(owner) });
        write_contents(store, rank, fd, region, &file, "the contents of fd")?;
        tracing::debug!(rank, fd = owner, path = %fd.path, len = region.len, "fd.contents_restored");
    }
    Ok(())
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

/// Checks that what an fd is restored from is still there and still the
/// same kind of thing; returns its `(dev, ino)` where it has a path.
fn check_source(rank: u32, fd: &FdRecord) -> Result<Option<(u64, u64)>, RestoreError> {
    let expected = match fd.kind {
        FdKind::Deleted => return Ok(None),
        FdKind::Directory => "directory",
        FdKind::CharDevice => "character device",
        _ => "regular file",
    };
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
    let same_kind = match fd.kind {
        FdKind::Directory => meta.is_dir(),
        FdKind::CharDevice => meta.file_type().is_char_device(),
        _ => meta.is_file(),
    };
    if !same_kind {
        return Err(RestoreError::FileChanged {
            rank,
            fd: fd.fd,
            path: fd.path.clone(),
            expected,
        });
    }
    if meta.is_file() && meta.len() < fd.offset {
        return Err(RestoreError::FileShrank {
            rank,
            fd: fd.fd,
            path: fd.path.clone(),
            size: meta.len(),
            offset: fd.offset,
        });
    }
    Ok(Some((meta.dev(), meta.ino())))
}

/// An fd number already open in the new process may only be taken over
/// when it already refers to the file to restore there (the application
/// opened it again before `cryo_init`); anything else belongs to the MPI
/// library or the launcher and must not be closed under it.
fn check_free(rank: u32, fd: &FdRecord, identity: Option<(u64, u64)>) -> Result<(), RestoreError> {
    // A standard stream the application had replaced (`freopen`, `dup2`)
    // replaces the new launcher's again.
    if (0..=2).contains(&fd.fd) {
        return Ok(());
    }
    let Ok(now) = fs::metadata(format!("/proc/self/fd/{}", fd.fd)) else {
        return Ok(());
    };
    if identity == Some((now.dev(), now.ino())) {
        return Ok(());
    }
    let occupant = fs::read_link(format!("/proc/self/fd/{}", fd.fd))
        .map_or_else(|_| "another file".into(), |p| p.display().to_string());
    Err(RestoreError::FdTaken {
        rank,
        fd: fd.fd,
        path: fd.path.clone(),
        occupant,
    })
}

fn open_flags(saved: i32) -> OFlag {
    let saved = OFlag::from_bits_truncate(saved);
    (saved - (OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_EXCL | OFlag::O_TMPFILE))
        | OFlag::O_CLOEXEC
}

/// Moves `temp` to the saved fd number and restores close-on-exec.
fn install(rank: u32, fd: &FdRecord, temp: RawFd) -> Result<OwnedFd, RestoreError> {
    // SAFETY: the caller's `open` just returned `temp` and nothing else owns it.
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
    set_cloexec(rank, fd, target.as_raw_fd())?;
    Ok(target)
}

fn set_cloexec(rank: u32, fd: &FdRecord, raw: RawFd) -> Result<(), RestoreError> {
    let fd_flags = if OFlag::from_bits_truncate(fd.flags).contains(OFlag::O_CLOEXEC) {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(raw, FcntlArg::F_SETFD(fd_flags))
        .map_err(|errno| file_io(rank, fd, "fcntl F_SETFD", errno.into()))?;
    Ok(())
}

fn seek(rank: u32, fd: &FdRecord, target: &OwnedFd) -> Result<(), RestoreError> {
    let offset = i64::try_from(fd.offset).map_err(|_| {
        file_io(
            rank,
            fd,
            "lseek",
            io::Error::other("offset overflows off_t"),
        )
    })?;
    // An O_PATH fd has no offset.
    if OFlag::from_bits_truncate(fd.flags).contains(OFlag::O_PATH) {
        return Ok(());
    }
    match lseek(target.as_raw_fd(), offset, Whence::SeekSet) {
        Ok(_) => Ok(()),
        // Devices such as /dev/null accept any offset; the others have none.
        Err(Errno::ESPIPE) if fd.kind == FdKind::CharDevice => Ok(()),
        Err(errno) => Err(file_io(rank, fd, "lseek", errno.into())),
    }
}

/// Restores one fd opened by path; returns whether the file was truncated.
fn restore_one(rank: u32, fd: &FdRecord, policy: FilePolicy) -> Result<bool, RestoreError> {
    let size = match fd.kind {
        FdKind::Regular => fs::metadata(&fd.path).map(|m| m.len()).unwrap_or(0),
        _ => 0,
    };
    let mut flags = open_flags(fd.flags);
    if fd.kind == FdKind::Directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let temp: RawFd = open(fd.path.as_str(), flags, Mode::empty())
        .map_err(|errno| file_io(rank, fd, "open", errno.into()))?;
    let target = install(rank, fd, temp)?;
    let mut truncated = false;
    if fd.kind == FdKind::Regular
        && is_writable(fd.flags)
        && policy == FilePolicy::Truncate
        && size > fd.size_at_checkpoint
    {
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
    seek(rank, fd, &target)?;
    // The fd now belongs to the application, which knows it by number.
    std::mem::forget(target);
    tracing::debug!(rank, fd = fd.fd, path = %fd.path, offset = fd.offset, truncated, "fd.restored");
    Ok(truncated)
}

/// Where an unlinked file is recreated: its old directory when that still
/// exists, else the job's scratch (`CRYO_SCRATCH`, `TMPDIR`, `/tmp`).
fn unlinked_home(path: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = Path::new(path).parent() {
        if dir.is_dir() {
            out.push(dir.to_owned());
        }
    }
    for var in [cryo_core::env::ENV_SCRATCH, "TMPDIR"] {
        if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(dir));
        }
    }
    out.push(PathBuf::from("/tmp"));
    out
}

/// An unlinked, empty, read-write file in `dir`: `O_TMPFILE` where the
/// file system has it, else a fresh name unlinked at once. A path that
/// names a file is never opened.
fn unlinked_file(dir: &Path) -> io::Result<RawFd> {
    match open(
        dir,
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => return Ok(fd),
        Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
        Err(errno) => return Err(errno.into()),
    }
    for attempt in 0..100u32 {
        let name = dir.join(format!(".cryo-unlinked-{}-{attempt}", std::process::id()));
        match open(
            &name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => {
                let _ = fs::remove_file(&name);
                return Ok(fd);
            }
            Err(Errno::EEXIST) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    Err(io::Error::other("no free temporary name"))
}

/// Recreates an unlinked file from its saved contents and installs it at
/// the saved fd, flags and offset.
fn restore_unlinked(
    record: &RankRecord,
    store: &JobStore,
    fd: &FdRecord,
) -> Result<(), RestoreError> {
    let rank = record.rank;
    let region = record
        .regions
        .iter()
        .find(|r| matches!(r.kind, RegionKind::UnlinkedFile { fd: owner } if owner == fd.fd))
        .ok_or_else(|| {
            file_io(
                rank,
                fd,
                "find saved contents",
                io::Error::other("no saved contents"),
            )
        })?;
    let mut last = None;
    let mut scratch = None;
    for dir in unlinked_home(&fd.path) {
        match unlinked_file(&dir) {
            Ok(raw) => {
                scratch = Some(raw);
                break;
            }
            Err(err) => last = Some(err),
        }
    }
    let raw = scratch.ok_or_else(|| {
        file_io(
            rank,
            fd,
            "create unlinked file",
            last.unwrap_or_else(|| io::Error::other("no directory")),
        )
    })?;
    // SAFETY: `unlinked_file` just returned this fd and nothing else owns it.
    let scratch = unsafe { fs::File::from_raw_fd(raw) };
    write_contents(store, rank, fd, region, &scratch, "the unlinked file at fd")?;
    // A new open file description with the saved access mode and flags,
    // through the fd's magic link, which O_NOFOLLOW (kept from an open by
    // Python's tempfile, say) would refuse with ELOOP; it only guards the
    // open itself and is not a status of the file description.
    let temp = open(
        format!("/proc/self/fd/{}", scratch.as_raw_fd()).as_str(),
        open_flags(fd.flags) - OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|errno| file_io(rank, fd, "reopen", errno.into()))?;
    drop(scratch);
    let target = install(rank, fd, temp)?;
    seek(rank, fd, &target)?;
    std::mem::forget(target);
    tracing::debug!(rank, fd = fd.fd, path = %fd.path, len = region.len, "fd.restored_unlinked");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Seek, Write};

    use cryo_core::format::manifest::{FdKind, WriteStats};

    use super::*;

    fn store() -> JobStore {
        let dir = tempfile::tempdir().unwrap().keep();
        cryo_core::Store::create(dir).unwrap().job("files").unwrap()
    }

    fn record(fds: Vec<FdRecord>) -> RankRecord {
        RankRecord {
            rank: 2,
            node: "n".into(),
            pid: 1,
            fds,
            mappings: vec![],
            regions: vec![],
            stats: WriteStats::default(),
            warnings: Vec::new(),
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
            shares_with: None,
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
        let done = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
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
        restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
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
        let err = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap_err();
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
        let err = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap_err();
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
        restore_files(&rec, &store(), FilePolicy::Keep, &[]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        let _ = nix::unistd::close(781);
    }

    #[test]
    fn a_dup_shares_the_offset_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.log");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut leader = fd_record(782, path.to_str().unwrap(), libc::O_WRONLY, 4, 10);
        leader.restore = FdRestore::Restore;
        let mut dup = leader.clone();
        dup.fd = 783;
        dup.shares_with = Some(782);
        let rec = record(vec![leader, dup]);
        let done = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
        assert_eq!(done.restored, vec![782, 783]);
        // SAFETY: restore_files installed both fds for us; we own them now.
        let (mut a, mut b) = unsafe {
            (
                std::fs::File::from_raw_fd(782),
                std::fs::File::from_raw_fd(783),
            )
        };
        a.write_all(b"ab").unwrap();
        b.write_all(b"cd").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123abcd89");
    }

    #[test]
    fn directories_and_dev_null_come_back_and_a_taken_fd_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inside"), b"x").unwrap();
        let mut dirfd = fd_record(
            784,
            dir.path().to_str().unwrap(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            0,
        );
        dirfd.kind = FdKind::Directory;
        let mut null = fd_record(785, "/dev/null", libc::O_WRONLY, 0, 0);
        null.kind = FdKind::CharDevice;
        restore_files(
            &record(vec![dirfd.clone(), null]),
            &store(),
            FilePolicy::Truncate,
            &[],
        )
        .unwrap();
        let inside =
            nix::fcntl::openat(Some(784), "inside", OFlag::O_RDONLY, Mode::empty()).unwrap();
        let _ = nix::unistd::close(inside);
        // SAFETY: restore_files installed fd 785; it stays open for this test.
        let null_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(785) };
        assert_eq!(nix::unistd::write(null_fd, b"gone").unwrap(), 4);

        // fd 785 is /dev/null now: restoring a file there is refused, and
        // nothing else of that restart is done.
        let other = dir.path().join("other");
        std::fs::write(&other, b"abc").unwrap();
        let mut fresh = fd_record(786, other.to_str().unwrap(), libc::O_RDONLY, 0, 3);
        fresh.restore = FdRestore::Restore;
        let taken = fd_record(785, other.to_str().unwrap(), libc::O_RDONLY, 0, 3);
        let err = restore_files(
            &record(vec![fresh, taken]),
            &store(),
            FilePolicy::Truncate,
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(err, RestoreError::FdTaken { fd: 785, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/dev/null"), "{err}");
        assert!(
            nix::fcntl::fcntl(786, FcntlArg::F_GETFD).is_err(),
            "fd 786 was restored"
        );

        // A directory where a file was is a clear error.
        let mut changed = fd_record(787, dir.path().to_str().unwrap(), libc::O_RDONLY, 0, 0);
        changed.kind = FdKind::Regular;
        let err =
            restore_files(&record(vec![changed]), &store(), FilePolicy::Truncate, &[]).unwrap_err();
        assert!(
            matches!(err, RestoreError::FileChanged { fd: 787, .. }),
            "{err}"
        );
        for fd in [784, 785] {
            let _ = nix::unistd::close(fd);
        }
    }
}
