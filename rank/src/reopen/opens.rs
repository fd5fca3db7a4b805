//! The runtime's `open`, `open64`, `openat`, `openat64`, `creat`,
//! `creat64` and the fortified `__open_2` family (`_FORTIFY_SOURCE`): each
//! answers an open in the restart's window with a restored fd (see the
//! module above), and otherwise forwards to the C library's.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::AtomicPtr;

use super::{claimed, fortran_flags, next_as};
use crate::interpose::next;

type Open = unsafe extern "C" fn(*const c_char, c_int, libc::mode_t) -> c_int;
type OpenAt = unsafe extern "C" fn(c_int, *const c_char, c_int, libc::mode_t) -> c_int;
type Creat = unsafe extern "C" fn(*const c_char, libc::mode_t) -> c_int;

static NEXT_OPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPEN64: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPENAT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPENAT64: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_CREAT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_CREAT64: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPEN_2: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPEN64_2: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPENAT_2: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_OPENAT64_2: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Every definition these forward to, looked up as the library loads, so
/// that no open has to call `dlsym` (whose allocations a memory hook of
/// the MPI library may answer with an open of its own).
extern "C" fn at_start() {
    for (slot, name) in [
        (&NEXT_OPEN, c"open"),
        (&NEXT_OPEN64, c"open64"),
        (&NEXT_OPENAT, c"openat"),
        (&NEXT_OPENAT64, c"openat64"),
        (&NEXT_CREAT, c"creat"),
        (&NEXT_CREAT64, c"creat64"),
        (&NEXT_OPEN_2, c"__open_2"),
        (&NEXT_OPEN64_2, c"__open64_2"),
        (&NEXT_OPENAT_2, c"__openat_2"),
        (&NEXT_OPENAT64_2, c"__openat64_2"),
    ] {
        next(slot, name);
    }
}

#[used]
#[link_section = ".init_array"]
static AT_START: extern "C" fn() = at_start;

/// `openat(2)` itself, for a process where no C library's definition
/// was found.
fn sys_openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    // SAFETY: the system call, with the caller's arguments.
    let fd = unsafe { libc::syscall(libc::SYS_openat, dirfd, path, flags, mode) };
    c_int::try_from(fd).unwrap_or(-1)
}

// The C library declares `open` and `openat` variadic: the mode is there
// only with O_CREAT or O_TMPFILE. On the Linux ABIs a variadic integer
// argument travels where a fixed one does, so these take it as a fixed
// `mode_t` and pass it on; like the C library, nothing reads it otherwise.

/// `open(2)`: see the module.
///
/// # Safety
///
/// As for the C library's `open`.
#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    open_named(&NEXT_OPEN, c"open", path, flags, mode)
}

/// `open64`: see the module.
///
/// # Safety
///
/// As for the C library's `open64`.
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    open_named(&NEXT_OPEN64, c"open64", path, flags, mode)
}

fn open_named(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    if let Some(fd) = claimed(libc::AT_FDCWD, path, flags) {
        return fd;
    }
    let flags = fortran_flags(libc::AT_FDCWD, path, flags);
    // SAFETY: the C library's open and open64 have this signature.
    match unsafe { next_as::<Open>(slot, name) } {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(open) => unsafe { open(path, flags, mode) },
        None => sys_openat(libc::AT_FDCWD, path, flags, mode),
    }
}

/// `openat(2)`: see the module.
///
/// # Safety
///
/// As for the C library's `openat`.
#[no_mangle]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    openat_named(&NEXT_OPENAT, c"openat", dirfd, path, flags, mode)
}

/// `openat64`: see the module.
///
/// # Safety
///
/// As for the C library's `openat64`.
#[no_mangle]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    openat_named(&NEXT_OPENAT64, c"openat64", dirfd, path, flags, mode)
}

fn openat_named(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    if let Some(fd) = claimed(dirfd, path, flags) {
        return fd;
    }
    let flags = fortran_flags(dirfd, path, flags);
    // SAFETY: the C library's openat and openat64 have this signature.
    match unsafe { next_as::<OpenAt>(slot, name) } {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(open) => unsafe { open(dirfd, path, flags, mode) },
        None => sys_openat(dirfd, path, flags, mode),
    }
}

/// `creat(2)`: `open` for writing, created and emptied.
///
/// # Safety
///
/// As for the C library's `creat`.
#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    creat_named(&NEXT_CREAT, c"creat", path, mode)
}

/// `creat64`: as `creat`.
///
/// # Safety
///
/// As for the C library's `creat64`.
#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: libc::mode_t) -> c_int {
    creat_named(&NEXT_CREAT64, c"creat64", path, mode)
}

fn creat_named(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    path: *const c_char,
    mode: libc::mode_t,
) -> c_int {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
    if let Some(fd) = claimed(libc::AT_FDCWD, path, flags) {
        return fd;
    }
    // SAFETY: the C library's creat and creat64 have this signature.
    match unsafe { next_as::<Creat>(slot, name) } {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(creat) => unsafe { creat(path, mode) },
        None => sys_openat(libc::AT_FDCWD, path, flags, mode),
    }
}

type Open2 = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
type OpenAt2 = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;

/// `__open_2`, which `open` becomes with `_FORTIFY_SOURCE` when its flags
/// are not known at compile time: see the module.
///
/// # Safety
///
/// As for the C library's `__open_2`.
#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    fortified_open(&NEXT_OPEN_2, c"__open_2", path, flags)
}

/// `__open64_2`: as `__open_2`.
///
/// # Safety
///
/// As for the C library's `__open64_2`.
#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    fortified_open(&NEXT_OPEN64_2, c"__open64_2", path, flags)
}

/// `__openat_2`: as `__open_2`, relative to `dirfd`.
///
/// # Safety
///
/// As for the C library's `__openat_2`.
#[no_mangle]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    fortified_openat(&NEXT_OPENAT_2, c"__openat_2", dirfd, path, flags)
}

/// `__openat64_2`: as `__openat_2`.
///
/// # Safety
///
/// As for the C library's `__openat64_2`.
#[no_mangle]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    fortified_openat(&NEXT_OPENAT64_2, c"__openat64_2", dirfd, path, flags)
}

/// `__open_2` and `__open64_2` (no mode: they refuse O_CREAT, which needs
/// one).
fn fortified_open(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    path: *const c_char,
    flags: c_int,
) -> c_int {
    if let Some(fd) = claimed(libc::AT_FDCWD, path, flags) {
        return fd;
    }
    // SAFETY: the C library's __open_2 and __open64_2 have this signature.
    match unsafe { next_as::<Open2>(slot, name) } {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(open) => unsafe { open(path, flags) },
        None => sys_openat(libc::AT_FDCWD, path, flags, 0),
    }
}

/// `__openat_2` and `__openat64_2`, as [`fortified_open`].
fn fortified_openat(
    slot: &AtomicPtr<c_void>,
    name: &CStr,
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
) -> c_int {
    if let Some(fd) = claimed(dirfd, path, flags) {
        return fd;
    }
    // SAFETY: the C library's __openat_2 and __openat64_2 have this
    // signature.
    match unsafe { next_as::<OpenAt2>(slot, name) } {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(open) => unsafe { open(dirfd, path, flags) },
        None => sys_openat(dirfd, path, flags, 0),
    }
}
