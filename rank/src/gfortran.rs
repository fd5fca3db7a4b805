//! gfortran's units: which `NEWUNIT=` units are connected to files, so that
//! a checkpoint can flush them.
//!
//! libgfortran numbers `NEWUNIT=` units and internal units (I/O to a
//! character variable) from one pool (-10, -11, …), and when an internal
//! I/O statement ends it keeps the unit's structure under that number,
//! without a stream. `_gfortran_flush_i4` on such a number dereferences the
//! missing stream and crashes, and nothing libgfortran exports tells the
//! two kinds apart (every call that takes a unit number does the same). So
//! the runtime learns the file units where they are made: it defines
//! `_gfortran_st_open` and `_gfortran_st_close`, the calls a compiled OPEN
//! and CLOSE make, which take precedence over libgfortran's because
//! `-lcryo_rank` comes before the `-lgfortran` the compiler adds. Each one
//! forwards to libgfortran's (found with `RTLD_NEXT`) and reads only
//! `common.unit`, the second 32-bit field of the parameter block every
//! libgfortran I/O call starts with (`st_parameter_common`: flags, unit,
//! …), and the status the library leaves in the low bits of `flags`.
//! If the program links libgfortran first, nothing is recorded: its
//! `NEWUNIT=` units are then not flushed, but nothing crashes, and
//! `cryo_init` says what is lost ([`warn_if_bypassed`]).
//!
//! In a restarted rank's set-up, a unit the OPEN connected at its start to a
//! file the rank held open for writing at the checkpoint is moved to where
//! the restored fd stood (`continue_held_file`, with `reopen/`).
//!
//! The CLOSE also notes the unit's file among those written and closed
//! (`closed_files`), through libgfortran's `FNUM`, so that a log opened with
//! `position='append'`, written and closed at every step is cut back at a
//! restart.

use std::collections::BTreeSet;
use std::ffi::{c_void, CStr};
use std::panic::catch_unwind;
use std::sync::Mutex;

/// The negative unit numbers an OPEN connected and no CLOSE has released.
static FILE_UNITS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// `IOPARM_LIBRETURN_MASK`: the low bits of `common.flags` where
/// libgfortran reports how a statement ended (0: it succeeded).
const LIBRETURN_MASK: u32 = 3;

/// The head of libgfortran's `st_parameter_common`.
#[repr(C)]
struct CommonHead {
    flags: u32,
    unit: i32,
}

type IoCall = unsafe extern "C" fn(*mut c_void);

/// libgfortran's own definition of `name`, the next one after ours.
fn next(name: &CStr) -> Option<IoCall> {
    // SAFETY: dlsym only looks the name up.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    // SAFETY: a non-null result is libgfortran's function of that name,
    // which takes one pointer to its parameter block and returns nothing.
    (!found.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, IoCall>(found) })
}

/// Reads the head of a parameter block.
///
/// # Safety
///
/// `params` is the parameter block libgfortran's I/O call received.
unsafe fn head(params: *mut c_void) -> CommonHead {
    // SAFETY: every block starts with `st_parameter_common`, whose first
    // two fields are the 32-bit flags and unit (the caller's contract).
    let head = unsafe { &*params.cast::<CommonHead>() };
    CommonHead {
        flags: head.flags,
        unit: head.unit,
    }
}

fn units() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    FILE_UNITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The OPEN statement: libgfortran's, then records a `NEWUNIT=` unit it
/// connected.
///
/// # Safety
///
/// Called only by gfortran-compiled code, with the parameter block of an
/// OPEN statement.
#[no_mangle]
pub unsafe extern "C" fn _gfortran_st_open(params: *mut c_void) {
    let Some(open) = next(c"_gfortran_st_open") else {
        return;
    };
    // A unit counts its position from zero: it must not be given a
    // restored fd (`reopen/`).
    // SAFETY: forwarded unchanged to the function the caller meant.
    crate::reopen::in_fortran_open(|| unsafe { open(params) });
    // SAFETY: the block of the OPEN, which libgfortran has filled in.
    let after = unsafe { head(params) };
    if after.flags & LIBRETURN_MASK != 0 {
        return;
    }
    if after.unit < 0 {
        // A panic must not unwind into Fortran; losing the record only
        // means this unit is not flushed.
        let _ = catch_unwind(|| units().insert(after.unit));
    }
    // As above: losing it leaves the unit at its start.
    let _ = catch_unwind(|| continue_held_file(after.unit));
}

/// A unit the restarted set-up connected at its start (`position='asis'`,
/// the default, or `'rewind'`) to a file the rank held open for writing at
/// the checkpoint: moved (libgfortran's `FSEEK`) to where the restored fd
/// stood, so that it goes on writing where the run was instead of writing
/// from the top and cutting the file there at its first WRITE. A unit
/// opened with `position='append'` is already there; one that only reads
/// is left as it is.
fn continue_held_file(unit: i32) {
    type Ftell = unsafe extern "C" fn(*const i32) -> i64;
    type FseekSub = unsafe extern "C" fn(*const i32, *const i64, *const i32, *mut i32);
    if !crate::reopen::window_open() {
        return;
    }
    let Some(fd) = fnum(unit) else {
        return;
    };
    // SAFETY: F_GETFL only reads the flags of the unit's fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE == libc::O_RDONLY {
        return;
    }
    // SAFETY: dlsym only looks the names up.
    let (ftell, fseek) = unsafe {
        (
            libc::dlsym(libc::RTLD_NEXT, c"_gfortran_ftell".as_ptr()),
            libc::dlsym(libc::RTLD_NEXT, c"_gfortran_fseek_sub".as_ptr()),
        )
    };
    if ftell.is_null() || fseek.is_null() {
        return;
    }
    // SAFETY: libgfortran's FTELL and FSEEK (GNU extensions), on a unit the
    // OPEN just connected: `ftell(int *unit)` returns its position (a
    // `GFC_IO_INT`), `fseek_sub(int *unit, GFC_IO_INT *offset, int
    // *whence, int *status)` moves it.
    let (ftell, fseek) = unsafe {
        (
            std::mem::transmute::<*mut c_void, Ftell>(ftell),
            std::mem::transmute::<*mut c_void, FseekSub>(fseek),
        )
    };
    // SAFETY: as above.
    if unsafe { ftell(&unit) } != 0 {
        return;
    }
    let Some(offset) = crate::reopen::fortran_unit_offset(fd) else {
        return;
    };
    let (whence, mut status) = (libc::SEEK_SET, 0);
    // SAFETY: as above.
    unsafe { fseek(&unit, &offset, &whence, &mut status) };
    tracing::info!(unit, fd, offset, status, "reopen.fortran_unit_continued");
}

