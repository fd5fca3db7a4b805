//! The runtime's definitions of C library functions (`close`, `fclose`,
//! `rename`, `open`, `fopen`…) run first in a program linked with
//! `-lcryo_rank`, and then call the C library's: the next definition of the
//! name after ours, found once with `dlsym(RTLD_NEXT)`.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

/// The C library's definition of `name` (the next after ours), looked up
/// once into `slot`; null if there is none.
pub(crate) fn next(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let mut found = slot.load(Ordering::Acquire);
    if found.is_null() {
        // SAFETY: dlsym only looks the name up.
        found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        slot.store(found, Ordering::Release);
    }
    found
}
