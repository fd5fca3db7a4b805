//! The C API declared in `include/cryo.h`.
//!
//! Every function returns a `cryo_status` code and never unwinds: a panic is
//! caught and reported as `CRYO_ERR_PANIC`. The last error's full message is
//! kept per thread and returned by [`cryo_strerror`] for that code.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::{runtime, Backing, InitError, RegionError, SafePoint};

/// Success.
pub const CRYO_OK: c_int = 0;
/// A null pointer, bad UTF-8 or another bad argument.
pub const CRYO_ERR_INVALID_ARGUMENT: c_int = 1;
/// `cryo_init` has not been called.
pub const CRYO_ERR_NOT_INITIALIZED: c_int = 2;
/// `cryo_init` was already called.
pub const CRYO_ERR_ALREADY_INITIALIZED: c_int = 3;
/// The node agent could not be reached or refused us.
pub const CRYO_ERR_AGENT: c_int = 4;
/// A region could not be created or registered.
pub const CRYO_ERR_REGION: c_int = 5;
/// Restoring from a checkpoint failed.
pub const CRYO_ERR_RESTORE: c_int = 6;
/// A safe point failed.
pub const CRYO_ERR_CHECKPOINT: c_int = 7;
/// A bug: the runtime panicked.
pub const CRYO_ERR_PANIC: c_int = 8;
/// A bad environment variable or configuration.
pub const CRYO_ERR_CONFIG: c_int = 9;

/// `cryo_checkpoint_point`: no checkpoint was pending.
pub const CRYO_CONTINUE: c_int = 0;
/// `cryo_checkpoint_point`: the rank was checkpointed and resumed.
pub const CRYO_CHECKPOINTED: c_int = 1;
/// `cryo_checkpoint_point`: the agent abandoned the checkpoint.
pub const CRYO_ABORTED: c_int = 2;

thread_local! {
    static LAST_ERROR: RefCell<Option<(c_int, CString)>> = const { RefCell::new(None) };
}

fn generic(code: c_int) -> &'static CStr {
    match code {
        CRYO_OK => c"success",
        CRYO_ERR_INVALID_ARGUMENT => c"invalid argument",
        CRYO_ERR_NOT_INITIALIZED => c"cryo is not initialized: call cryo_init first",
        CRYO_ERR_ALREADY_INITIALIZED => {
            c"cryo is already initialized: cryo_init or cryo_init_mpi is called once per process, and not again after cryo_finalize"
        }
        CRYO_ERR_AGENT => c"the cryo agent could not be reached or refused the rank",
        CRYO_ERR_REGION => c"a region could not be created",
        CRYO_ERR_RESTORE => c"restoring from a checkpoint failed",
        CRYO_ERR_CHECKPOINT => c"a checkpoint failed",
        CRYO_ERR_PANIC => c"internal error (panic) in the cryo runtime",
        CRYO_ERR_CONFIG => c"bad cryo configuration",
        _ => c"unknown cryo status code",
    }
}

fn set_error(code: c_int, message: String) -> c_int {
    let message =
        CString::new(message.replace('\0', " ")).unwrap_or_else(|_| generic(code).to_owned());
    LAST_ERROR.with(|last| *last.borrow_mut() = Some((code, message)));
    code
}

fn init_code(err: &InitError) -> c_int {
    match err {
        InitError::AlreadyInitialized => CRYO_ERR_ALREADY_INITIALIZED,
        InitError::BadEnv { .. }
        | InitError::Reserve { .. }
        | InitError::FdFloor { .. }
        | InitError::WrongMpi { .. } => CRYO_ERR_CONFIG,
        InitError::Restore(_) => CRYO_ERR_RESTORE,
        InitError::NullCommunicator => CRYO_ERR_INVALID_ARGUMENT,
        _ => CRYO_ERR_AGENT,
    }
}

fn region_code(err: &RegionError) -> c_int {
    match err {
        RegionError::NotInitialized => CRYO_ERR_NOT_INITIALIZED,
        RegionError::Restore { .. } | RegionError::Mismatch { .. } => CRYO_ERR_RESTORE,
        _ => CRYO_ERR_REGION,
    }
}

/// Runs `body`, turning a panic into `CRYO_ERR_PANIC`.
fn guard(body: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(code) => code,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(
                CRYO_ERR_PANIC,
                format!("internal error in the cryo runtime: {what}"),
            )
        }
    }
}

