//! The runtime's `fopen`, `fopen64`, `freopen` and `freopen64`: a stream
//! opened in the restart's window on a file the rank held open for writing
//! continues it (see the module above); any other is the C library's.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::AtomicPtr;

use super::{claimed, next_as};
use crate::interpose::next;

/// `open(2)`'s flags for a `fopen` mode that writes, if it does.
pub(super) fn fopen_flags(mode: *const c_char) -> Option<c_int> {
    if mode.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated mode, as for the C library's fopen.
    let mode = unsafe { CStr::from_ptr(mode) }.to_bytes();
    let mut flags = match mode.first()? {
        b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        b'r' => libc::O_RDONLY,
        _ => return None,
    };
    // The options end at a ',' (",ccs=…").
    for &c in mode[1..].iter().take_while(|&&c| c != b',') {
        match c {
            b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
            b'e' => flags |= libc::O_CLOEXEC,
            b'x' => flags |= libc::O_EXCL,
            _ => {}
        }
    }
    Some(flags)
}

type Fopen = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;
type Freopen =
    unsafe extern "C" fn(*const c_char, *const c_char, *mut libc::FILE) -> *mut libc::FILE;

static NEXT_FOPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_FOPEN64: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_FREOPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_FREOPEN64: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The definitions these forward to, looked up as the library loads (see
/// `opens.rs`).
extern "C" fn at_start() {
    for (slot, name) in [
        (&NEXT_FOPEN, c"fopen"),
        (&NEXT_FOPEN64, c"fopen64"),
        (&NEXT_FREOPEN, c"freopen"),
        (&NEXT_FREOPEN64, c"freopen64"),
    ] {
        next(slot, name);
    }
}

#[used]
#[link_section = ".init_array"]
static AT_START: extern "C" fn() = at_start;

/// Opens as `fopen(3)` does: a stream on a restored fd in the window, else
/// the C library's `name` (`fopen` or `fopen64`).
fn fopen_with(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    path: *const c_char,
    mode: *const c_char,
) -> *mut libc::FILE {
    if let Some(fd) = fopen_flags(mode).and_then(|flags| claimed(libc::AT_FDCWD, path, flags)) {
        // SAFETY: a restored fd of this process, and the caller's mode ("w"
        // on an fd does not truncate).
        let stream = unsafe { libc::fdopen(fd, mode) };
        if !stream.is_null() {
            return stream;
        }
    }
    // SAFETY: the C library's fopen and fopen64 have this signature.
    let Some(open) = (unsafe { next_as::<Fopen>(slot, name) }) else {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return std::ptr::null_mut();
    };
    // SAFETY: forwarded unchanged to the function the caller meant.
    unsafe { open(path, mode) }
}

/// Reopens as `freopen(3)` does (`freopen` or `freopen64` as `name`). The
/// C library's opens the file inside, where the runtime's `open` does not
/// see it, so a mode that empties the file ("w", "w+") given a file held
/// in the window is asked for as its appending form instead ("a", "a+":
/// the same access, nothing cut), and the new fd is then set to write
/// where the restored one was, as the uninterrupted run went on writing.
/// The restored fd is closed unless the stream now has its number (a
/// restored stdout reopened on its file).
fn freopen_with(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    path: *const c_char,
    mode: *const c_char,
    stream: *mut libc::FILE,
) -> *mut libc::FILE {
    // SAFETY: the C library's freopen and freopen64 have this signature.
    let Some(reopen) = (unsafe { next_as::<Freopen>(slot, name) }) else {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return std::ptr::null_mut();
    };
    let held = (fopen_flags(mode).filter(|flags| flags & libc::O_TRUNC != 0))
        .and_then(|flags| Some((flags, appending_form(mode)?)))
        .and_then(|(flags, appending)| Some((claimed(libc::AT_FDCWD, path, flags)?, appending)));
    let Some((kept, appending)) = held else {
        // SAFETY: forwarded unchanged to the function the caller meant.
        return unsafe { reopen(path, mode, stream) };
    };
    // Read first: the C library closes the stream's fd, which may be it.
    // SAFETY: lseek on a restored fd of this process.
    let at = unsafe { libc::lseek(kept, 0, libc::SEEK_CUR) };
    // SAFETY: the caller's path and stream, with a mode of the same access.
    let reopened = unsafe { reopen(path, appending.as_ptr(), stream) };
    if reopened.is_null() {
        return reopened;
    }
    // SAFETY: fileno, fcntl and lseek on the stream just opened, which
    // has flushed nothing yet; close on the restored fd it replaces.
    unsafe {
        let fd = libc::fileno(reopened);
        let status = libc::fcntl(fd, libc::F_GETFL);
        if status >= 0 {
            libc::fcntl(fd, libc::F_SETFL, status & !libc::O_APPEND);
        }
        if at >= 0 {
            libc::lseek(fd, at, libc::SEEK_SET);
        }
        if fd != kept {
            libc::close(kept);
        }
    }
    reopened
}

/// `mode` with its leading 'w' made an 'a' ("w+b" → "a+b").
pub(super) fn appending_form(mode: *const c_char) -> Option<CString> {
    if mode.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated mode, as for the C library's freopen.
    let mut bytes = unsafe { CStr::from_ptr(mode) }.to_bytes().to_vec();
    *bytes.first_mut().filter(|c| **c == b'w')? = b'a';
    CString::new(bytes).ok()
}

/// `freopen(3)`: see the module.
///
/// # Safety
///
/// As for the C library's `freopen`.
#[no_mangle]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut libc::FILE,
) -> *mut libc::FILE {
    freopen_with(&NEXT_FREOPEN, c"freopen", path, mode, stream)
}

/// `freopen64`: as `freopen`.
///
/// # Safety
///
/// As for the C library's `freopen64`.
#[no_mangle]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut libc::FILE,
) -> *mut libc::FILE {
    freopen_with(&NEXT_FREOPEN64, c"freopen64", path, mode, stream)
}

/// `fopen(3)`: see the module.
///
/// # Safety
///
/// As for the C library's `fopen`.
#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    fopen_with(&NEXT_FOPEN, c"fopen", path, mode)
}

/// `fopen64`: as `fopen`.
///
/// # Safety
///
/// As for the C library's `fopen64`.
#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    fopen_with(&NEXT_FOPEN64, c"fopen64", path, mode)
}
