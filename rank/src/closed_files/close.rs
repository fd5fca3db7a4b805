//! The runtime's `close`: notes a file open for appending (`O_APPEND`, for
//! writing) as its last fd closes through `open`/`write`/`close` alone, or
//! a file that may be the node's own read or written otherwise
//! (`node_files.rs`), then closes it with the C library's.
//!
//! `close` may be called from a signal handler, or from a child of `vfork`
//! that shares the parent's memory, where taking a lock or allocating could
//! hang the process. So this path only makes system calls that are safe
//! there (`fcntl`, `fstat`, `fstatfs`, `readlink`, `getpid`) and copies
//! the path, with the file's size, into one of a fixed set of slots with
//! atomic flags (one set for each kind). The checkpoint path
//! ([`drain_appended`], [`drain_node`]) moves the slots into the tables,
//! where the file is measured at the park like any other closed since the
//! last checkpoint. When every slot is taken, the note is dropped and
//! counted (the drains report it).

use std::cell::UnsafeCell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Paths noted and not yet drained, at most.
const SLOTS: usize = 64;
/// The longest path noted (`PATH_MAX`).
const PATH_BYTES: usize = 4096;

const FREE: u8 = 0;
const FILLING: u8 = 1;
const FULL: u8 = 2;

/// The slots: their states and lengths packed together, so that looking
/// for a path already noted touches a few cache lines, not one page per
/// slot.
struct Slots {
    state: [AtomicU8; SLOTS],
    /// The file's device and inode, to find it again without `readlink`.
    dev: [AtomicU64; SLOTS],
    ino: [AtomicU64; SLOTS],
    /// The file's size at its latest close (`fstat` of the fd: a raw fd
    /// buffers nothing, so it is the size after the close).
    size: [AtomicU64; SLOTS],
    /// Open for writing at some close (files of the node).
    written: [AtomicBool; SLOTS],
    len: [AtomicUsize; SLOTS],
    path: [UnsafeCell<[u8; PATH_BYTES]>; SLOTS],
    /// Notes dropped because every slot was taken.
    dropped: AtomicU64,
}

// SAFETY: `path[i]` is written only by the thread that moved `state[i]`
// from FREE to FILLING, and read only after it is FULL (Acquire after the
// writer's Release), by lookers that compare it and by the one drainer
// that then sets it FREE again.
unsafe impl Sync for Slots {}

impl Slots {
    /// The path in slot `i`, which is FULL.
    ///
    /// # Safety
    ///
    /// Slot `i` is FULL and stays so while the slice is used.
    unsafe fn path(&self, i: usize) -> &[u8] {
        let len = self.len[i].load(Ordering::Acquire).min(PATH_BYTES);
        // SAFETY: a FULL slot is not written (the caller's contract).
        unsafe { &(&*self.path[i].get())[..len] }
    }
}

const fn empty() -> Slots {
    Slots {
        state: [const { AtomicU8::new(FREE) }; SLOTS],
        dev: [const { AtomicU64::new(0) }; SLOTS],
        ino: [const { AtomicU64::new(0) }; SLOTS],
        size: [const { AtomicU64::new(0) }; SLOTS],
        written: [const { AtomicBool::new(false) }; SLOTS],
        len: [const { AtomicUsize::new(0) }; SLOTS],
        path: [const { UnsafeCell::new([0; PATH_BYTES]) }; SLOTS],
        dropped: AtomicU64::new(0),
    }
}
/// Files open for appending.
static APPENDED: Slots = empty();
/// Files that may be the node's, read or written otherwise.
static OF_NODE: Slots = empty();

type Close = unsafe extern "C" fn(c_int) -> c_int;
static NEXT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// While the process starts: looks the C library's `close` up, so that no
/// `close` (in a signal handler, say) has to call `dlsym`, and makes this
/// process the one that notes (not a child of `vfork` that calls `close`
/// first in the parent's memory).
extern "C" fn at_start() {
    // SAFETY: dlsym only looks the name up.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"close".as_ptr()) };
    NEXT.store(found, Ordering::Release);
    super::claim_owner();
    super::node_files::learn_store();
}

#[used]
#[link_section = ".init_array"]
static AT_START: extern "C" fn() = at_start;

/// `/proc/self/fd/<fd>` as a NUL-terminated string, without allocating.
pub(crate) fn proc_fd_path(fd: c_int, out: &mut [u8; 32]) {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    out[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[PREFIX.len() + i] = digits[len - 1 - i];
    }
    out[PREFIX.len() + len] = 0;
}

/// Notes `fd`'s file if it is a regular file with a path, open with
/// `O_APPEND` for writing, or one that may be the node's. Only
/// async-signal-safe calls; no lock, no heap.
fn note(fd: c_int) {
    let Some(file) = super::ClosingFile::of(fd) else {
        return;
    };
    if file.cut_back(true).is_some() {
        put(&APPENDED, fd, file.stat(), false, false);
    } else if super::node_files::of_node(fd, &file) {
        put(&OF_NODE, fd, file.stat(), file.written(), true);
    }
}