/// Reads a C string argument.
///
/// # Safety
///
/// `ptr` is null or points to a NUL-terminated string.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, c_int> {
    if ptr.is_null() {
        return Err(set_error(
            CRYO_ERR_INVALID_ARGUMENT,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: non-null, and the caller guarantees NUL termination.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| set_error(CRYO_ERR_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// Initializes cryo from the environment; on a restart, re-opens the rank's
/// files before returning.
///
/// # Safety
///
/// Safe to call from any thread; call it once, before other cryo functions.
#[no_mangle]
pub unsafe extern "C" fn cryo_init() -> c_int {
    guard(|| init_result(runtime::init()))
}

/// Like [`cryo_init`], for an MPI rank: also attaches the quiesce protocol to
/// duplicates of `comm`, so every rank checkpoints at the same safe point.
/// The application owns `MPI_Init`/`MPI_Finalize` and calls
/// `cryo_finalize` before `MPI_Finalize`. `cryo.h` makes `cryo_init_mpi`
/// call [`cryo_init_mpi_handle`], which also checks the program's MPI; this
/// symbol stays for programs built against an older header.
///
/// # Safety
///
/// `comm` is a valid communicator of an initialised MPI library, the one
/// this build was linked with, used by the calling thread.
#[cfg(feature = "mpi")]
#[no_mangle]
pub unsafe extern "C" fn cryo_init_mpi(comm: mpi::ffi::MPI_Comm) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        init_result(unsafe { crate::quiesce::init_mpi_raw(comm) })
    })
}

/// [`cryo_init_mpi`] for a Fortran communicator handle (`MPI_Fint`: the
/// integer of `use mpi`, or `MPI_VAL` of `use mpi_f08`'s `type(MPI_Comm)`),
/// which the runtime converts with `MPI_Comm_f2c`. The Fortran module
/// `cryo` calls this one.
///
/// # Safety
///
/// `comm` is a valid Fortran communicator handle of an initialised MPI
/// library, used by the calling thread.
#[cfg(feature = "mpi")]
#[no_mangle]
pub unsafe extern "C" fn cryo_init_mpi_f(comm: mpi::ffi::RSMPI_Fint) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        init_result(unsafe { crate::quiesce::init_mpi_fortran(comm) })
    })
}

/// [`cryo_init_mpi`] from the address of the communicator and
/// `sizeof(MPI_Comm)` in the caller's MPI: a program (or binding) built for
/// another MPI than this flavour of the runtime gets `CRYO_ERR_CONFIG`
/// naming the library to link, before its handle is read.
///
/// # Safety
///
/// `comm` is null or points to `comm_bytes` readable bytes; when
/// `comm_bytes` is this flavour's handle size, they hold a valid
/// communicator of an initialised MPI library, used by the calling thread.
#[cfg(feature = "mpi")]
#[no_mangle]
pub unsafe extern "C" fn cryo_init_mpi_handle(comm: *const c_void, comm_bytes: usize) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract (null is refused there).
        init_result(unsafe { crate::quiesce::init_mpi_handle(comm, comm_bytes) })
    })
}

fn init_result(result: Result<crate::InitInfo, InitError>) -> c_int {
    match result {
        Ok(_) => CRYO_OK,
        Err(err) => set_error(init_code(&err), err.to_string()),
    }
}

/// The MPI this flavour of the runtime was built for: `"mpich"` (MPICH and
/// its ABI family: `int` handles) or `"openmpi"` (pointer handles), as a
/// static NUL-terminated string; `"none"` in a build without MPI.
///
/// # Safety
///
/// Always safe to call; the string must not be freed.
#[no_mangle]
pub unsafe extern "C" fn cryo_mpi_flavour() -> *const c_char {
    #[cfg(feature = "mpi")]
    let name = crate::MpiFlavour::BUILT.c_name();
    #[cfg(not(feature = "mpi"))]
    let name = c"none";
    name.as_ptr()
}

/// Creates an anonymous region of `len` bytes and stores its address in
/// `*out`.
///
/// # Safety
///
/// `name` is a NUL-terminated string; `out` points to writable storage for
/// one pointer.
#[no_mangle]
pub unsafe extern "C" fn cryo_region(
    name: *const c_char,
    len: usize,
    out: *mut *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { region_impl(name, len, None, 0, false, out, std::ptr::null_mut()) }
    })
}

