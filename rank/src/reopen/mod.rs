//! A restarted rank's set-up opening its output again.
//!
//! A restarted rank runs `main` again, set-up included. A program that
//! opens its log with `fopen(path, "w")` (or `open` with `O_TRUNC`) at every
//! start, instead of keeping the fd in a region as the README advises,
//! would empty on a restart the file the runtime has just given back: every
//! line written before the checkpoint would be lost, and its writes would
//! start at the top. So from the end of `cryo_init` to the rank's first
//! safe point (its set-up), an open for writing of a regular file that the
//! rank held open for writing at the checkpoint is answered with the fd
//! the runtime restored for it: the file as it was at the checkpoint, at
//! the offset it had, which is where the uninterrupted run went on
//! writing. Each restored fd is given once; its close-on-exec and append
//! flags become the ones asked for. Anything else (another file, a read,
//! `O_EXCL`, a path through `/proc` or `/dev`, an open after the first safe
//! point) is the C library's, unchanged. A file the set-up cut all the
//! same (an open the runtime does not see or cannot answer) is named at the
//! first safe point: what the rank wrote to it before the checkpoint is
//! lost.
//!
//! A program linked with `-lcryo_rank` finds these definitions of `open`,
//! `open64`, `openat`, `openat64`, `creat`, `creat64` (and the `__open_2`
//! family that `_FORTIFY_SOURCE` calls; `opens.rs`), `fopen`, `fopen64`,
//! `freopen` and `freopen64` (`stdio.rs`) before the C library's, as it
//! does `close` (`closed_files`).
//! gfortran's OPEN is not handed a restored fd (`gfortran.rs` says when one
//! runs): a unit counts its position from zero whatever the fd's offset.
//! Instead a unit it connects at its start to such a file is moved to the
//! restored fd's offset afterwards ([`fortran_unit_offset`]). In a program linked with
//! libgfortran before the runtime, where a unit's OPEN cannot be told from
//! C's, no open of the runtime's is answered (the cut files are still
//! named, and `cryo_init` warns of the link order).

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::Mutex;

use cryo_core::format::manifest::{FdKind, FdRestore, RankRecord};

use crate::interpose::next;

mod opens;
mod stdio;

/// Whether the set-up's window is open: one load, for every open and
/// every safe point.
static WINDOW: AtomicBool = AtomicBool::new(false);
/// Whether the runtime's own `open`, `fopen`… answer in the window: not
/// when gfortran's OPEN bypasses `gfortran.rs` (libgfortran linked before
/// `-lcryo_rank`), since a unit's open could not be told from C's then.
static C_OPENS: AtomicBool = AtomicBool::new(true);

/// A restored fd that an open of its file may be given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Offer {
    fd: c_int,
    dev: u64,
    ino: u64,
    /// `O_WRONLY` or `O_RDWR`.
    access: c_int,
    /// The file's size once restored.
    size: u64,
    /// Its path at the checkpoint, for people.
    path: String,
}

static OFFERS: Mutex<Vec<Offer>> = Mutex::new(Vec::new());
/// This rank, for the warnings.
static RANK: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Set while gfortran's OPEN runs on this thread.
    static IN_FORTRAN_OPEN: Cell<bool> = const { Cell::new(false) };
}

/// Opens the window after a restart: the fds of `record` restored on
/// their own (not as another's `dup`) that hold a regular file open for
/// writing.
pub(crate) fn offer(record: &RankRecord) {
    let held = (record.fds.iter())
        .filter(|fd| {
            fd.kind == FdKind::Regular
                && fd.restore == FdRestore::Restore
                && fd.shares_with.is_none()
                && crate::files::is_writable(fd.flags)
        })
        .map(|fd| (fd.fd, fd.flags, fd.path.clone()));
    offer_fds(record.rank, held);
}

/// Opens the window for the restored `(fd, flags, path)` given.
fn offer_fds(rank: u32, held: impl IntoIterator<Item = (c_int, c_int, String)>) {
    let offers: Vec<Offer> = (held.into_iter())
        .filter_map(|(fd, flags, path)| {
            let stat = nix::sys::stat::fstat(fd).ok()?;
            Some(Offer {
                fd,
                dev: stat.st_dev,
                ino: stat.st_ino,
                access: flags & libc::O_ACCMODE,
                size: u64::try_from(stat.st_size).unwrap_or(0),
                path,
            })
        })
        .collect();
    if offers.is_empty() {
        return;
    }
    tracing::debug!(rank, fds = ?offers.iter().map(|o| o.fd).collect::<Vec<_>>(), "reopen.offered");
    C_OPENS.store(!crate::gfortran::bypassed(), Ordering::Relaxed);
    RANK.store(rank, Ordering::Relaxed);
    *OFFERS.lock().unwrap_or_else(|e| e.into_inner()) = offers;
    WINDOW.store(true, Ordering::Release);
}

