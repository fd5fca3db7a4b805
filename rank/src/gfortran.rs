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
//! `NEWUNIT=` units are then not flushed, but nothing crashes.
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
    // restored fd (`reopen.rs`).
    // SAFETY: forwarded unchanged to the function the caller meant.
    crate::reopen::in_fortran_open(|| unsafe { open(params) });
    // SAFETY: the block of the OPEN, which libgfortran has filled in.
    let after = unsafe { head(params) };
    if after.unit < 0 && after.flags & LIBRETURN_MASK == 0 {
        // A panic must not unwind into Fortran; losing the record only
        // means this unit is not flushed.
        let _ = catch_unwind(|| units().insert(after.unit));
    }
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
    // SAFETY: `unit` is an external unit (the caller checked), so libgfortran
    // finds a stream behind it or none at all.
    let fd = unsafe { fnum(&unit) };
    catch_unwind(|| crate::closed_files::closing(fd, false))
        .ok()
        .flatten()
}

/// The `NEWUNIT=` units connected to files now.
pub(crate) fn file_units() -> Vec<i32> {
    units().iter().copied().collect()
}