/// Creates a region backed by the file `path` from `offset` (a multiple of
/// 4096). `len == 0` maps the rest of the file. `shared != 0` maps it
/// `MAP_SHARED` (on a restart the file gets back the contents saved at
/// the checkpoint, unless `CRYO_FILE_POLICY=keep`, and is mapped again),
/// otherwise
/// `MAP_PRIVATE` (contents saved). The address goes to `*out` and the
/// length to `*out_len` if it is not NULL.
///
/// # Safety
///
/// `name` and `path` are NUL-terminated strings; `out` points to writable
/// storage for one pointer; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cryo_region_file(
    name: *const c_char,
    path: *const c_char,
    offset: u64,
    len: usize,
    shared: c_int,
    out: *mut *mut c_void,
    out_len: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let path = match unsafe { c_str(path, "path") } {
            Ok(path) => path,
            Err(code) => return code,
        };
        // SAFETY: forwarded caller contract.
        unsafe {
            region_impl(
                name,
                len,
                Some(Path::new(path)),
                offset,
                shared != 0,
                out,
                out_len,
            )
        }
    })
}

/// # Safety
///
/// As for [`cryo_region_file`].
unsafe fn region_impl(
    name: *const c_char,
    len: usize,
    path: Option<&Path>,
    offset: u64,
    shared: bool,
    out: *mut *mut c_void,
    out_len: *mut usize,
) -> c_int {
    // SAFETY: forwarded caller contract.
    let name = match unsafe { c_str(name, "name") } {
        Ok(name) => name,
        Err(code) => return code,
    };
    if out.is_null() {
        return set_error(CRYO_ERR_INVALID_ARGUMENT, "out is NULL".into());
    }
    let backing = match path {
        None => Backing::Anonymous,
        Some(path) => Backing::File {
            path,
            offset,
            shared,
        },
    };
    match runtime::region(name, len, backing) {
        Ok(slice) => {
            // SAFETY: `out` is non-null and writable per the contract.
            unsafe { *out = slice.as_mut_ptr().cast() };
            if !out_len.is_null() {
                // SAFETY: non-null and writable per the contract.
                unsafe { *out_len = slice.len() };
            }
            CRYO_OK
        }
        Err(err) => set_error(region_code(&err), err.to_string()),
    }
}

/// Registers the application buffer `ptr[0..len)` under `name`; on a
/// restart its saved contents are copied back into it.
///
/// # Safety
///
/// `name` is a NUL-terminated string; `ptr` is valid for reads and writes of
/// `len` bytes for the rest of the process's life.
#[no_mangle]
pub unsafe extern "C" fn cryo_protect(name: *const c_char, ptr: *mut c_void, len: usize) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let name = match unsafe { c_str(name, "name") } {
            Ok(name) => name,
            Err(code) => return code,
        };
        // SAFETY: forwarded caller contract.
        match unsafe { runtime::protect(name, ptr.cast(), len) } {
            Ok(()) => CRYO_OK,
            Err(err) => set_error(region_code(&err), err.to_string()),
        }
    })
}

/// The safe point. Returns `CRYO_CONTINUE` (0) when no checkpoint was
/// pending, `CRYO_CHECKPOINTED` or `CRYO_ABORTED` after a checkpoint, and
/// a negative status (`-CRYO_ERR_CHECKPOINT`) on error.
///
/// # Safety
///
/// Safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn cryo_checkpoint_point() -> c_int {
    guard(|| match crate::checkpoint_point() {
        Ok(SafePoint::Continue) => CRYO_CONTINUE,
        Ok(SafePoint::Checkpointed(_)) => CRYO_CHECKPOINTED,
        Ok(SafePoint::Aborted(_)) => CRYO_ABORTED,
        Err(err) => -set_error(CRYO_ERR_CHECKPOINT, err.to_string()),
    })
}

