//! Re-opening a rank's files at restart: same path, flags, fd number and
//! offset, with files opened for writing cut back to their size at the
//! checkpoint so that output after a restart is byte-identical to an
//! uninterrupted run; fds that shared an open file description share one
//! again; unlinked files come back unlinked, from their saved contents;
//! a file whose contents were saved (written in place, or written on a
//! filesystem of its node) is made again where it is missing; directories
//! and the portable devices come back by path.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cryo_core::format::fds::{saved_region, SavedFiles};
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
    /// Files missing here and made again from their saved contents, and
    /// the working directory if it was made again.
    pub recreated: Vec<String>,
    /// Files found shorter than their offset at the checkpoint (cut by
    /// something else since) and filled again from their saved contents.
    pub refilled: Vec<String>,
}

/// Whether status flags `flags` (`F_GETFL`, fdinfo) open a file for writing.
pub(crate) fn is_writable(flags: i32) -> bool {
    matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

/// Returns the rank to its working directory, then restores every fd of
/// `record` marked [`FdRestore::Restore`]: each open
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
        .filter(|fd| matches!(fd.restore, FdRestore::Restore | FdRestore::ReopenOf(_)))
        .collect();
    let saved = SavedFiles::of(&record.fds, record.regions.iter().map(|r| &r.kind));
    let fd_limit = crate::floor::make_room(record);
    // Check every fd first, so that a refused restart changes nothing.
    let mut missing: Vec<&FdRecord> = Vec::new();
    for fd in &wanted {
        if u64::try_from(fd.fd).is_ok_and(|number| number >= fd_limit) {
            return Err(file_io(
                record.rank,
                fd,
                "reserve fd",
                io::Error::other(format!(
                    "the fd number is not below this process's limit on open files ({fd_limit}, \
                     as far as its hard limit lets it be raised): raise the limit (ulimit -n) \
                     where the job restarts"
                )),
            ));
        }
        if reserved.contains(&fd.fd) {
            return Err(file_io(
                record.rank,
                fd,
                "reserve fd",
                io::Error::other("the fd number is used by the cryo runtime"),
            ));
        }
        let identity = if fd.shares_with.is_some() || fd.restore != FdRestore::Restore {
            None
        } else {
            let made = match fd.kind {
                FdKind::Directory => {
                    saved.make_directory(&fd.path, &record.cwd)
                        || record.process.node_dir(&fd.path).is_some()
                }
                _ => saved.contains(&fd.path),
            };
            let source = check_source(record.rank, fd, made)?;
            if !made && !source.missing {
                crate::file_tails::check(record, fd, policy)?;
            }
            if source.cut_short && !done.refilled.contains(&fd.path) {
                tracing::info!(rank = record.rank, fd = fd.fd, path = %fd.path, "fd.file_cut_short");
                done.refilled.push(fd.path.clone());
            }
            if source.missing && !missing.iter().any(|m| m.path == fd.path) {
                missing.push(fd);
            }
            source.identity
        };
        check_free(record.rank, fd, identity)?;
    }
    // The directories of the node missing here, made again below (the
    // working directory, those held open and those holding what is), get
    // their modes once all is made.
    let missing_dirs = crate::remake::missing_dirs(record);
    // The mask it ran with, for the files it makes from here on (whose
    // own modes are not recorded) and the directories a restart makes.
    if let Some(mask) = record.process.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    // Back to its working directory first: its relative names are the
    // application's, after the restart as before.
    if crate::workdir::return_to(record.rank, &record.cwd)? {
        done.recreated.push(record.cwd.clone());
    }
    done.recreated
        .extend(recreate_missing(record, store, &missing)?);
    let (reopened, wanted): (Vec<&FdRecord>, Vec<&FdRecord>) = wanted
        .into_iter()
        .partition(|fd| matches!(fd.restore, FdRestore::ReopenOf(_)));
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
    // Once the unlinked files they open again are back.
    for fd in reopened {
        if let FdRestore::ReopenOf(of) = fd.restore {
            reopen_unlinked(record.rank, fd, of)?;
            done.restored.push(fd.fd);
        }
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
    crate::remake::directory_modes(record.rank, &missing_dirs)?;
    restore_contents(record, store, &done, policy)?;
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
    fill_file(store, region, file).map_err(|err| match err {
        StreamError::Read(source) => RestoreError::Contents {
            rank,
            what: format!("{what} {} ({})", fd.fd, fd.path),
            source,
        },
        StreamError::Sink(source) => file_io(rank, fd, "write contents", source),
    })
}

/// Streams a saved region into `file` from its start, on the restore
/// threads, and cuts the file to the region's length. Blocks of zeros
/// become holes ([`crate::sparse::write_sparse_at`]): a sparse file comes
/// back sparse, not written out whole.
pub(crate) fn fill_file(
    store: &JobStore,
    region: &RegionRecord,
    file: &fs::File,
) -> Result<(), StreamError<io::Error>> {
    crate::restore_threads::restore(|| {
        store.stream_region(region, 16 << 20, |offset, bytes| {
            crate::sparse::write_sparse_at(file, bytes, offset)
        })
    })?;
    file.set_len(region.len).map_err(StreamError::Sink)
}

/// Makes again, whole, each file whose contents were saved but that was
/// found `missing` here (it was on a filesystem of the node the rank ran
/// on), with its directories, before its fds open it
/// (`crate::remake::whole`: another rank of this node may make it first),
/// and each missing directory held open that is made again anyway
/// (`SavedFiles::make_directory`).
fn recreate_missing(
    record: &RankRecord,
    store: &JobStore,
    missing: &[&FdRecord],
) -> Result<Vec<String>, RestoreError> {
    let mut made: Vec<String> = Vec::new();
    for fd in missing {
        if fd.kind == FdKind::Directory {
            fs::create_dir_all(&fd.path)
                .map_err(|err| file_io(record.rank, fd, "create the missing directory", err))?;
            tracing::info!(rank = record.rank, fd = fd.fd, path = %fd.path, "fd.directory_recreated");
            made.push(fd.path.clone());
            continue;
        }
        // Saved through an fd on it or, mapped too, whole by path.
        let Some(region) = saved_region(record, &fd.path) else {
            return Err(RestoreError::FileVanished {
                rank: record.rank,
                fd: fd.fd,
                path: fd.path.clone(),
            });
        };
        if crate::remake::whole(record, &fd.path, region, store)? {
            tracing::info!(rank = record.rank, fd = fd.fd, path = %fd.path, "fd.file_recreated");
        }
        made.push(fd.path.clone());
    }
    Ok(made)
}

/// Writes back the saved contents of the files whose contents were saved,
/// so that bytes overwritten after the checkpoint are undone and a file
/// cut short gets what it held: every such file the rank writes under
/// [`FilePolicy::Truncate`], only those cut short under `Keep` and among
/// those it only reads. A file made again is whole already.
fn restore_contents(
    record: &RankRecord,
    store: &JobStore,
    done: &FilesRestored,
    policy: FilePolicy,
) -> Result<(), RestoreError> {
    let rank = record.rank;
    for region in &record.regions {
        let RegionKind::FileContents { fd: owner } = region.kind else {
            continue;
        };
        let Some(fd) = record.fds.iter().find(|f| f.fd == owner) else {
            continue;
        };
        // A file made again is whole already. One the rank only reads is
        // written only where it was cut short: one that is there is the
        // user's. (The contents are saved once per file, maybe under an fd
        // open only for reading while another writes it.)
        let refilled = done.refilled.contains(&fd.path);
        let written = record.fds.iter().any(|other| {
            other.path == fd.path && other.restore == FdRestore::Restore && is_writable(other.flags)
        });
        if !done.restored.contains(&owner)
            || done.recreated.contains(&fd.path)
            || ((policy == FilePolicy::Keep || !written) && !refilled)
        {
            continue;
        }
        if fd.flags & (libc::O_APPEND | libc::O_DIRECT) != 0 || !is_writable(fd.flags) {
            // pwrite through an O_APPEND fd appends, whatever its offset;
            // a read-only fd cannot write; an O_DIRECT one takes only
            // buffers, offsets and lengths aligned to the device's blocks.
            let file = fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{owner}"))
                .map_err(|err| file_io(rank, fd, "reopen to write contents", err))?;
            write_contents(store, rank, fd, region, &file, "the contents of fd")?;
        } else {
            // SAFETY: `owner` was just restored and stays open; ManuallyDrop
            // keeps this borrow from closing it.
            let file = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(owner) });
            write_contents(store, rank, fd, region, &file, "the contents of fd")?;
        }
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

/// What [`check_source`] found where an fd is restored from.
#[derive(Debug, Default)]
struct Source {
    /// `(dev, ino)` of the file there, if any.
    identity: Option<(u64, u64)>,
    /// A file whose contents were saved is there but shorter than the
    /// offset the rank had reached in it: it is refilled.
    cut_short: bool,
    /// A regular file whose contents were saved, or a directory made
    /// again with what it holds, is not there: it is made again.
    missing: bool,
}

/// Checks that what an fd is restored from is still there and still the
/// same kind of thing. A missing file whose contents were `saved` (a
/// directory: that holds something made again) is made again, and one cut
/// shorter than its offset is refilled; any other is refused.
fn check_source(rank: u32, fd: &FdRecord, saved: bool) -> Result<Source, RestoreError> {
    let expected = match fd.kind {
        FdKind::Deleted => return Ok(Source::default()),
        FdKind::Directory => "directory",
        FdKind::CharDevice => "character device",
        _ => "regular file",
    };
    let meta = match fs::metadata(&fd.path) {
        Ok(meta) => meta,
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                && saved
                && matches!(fd.kind, FdKind::Regular | FdKind::Directory) =>
        {
            return Ok(Source {
                missing: true,
                ..Source::default()
            })
        }
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
    let short = meta.is_file() && meta.len() < fd.offset;
    if short && !saved {
        return Err(RestoreError::FileShrank {
            rank,
            fd: fd.fd,
            path: fd.path.clone(),
            size: meta.len(),
            offset: fd.offset,
        });
    }
    Ok(Source {
        identity: Some((meta.dev(), meta.ino())),
        cut_short: short,
        missing: false,
    })
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

/// Opens the unlinked file restored at fd `of` again, at `fd`'s number,
/// flags and offset: a second open file description of the same file.
fn reopen_unlinked(rank: u32, fd: &FdRecord, of: RawFd) -> Result<(), RestoreError> {
    let temp = open(
        format!("/proc/self/fd/{of}").as_str(),
        open_flags(fd.flags) - OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|errno| {
        file_io(
            rank,
            fd,
            "reopen through its unlinked file's fd",
            errno.into(),
        )
    })?;
    let target = install(rank, fd, temp)?;
    seek(rank, fd, &target)?;
    std::mem::forget(target);
    tracing::debug!(rank, fd = fd.fd, of, "fd.reopened_unlinked");
    Ok(())
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