/// Closes the window (the first safe point, `cryo_finalize`), and names
/// each file the set-up emptied or cut otherwise (an open the runtime
/// could not answer: gfortran's, Python's, a wider access): what the rank
/// wrote to it before the checkpoint is lost.
#[inline]
pub(crate) fn close_window() {
    if WINDOW.load(Ordering::Relaxed) {
        WINDOW.store(false, Ordering::Release);
        let offers = std::mem::take(&mut *OFFERS.lock().unwrap_or_else(|e| e.into_inner()));
        for line in cut_by_set_up(&offers) {
            let rank = RANK.load(Ordering::Relaxed);
            tracing::warn!(rank, warning = %line, "reopen.cut_by_set_up");
            cryo_core::say!("cryo: rank {rank}: WARNING: {line}");
        }
    }
}

/// What the set-up cut or replaced of the files `offers` were restored on.
fn cut_by_set_up(offers: &[Offer]) -> Vec<String> {
    let mut lines = Vec::new();
    for offer in offers {
        let Ok(stat) = nix::sys::stat::fstat(offer.fd) else {
            continue;
        };
        if (stat.st_dev, stat.st_ino) != (offer.dev, offer.ino) {
            // The set-up closed it: the number is another file's now.
            continue;
        }
        let at_path = nix::sys::stat::stat(offer.path.as_str())
            .ok()
            .map(|now| (now.st_dev, now.st_ino));
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let what = if stat.st_nlink == 0 || at_path != Some((offer.dev, offer.ino)) {
            // Deleted and made again (a log rotated, `rm` and a new open).
            "was deleted or replaced by a new file".to_owned()
        } else if size < offer.size {
            format!("was cut to {size} bytes")
        } else {
            continue;
        };
        lines.push(format!(
            "{} (held open for writing at the checkpoint, {} bytes) {what} by the restarted \
             program before its first safe point: what it wrote before the checkpoint is \
             lost. Open it for appending (fopen \"a\", Fortran position='append', Python \
             \"a\"), or keep its fd in a region (README, \"What a restart gives back\")",
            offer.path, offer.size
        ));
    }
    lines
}

/// Where a gfortran unit just connected to `fd` at its start is to go on
/// writing, if the window is open and `fd` holds a file the rank held open
/// for writing at the checkpoint: the restored fd's offset (past zero), as
/// the uninterrupted run went on there. Not if the OPEN cut the file
/// (`status='replace'` opens it with `O_TRUNC`): moved there, the unit would
/// leave zeros before its first record; the window's close names it
/// instead. The offer is used up.
pub(crate) fn fortran_unit_offset(fd: c_int) -> Option<i64> {
    if !WINDOW.load(Ordering::Acquire) {
        return None;
    }
    let stat = nix::sys::stat::fstat(fd).ok()?;
    let file = (stat.st_dev, stat.st_ino);
    let mut offers = OFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let at = offers
        .iter()
        .position(|o| (o.dev, o.ino) == file && identity(o.fd) == Some(file))?;
    // SAFETY: lseek on a restored fd of this process; it only reads the
    // offset.
    let offset = unsafe { libc::lseek(offers[at].fd, 0, libc::SEEK_CUR) };
    if offset <= 0 || stat.st_size < offset {
        return None;
    }
    offers.remove(at);
    Some(offset)
}

/// Runs gfortran's OPEN (`f`) with the window shut to it.
pub(crate) fn in_fortran_open<T>(f: impl FnOnce() -> T) -> T {
    let before = IN_FORTRAN_OPEN.with(|c| c.replace(true));
    let out = f();
    IN_FORTRAN_OPEN.with(|c| c.set(before));
    out
}

/// Whether the set-up's window is open.
pub(crate) fn window_open() -> bool {
    WINDOW.load(Ordering::Acquire)
}

/// The device and inode of the file open at `fd`.
fn identity(fd: c_int) -> Option<(u64, u64)> {
    let stat = nix::sys::stat::fstat(fd).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// `path` (relative to `dirfd`) and its `stat`, if it names a regular file
/// other than through `/proc` or `/dev`.
fn regular_file<'a>(
    dirfd: c_int,
    path: *const c_char,
) -> Option<(&'a CStr, nix::sys::stat::FileStat)> {
    if path.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated path, as for the C library's open; the
    // caller's, alive for the call.
    let path = unsafe { CStr::from_ptr(path) };
    let bytes = path.to_bytes();
    if bytes.starts_with(b"/proc/") || bytes.starts_with(b"/dev/") {
        return None;
    }
    let stat = nix::sys::stat::fstatat(Some(dirfd), path, nix::fcntl::AtFlags::empty()).ok()?;
    (stat.st_mode & libc::S_IFMT == libc::S_IFREG).then_some((path, stat))
}