/// The epoch this process restarted from, or 0 on a fresh start.
///
/// # Safety
///
/// Safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn cryo_restored_epoch() -> u64 {
    catch_unwind(runtime::restored_epoch)
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Writes where this process's prefetch of its chunks stands (see
/// `cryo.h`) into `buf`, NUL-terminated and cut to `len` bytes; returns the
/// length of the whole text, as `snprintf` does.
///
/// # Safety
///
/// `buf` must be NULL or point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cryo_prefetch_status(buf: *mut c_char, len: usize) -> usize {
    let text = catch_unwind(|| crate::prefetch_status().to_string())
        .unwrap_or_else(|_| "unknown (panicked)".into());
    let bytes = text.as_bytes();
    if !buf.is_null() && len > 0 {
        let n = bytes.len().min(len - 1);
        // SAFETY: the caller gives `len` writable bytes at `buf`, and
        // `n + 1 <= len`; the text is ours, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, n);
            *buf.add(n) = 0;
        }
    }
    bytes.len()
}

/// Registers `flush(arg)`, called at each checkpoint on the safe point's
/// thread before the rank's files are recorded: for output the application
/// buffers itself (C++ streams, its own log buffers). May be called before
/// `cryo_init`. A NULL `flush` is refused with `CRYO_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `flush` must be safe to call with `arg` at any later checkpoint (`arg`
/// stays valid for the life of the process) and must not unwind.
#[no_mangle]
pub unsafe extern "C" fn cryo_at_checkpoint(
    flush: Option<crate::flush_hooks::CFlushHook>,
    arg: *mut c_void,
) -> c_int {
    guard(|| match flush {
        Some(flush) => {
            // SAFETY: forwarded caller contract.
            unsafe { crate::flush_hooks::at_checkpoint_c(flush, arg) };
            CRYO_OK
        }
        None => set_error(
            CRYO_ERR_INVALID_ARGUMENT,
            "cryo_at_checkpoint: the flush hook is NULL".to_owned(),
        ),
    })
}

/// Notes `path` (absolute) as a file the program appends to and closes
/// through calls the runtime does not see (a language's own I/O, as
/// Python's): at each checkpoint it is measured like a file closed with
/// `fclose`, so a restart cuts what was appended after it, and, on a
/// filesystem of the node, its contents are saved to make it again. A
/// relative path: `CRYO_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `path` is NULL or points to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cryo_note_appended(path: *const c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let path = match unsafe { c_str(path, "cryo_note_appended: path") } {
            Ok(path) => path,
            Err(code) => return code,
        };
        if !path.starts_with('/') {
            return set_error(
                CRYO_ERR_INVALID_ARGUMENT,
                format!("cryo_note_appended: {path:?} is not an absolute path"),
            );
        }
        crate::closed_files::note_appended(path.to_owned());
        CRYO_OK
    })
}

/// Notes `path` (absolute) as a file the program reads (`written` 0) or
/// writes other than by appending, through calls the runtime does not see
/// (Python's): at each checkpoint that finds it closed on a filesystem of
/// the node, its contents are saved, so a restart elsewhere makes it
/// again. A relative path: `CRYO_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `path` is NULL or points to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cryo_note_node_file(path: *const c_char, written: c_int) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let path = match unsafe { c_str(path, "cryo_note_node_file: path") } {
            Ok(path) => path,
            Err(code) => return code,
        };
        if !path.starts_with('/') {
            return set_error(
                CRYO_ERR_INVALID_ARGUMENT,
                format!("cryo_note_node_file: {path:?} is not an absolute path"),
            );
        }
        crate::closed_files::note_node_file(path.to_owned(), written != 0);
        CRYO_OK
    })
}

/// Tells the runtime that the file at `old` is about to be renamed `new`
/// (both absolute), through calls it does not see (Python's `os.replace`):
/// a file of the node noted at `old` is noted at `new` too, so a file
/// written under a temporary name and renamed into place is saved under
/// the name it has at the checkpoint. A relative path:
/// `CRYO_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `old` and `new` are NULL or point to NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn cryo_note_renamed(old: *const c_char, new: *const c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let old = match unsafe { c_str(old, "cryo_note_renamed: old") } {
            Ok(path) => path,
            Err(code) => return code,
        };
        // SAFETY: forwarded caller contract.
        let new = match unsafe { c_str(new, "cryo_note_renamed: new") } {
            Ok(path) => path,
            Err(code) => return code,
        };
        if let Some(relative) = [old, new].into_iter().find(|path| !path.starts_with('/')) {
            return set_error(
                CRYO_ERR_INVALID_ARGUMENT,
                format!("cryo_note_renamed: {relative:?} is not an absolute path"),
            );
        }
        crate::closed_files::note_node_file_renaming(old, new);
        CRYO_OK
    })
}

