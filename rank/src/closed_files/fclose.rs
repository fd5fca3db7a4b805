//! The runtime's `fclose`: closes a stream with the C library's, and notes
//! its file when it was open with `O_APPEND` (`fopen(path, "a")`), or when
//! it may be a file of the node read or written otherwise
//! (`node_files.rs`).
//!
//! A program linked with `-lcryo_rank` finds this definition before the C
//! library's (the library comes before libc in the lookup order), so every
//! `fclose` of the program and of the libraries it loads passes here; calls
//! inside the C library itself do not. `close(2)` is left alone: it is
//! called from signal handlers and `vfork` children, where taking a lock
//! or allocating is not allowed.

use std::ffi::{c_int, c_void, CStr};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicPtr, Ordering};

type Fclose = unsafe extern "C" fn(*mut libc::FILE) -> c_int;

static NEXT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The C library's `fclose`: the next definition after ours, else glibc's
/// other name for it.
fn next() -> Option<Fclose> {
    let mut found = NEXT.load(Ordering::Acquire);
    if found.is_null() {
        let lookups: [(*mut c_void, &CStr); 2] = [
            (libc::RTLD_NEXT, c"fclose"),
            (libc::RTLD_DEFAULT, c"_IO_fclose"),
        ];
        for (handle, name) in lookups {
            // SAFETY: dlsym only looks the name up.
            found = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if !found.is_null() {
                break;
            }
        }
        NEXT.store(found, Ordering::Release);
    }
    // SAFETY: a non-null result is the C library's fclose (or its alias),
    // which has this signature.
    (!found.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Fclose>(found) })
}

/// `fclose(3)`: closes the stream and notes its file (see the module).
///
/// # Safety
///
/// `stream` is a stream the caller may close, as for the C library's.
#[no_mangle]
pub unsafe extern "C" fn fclose(stream: *mut libc::FILE) -> c_int {
    let closing = if stream.is_null() {
        None
    } else {
        // SAFETY: a stream the caller owns; fileno only reads it.
        let fd = unsafe { libc::fileno(stream) };
        // A panic must not unwind into C; it only costs the note.
        catch_unwind(|| super::closing(fd, true)).ok().flatten()
    };
    let closed = match next() {
        // SAFETY: forwarded unchanged to the function the caller meant.
        Some(close) => unsafe { close(stream) },
        None => {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::ENOSYS };
            return libc::EOF;
        }
    };
    if let Some(closing) = closing {
        // SAFETY: errno is this thread's; the caller reads fclose's, not
        // that of the note's own calls.
        let errno = unsafe { *libc::__errno_location() };
        let _ = catch_unwind(|| closing.done());
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
    closed
}
