//! The runtime's `rename` and `renameat`: rename with the C library's, and
//! carry a noted file of the node (`node_files.rs`) to its new name. A code
//! that writes its output under a temporary name, closes it and renames it
//! into place (`out.tmp` → `out.dat`) closed a file whose name is gone by
//! the checkpoint.
//!
//! A directory renamed carries the notes of the files under it (results
//! written to `out.tmp/`, renamed `out/`). Only a successful rename is
//! carried; the note never blocks (a rename from a signal
//! handler that interrupted the noting is not carried).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicPtr;

use crate::interpose::next;

type Rename = unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
type RenameAt = unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char) -> c_int;

static NEXT_RENAME: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_RENAMEAT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// `path` (relative to `dir`, an fd or `AT_FDCWD`) as an absolute path.
fn absolute(dir: c_int, path: *const c_char) -> Option<PathBuf> {
    // SAFETY: a NUL-terminated string, as the caller of rename passed it.
    let path = Path::new(std::ffi::OsStr::from_bytes(
        unsafe { CStr::from_ptr(path) }.to_bytes(),
    ));
    if path.is_absolute() {
        return Some(path.to_owned());
    }
    let base = if dir == libc::AT_FDCWD {
        std::env::current_dir().ok()?
    } else {
        std::fs::read_link(format!("/proc/self/fd/{dir}")).ok()?
    };
    Some(base.join(path))
}

/// After a successful rename: carries the note of `old` to `new`.
fn carry(old_dir: c_int, old: *const c_char, new_dir: c_int, new: *const c_char) {
    if old.is_null() || new.is_null() {
        return;
    }
    let (Some(old), Some(new)) = (absolute(old_dir, old), absolute(new_dir, new)) else {
        return;
    };
    if let (Some(old), Some(new)) = (old.to_str(), new.to_str()) {
        super::node_files::renamed(old, new);
    }
}

/// `rename(2)`: renames with the C library's, then carries the note.
///
/// # Safety
///
/// As for the C library's `rename`.
#[no_mangle]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    let found = next(&NEXT_RENAME, c"rename");
    if found.is_null() {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: the C library's rename, which has this signature.
    let rename = unsafe { std::mem::transmute::<*mut c_void, Rename>(found) };
    // SAFETY: forwarded unchanged to the function the caller meant.
    let result = unsafe { rename(old, new) };
    if result == 0 {
        let _ = catch_unwind(|| carry(libc::AT_FDCWD, old, libc::AT_FDCWD, new));
    }
    result
}

/// `renameat(2)`: renames with the C library's, then carries the note.
///
/// # Safety
///
/// As for the C library's `renameat`.
#[no_mangle]
pub unsafe extern "C" fn renameat(
    old_dir: c_int,
    old: *const c_char,
    new_dir: c_int,
    new: *const c_char,
) -> c_int {
    let found = next(&NEXT_RENAMEAT, c"renameat");
    if found.is_null() {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: the C library's renameat, which has this signature.
    let renameat = unsafe { std::mem::transmute::<*mut c_void, RenameAt>(found) };
    // SAFETY: forwarded unchanged to the function the caller meant.
    let result = unsafe { renameat(old_dir, old, new_dir, new) };
    if result == 0 {
        let _ = catch_unwind(|| carry(old_dir, old, new_dir, new));
    }
    result
}