/// For a restarted rank's set-up that opens a file again where the runtime
/// does not see it (Python): the fd restored for `path` if an open with
/// `flags` is to continue it (`reopen/`), else -1.
///
/// # Safety
///
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cryo_reopen_restored(path: *const c_char, flags: c_int) -> c_int {
    crate::reopen::restored_for(path, flags)
}

/// Says goodbye to the agent. Regions stay mapped.
///
/// # Safety
///
/// Safe to call from any thread; no cryo call may follow except
/// `cryo_strerror` and `cryo_restored_epoch`.
#[no_mangle]
pub unsafe extern "C" fn cryo_finalize() -> c_int {
    guard(|| {
        runtime::finalize();
        CRYO_OK
    })
}

/// The message for `code`: the full text of this thread's last error if it
/// had that code, else a generic description. Accepts negative codes as
/// returned by `cryo_checkpoint_point`. The string stays valid until the
/// next failing cryo call on this thread.
///
/// # Safety
///
/// Safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn cryo_strerror(code: c_int) -> *const c_char {
    let code = code.checked_abs().unwrap_or(code);
    catch_unwind(|| {
        LAST_ERROR.with(|last| match &*last.borrow() {
            Some((last_code, message)) if *last_code == code => message.as_ptr(),
            _ => generic(code).as_ptr(),
        })
    })
    .unwrap_or_else(|_| generic(CRYO_ERR_PANIC).as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_codes_and_messages() {
        // SAFETY: null pointers are allowed and must be refused.
        let code = unsafe { cryo_region(std::ptr::null(), 10, std::ptr::null_mut()) };
        assert_eq!(code, CRYO_ERR_INVALID_ARGUMENT);
        // SAFETY: plain call.
        let text = unsafe { CStr::from_ptr(cryo_strerror(code)) }
            .to_str()
            .unwrap();
        assert!(text.contains("name is NULL"), "{text}");
        // SAFETY: plain call.
        let text = unsafe { CStr::from_ptr(cryo_strerror(999)) }
            .to_str()
            .unwrap();
        assert!(text.contains("unknown"), "{text}");
    }

    #[test]
    fn the_prefetch_status_is_cut_to_the_buffer_and_terminated() {
        // SAFETY: a null buffer is allowed; only the length comes back.
        let whole = unsafe { cryo_prefetch_status(std::ptr::null_mut(), 0) };
        assert_eq!(whole, "none".len());
        let mut buf = [0x7f as c_char; 3];
        // SAFETY: `buf` holds 3 writable bytes.
        let whole = unsafe { cryo_prefetch_status(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(whole, 4);
        // SAFETY: the call terminated the text within `buf`.
        let cut = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(cut.to_str().unwrap(), "no");
    }

    /// A binding's notes of files take absolute paths: a relative one or
    /// NULL is refused by name, with the code for a bad argument.
    #[test]
    fn notes_of_files_refuse_relative_paths_by_name() {
        let last = |code| {
            // SAFETY: plain call.
            let text = unsafe { CStr::from_ptr(cryo_strerror(code)) };
            text.to_string_lossy().into_owned()
        };
        let bad = CRYO_ERR_INVALID_ARGUMENT;
        // SAFETY: NUL-terminated strings, and NULL, which the call refuses.
        unsafe {
            assert_eq!(
                cryo_note_renamed(c"out.tmp".as_ptr(), c"/x/o".as_ptr()),
                bad
            );
            assert!(last(bad).contains("\"out.tmp\" is not an absolute path"));
            assert_eq!(cryo_note_renamed(c"/x/a".as_ptr(), std::ptr::null()), bad);
            assert!(last(bad).contains("cryo_note_renamed: new is NULL"));
            assert_eq!(cryo_note_node_file(c"rel".as_ptr(), 1), bad);
            assert!(last(bad).contains("\"rel\" is not an absolute path"));
            assert_eq!(
                cryo_note_renamed(c"/x/a".as_ptr(), c"/x/b".as_ptr()),
                CRYO_OK
            );
        }
    }

    #[test]
    fn panics_become_codes() {
        let code = guard(|| panic!("boom"));
        assert_eq!(code, CRYO_ERR_PANIC);
        // SAFETY: plain call.
        let text = unsafe { CStr::from_ptr(cryo_strerror(CRYO_ERR_PANIC)) }
            .to_str()
            .unwrap();
        assert!(text.contains("boom"), "{text}");
    }
}