/// The flags gfortran's OPEN is to open `path` (relative to `dirfd`) with
/// in the window: without `O_TRUNC` when they would empty a file the rank
/// held open for writing at the checkpoint (`status='replace'`), as a C
/// open would be given the file; `gfortran.rs` then moves the unit to the
/// restored offset ([`fortran_unit_offset`]).
pub(super) fn fortran_flags(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    if flags & libc::O_TRUNC == 0
        || !WINDOW.load(Ordering::Acquire)
        || !IN_FORTRAN_OPEN.with(Cell::get)
    {
        return flags;
    }
    let held = std::panic::catch_unwind(|| {
        let (_, stat) = regular_file(dirfd, path)?;
        let offers = OFFERS.lock().unwrap_or_else(|e| e.into_inner());
        let file = (stat.st_dev, stat.st_ino);
        offers
            .iter()
            .any(|o| (o.dev, o.ino) == file && identity(o.fd) == Some(file))
            .then_some(())
    });
    if matches!(held, Ok(Some(()))) {
        tracing::info!(flags, "reopen.fortran_open_not_truncated");
        flags & !libc::O_TRUNC
    } else {
        flags
    }
}

/// The restored fd to give an open of `path` (relative to `dirfd`) with
/// `flags` in the window, if any; it then has the flags asked for.
fn claim(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<c_int> {
    let access = flags & libc::O_ACCMODE;
    if !matches!(access, libc::O_WRONLY | libc::O_RDWR)
        || flags & (libc::O_EXCL | libc::O_TMPFILE | libc::O_DIRECTORY | libc::O_PATH) != 0
        || IN_FORTRAN_OPEN.with(Cell::get)
    {
        return None;
    }
    let (path, stat) = regular_file(dirfd, path)?;
    let mut offers = OFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let at = offers.iter().position(|o| {
        o.dev == stat.st_dev
            && o.ino == stat.st_ino
            && (o.access == libc::O_RDWR || o.access == access)
            // The set-up may have closed it, and the number been reused.
            && identity(o.fd) == Some((o.dev, o.ino))
    })?;
    let offer = offers.remove(at);
    drop(offers);
    // SAFETY: fcntl on an fd of this process, which the runtime restored.
    unsafe {
        let status = libc::fcntl(offer.fd, libc::F_GETFL);
        if status >= 0 {
            let status = (status & !libc::O_APPEND) | (flags & libc::O_APPEND);
            libc::fcntl(offer.fd, libc::F_SETFL, status);
        }
        let cloexec = if flags & libc::O_CLOEXEC != 0 {
            libc::FD_CLOEXEC
        } else {
            0
        };
        libc::fcntl(offer.fd, libc::F_SETFD, cloexec);
    }
    tracing::info!(
        fd = offer.fd,
        path = %path.to_string_lossy(),
        "reopen.given_restored_fd"
    );
    Some(offer.fd)
}

/// The fd the runtime restored for `path`, if a restarted rank's set-up
/// opening it with `flags` is to be given it (see the module); else -1.
/// `cryo_reopen_restored`, for callers whose opens the runtime does not see
/// (the Python package wraps `open` with it until the first safe point).
pub(crate) fn restored_for(path: *const c_char, flags: c_int) -> c_int {
    if !WINDOW.load(Ordering::Acquire) {
        return -1;
    }
    claim_caught(libc::AT_FDCWD, path, flags).unwrap_or(-1)
}

/// The restored fd to give an open of the runtime's own definitions, if
/// the window is open to them and one fits.
#[inline]
pub(super) fn claimed(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<c_int> {
    if !WINDOW.load(Ordering::Acquire) || !C_OPENS.load(Ordering::Relaxed) {
        return None;
    }
    claim_caught(dirfd, path, flags)
}

/// [`claim`], where a panic only costs the claim: it must not unwind into C.
fn claim_caught(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<c_int> {
    std::panic::catch_unwind(|| claim(dirfd, path, flags))
        .ok()
        .flatten()
}

/// The C library's definition of `name` (the next after ours) as an `F`,
/// or None if there is none.
///
/// # Safety
///
/// `F` must be the function pointer type of the C library's `name`.
pub(super) unsafe fn next_as<F: Copy>(slot: &AtomicPtr<c_void>, name: &CStr) -> Option<F> {
    let found = next(slot, name);
    // SAFETY: the caller vouches that `name` has the signature `F`; a
    // function pointer is the size of a data pointer on Linux.
    (!found.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&found) })
}

#[cfg(test)]
mod tests;