/// Puts `fd`'s file (`stat`) into a slot of `slots`, or updates the slot
/// that has it. With `of_node`, a path of the system's is left out.
fn put(slots: &Slots, fd: c_int, stat: &libc::stat, written: bool, of_node: bool) {
    // Closed before since the last park: only its size changes.
    let (dev, ino) = (stat.st_dev, stat.st_ino);
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    let update = |i: usize| {
        slots.size[i].store(size, Ordering::Relaxed);
        if written {
            slots.written[i].store(true, Ordering::Relaxed);
        }
    };
    for i in 0..SLOTS {
        if slots.state[i].load(Ordering::Acquire) == FULL
            && slots.dev[i].load(Ordering::Relaxed) == dev
            && slots.ino[i].load(Ordering::Relaxed) == ino
        {
            update(i);
            return;
        }
    }
    let mut link = [0u8; 32];
    proc_fd_path(fd, &mut link);
    let mut path = [0u8; PATH_BYTES];
    // SAFETY: `link` is NUL-terminated; `path` has PATH_BYTES bytes.
    let len = unsafe { libc::readlink(link.as_ptr().cast(), path.as_mut_ptr().cast(), PATH_BYTES) };
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    if len == 0 || len >= PATH_BYTES || path[0] != b'/' {
        return;
    }
    let path = &path[..len];
    if of_node && super::node_files::is_system(path) {
        return;
    }
    for i in 0..SLOTS {
        // SAFETY: read only while FULL; a drainer frees a slot only after
        // reading it, and a stale match only skips a note the table has.
        if slots.state[i].load(Ordering::Acquire) == FULL && unsafe { slots.path(i) } == path {
            update(i);
            return;
        }
    }
    for i in 0..SLOTS {
        if slots.state[i]
            .compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: this thread moved the slot to FILLING: it alone
            // writes it until it is FULL.
            unsafe { (&mut *slots.path[i].get())[..len].copy_from_slice(path) };
            slots.dev[i].store(dev, Ordering::Relaxed);
            slots.ino[i].store(ino, Ordering::Relaxed);
            slots.size[i].store(size, Ordering::Relaxed);
            slots.written[i].store(written, Ordering::Relaxed);
            slots.len[i].store(len, Ordering::Release);
            slots.state[i].store(FULL, Ordering::Release);
            return;
        }
    }
    slots.dropped.fetch_add(1, Ordering::Relaxed);
}

/// `close(2)`: notes the file (see the module), then closes the fd.
///
/// # Safety
///
/// As for the C library's `close`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    note(fd);
    let next = NEXT.load(Ordering::Acquire);
    if next.is_null() {
        // SAFETY: the close system call itself, for a `close` made before
        // the constructor ran.
        let result = unsafe { libc::syscall(libc::SYS_close, fd) };
        // 0 or -1 (with errno set).
        return c_int::try_from(result).unwrap_or(-1);
    }
    // SAFETY: the C library's close, found by `find_next`.
    let next = unsafe { std::mem::transmute::<*mut c_void, Close>(next) };
    // SAFETY: forwarded unchanged to the function the caller meant.
    unsafe { next(fd) }
}

/// The files of the node noted since the last drain, each with whether
/// it was written then (a rename carries them to their new names).
pub(crate) fn noted_node() -> Vec<(String, bool)> {
    (0..SLOTS)
        .filter(|&i| OF_NODE.state[i].load(Ordering::Acquire) == FULL)
        .map(|i| {
            // SAFETY: read only while FULL; a stale note only carries a
            // note the table may have already.
            let noted = unsafe { OF_NODE.path(i) };
            let noted = String::from_utf8_lossy(noted).into_owned();
            (noted, OF_NODE.written[i].load(Ordering::Relaxed))
        })
        .collect()
}

/// The paths of files open for appending noted since the last drain with
/// their sizes at their latest close, and how many notes were dropped.
/// Called under the table's lock: one drainer at a time.
pub(crate) fn drain_appended() -> (Vec<(String, u64)>, u64) {
    let (files, dropped) = drain(&APPENDED);
    let files = files.into_iter().map(|(path, size, _)| (path, size));
    (files.collect(), dropped)
}

/// The paths of files of the node noted since the last drain, each with
/// whether it was written, and how many notes were dropped. One drainer
/// at a time (the checkpoint path).
pub(crate) fn drain_node() -> (Vec<(String, bool)>, u64) {
    let (files, dropped) = drain(&OF_NODE);
    let files = files.into_iter().map(|(path, _, written)| (path, written));
    (files.collect(), dropped)
}

fn drain(slots: &Slots) -> (Vec<(String, u64, bool)>, u64) {
    let mut out = Vec::new();
    for i in 0..SLOTS {
        if slots.state[i].load(Ordering::Acquire) != FULL {
            continue;
        }
        // SAFETY: FULL, and only this drainer frees it, after this read.
        let path = String::from_utf8_lossy(unsafe { slots.path(i) }).into_owned();
        let size = slots.size[i].load(Ordering::Relaxed);
        let written = slots.written[i].swap(false, Ordering::Relaxed);
        slots.state[i].store(FREE, Ordering::Release);
        out.push((path, size, written));
    }
    (out, slots.dropped.swap(0, Ordering::Relaxed))
}