/// The fd of the external unit `unit` (libgfortran's `FNUM`), if one is
/// connected.
fn fnum(unit: i32) -> Option<i32> {
    type Fnum = unsafe extern "C" fn(*const i32) -> i32;
    // SAFETY: dlsym only looks the name up.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"_gfortran_fnum_i4".as_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: libgfortran's FNUM for default integers: it takes a pointer
    // to the unit number and returns its fd, or -1 when no unit of that
    // number is connected.
    let fnum = unsafe { std::mem::transmute::<*mut c_void, Fnum>(found) };
    // SAFETY: the caller passes an external unit (positive, or one an OPEN
    // connected), so libgfortran finds a stream behind it or none at all.
    let fd = unsafe { fnum(&unit) };
    (fd >= 0).then_some(fd)
}

/// The CLOSE statement: forgets the unit, then libgfortran's.
///
/// # Safety
///
/// Called only by gfortran-compiled code, with the parameter block of a
/// CLOSE statement.
#[no_mangle]
pub unsafe extern "C" fn _gfortran_st_close(params: *mut c_void) {
    // SAFETY: the block of the CLOSE, as the caller passed it.
    let unit = unsafe { head(params) }.unit;
    // Forgotten even if the CLOSE fails: an internal unit may take the
    // number next, and flushing that would crash.
    let was_file = catch_unwind(|| units().remove(&unit)).unwrap_or(false);
    // Positive units are never internal; a negative one only when an OPEN
    // connected it (asking for the fd of an internal unit would crash).
    let closing = if unit >= 0 || was_file {
        closing(unit)
    } else {
        None
    };
    if let Some(close) = next(c"_gfortran_st_close") {
        // SAFETY: forwarded unchanged to the function the caller meant.
        unsafe { close(params) };
    }
    if let Some(closing) = closing {
        let _ = catch_unwind(|| closing.done());
    }
}

/// The file of `unit`, which is about to be closed, to note among the
/// files written and closed (`closed_files`): every unit open for writing,
/// since `position='append'` leaves no trace in the fd's flags.
fn closing(unit: i32) -> Option<crate::closed_files::Closing> {
    let fd = fnum(unit)?;
    catch_unwind(|| crate::closed_files::closing(fd, false))
        .ok()
        .flatten()
}

/// The `NEWUNIT=` units connected to files now.
pub(crate) fn file_units() -> Vec<i32> {
    units().iter().copied().collect()
}

/// Whether compiled OPEN and CLOSE statements bypass the definitions here:
/// the program was linked with libgfortran before `-lcryo_rank`, so that
/// libgfortran's are found first. Only where the runtime's own definitions
/// (`open`) come first at all: a process that loaded the runtime with
/// `dlopen`, as Python does, keeps the C library's.
pub(crate) fn bypassed() -> bool {
    // SAFETY: dlsym only looks the names up.
    let (open, st_open) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, c"open".as_ptr()),
            libc::dlsym(libc::RTLD_DEFAULT, c"_gfortran_st_open".as_ptr()),
        )
    };
    // Compared by the object they are in: the address of an exported name
    // taken here is itself the one found first.
    let here = object_of(bypassed as fn() -> bool as *const c_void);
    here.is_some() && object_of(open) == here && !st_open.is_null() && object_of(st_open) != here
}

/// The base address of the loaded object (program or library) holding
/// `address`.
fn object_of(address: *const c_void) -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the loader's tables and fills `info`.
    let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) };
    // SAFETY: zeroed, then filled by dladdr when it found the object.
    (found != 0).then(|| unsafe { info.assume_init() }.dli_fbase as usize)
}

/// Says, at every start, what a program that links libgfortran before the
/// runtime loses ([`bypassed`]), so that it is known before a checkpoint
/// is needed.
pub(crate) fn warn_if_bypassed(rank: u32) {
    if bypassed() {
        tracing::warn!(rank, "gfortran.bypassed");
        cryo_core::say!(
            "cryo: rank {rank}: WARNING: the program is linked with libgfortran before \
             libcryo_rank, so the runtime does not see its Fortran OPEN and CLOSE statements: \
             the output buffered in NEWUNIT= units is not flushed at a checkpoint, a log \
             closed by CLOSE is not cut back to the checkpoint at a restart, and a file the \
             restarted program opens again is not given back as it was. Link with -lcryo_rank \
             before -lgfortran"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_placed_in_its_own_object() {
        let here = object_of(bypassed as fn() -> bool as *const c_void);
        // SAFETY: dlsym only looks the name up.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) };
        assert!(here.is_some());
        assert!(object_of(getpid).is_some() && object_of(getpid) != here);
        assert_eq!(object_of(std::ptr::null()), None);
        // A test program does not export the runtime's open: nothing is
        // bypassed, whatever libgfortran does.
        assert!(!bypassed());
    }
}
