//! Which MPI this build of the runtime speaks.
//!
//! `mpi-sys` binds whatever MPI its build script finds (`$MPICC -show`), so
//! one build of `libcryo_rank` serves one MPI. The flavours differ in the C
//! type of a handle: MPICH (and the MPIs sharing its ABI: Intel MPI,
//! MVAPICH, Cray MPICH) uses `int`s, Open MPI pointers to the library's
//! objects. That difference is also how a program or a binding that hands
//! over a communicator is checked against the build: by the size of its
//! `MPI_Comm`, before the handle is read.

use std::ffi::CStr;

use ::mpi::ffi;

use crate::error::InitError;

/// An MPI family, told apart by its handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpiFlavour {
    /// `int` handles: MPICH and its ABI family.
    Mpich,
    /// Pointer handles: Open MPI.
    OpenMpi,
}

impl MpiFlavour {
    /// The flavour this runtime was built against (a build against an MPI
    /// with other handles fails here, at compile time).
    pub const BUILT: MpiFlavour = match Self::of_handle_bytes(HANDLE_BYTES) {
        Some(flavour) => flavour,
        None => panic!("an MPI_Comm neither int- nor pointer-sized"),
    };

    /// The flavour whose `MPI_Comm` is `bytes` long.
    pub const fn of_handle_bytes(bytes: usize) -> Option<MpiFlavour> {
        if bytes == std::mem::size_of::<std::os::raw::c_int>() {
            Some(MpiFlavour::Mpich)
        } else if bytes == std::mem::size_of::<*const u8>() {
            Some(MpiFlavour::OpenMpi)
        } else {
            None
        }
    }

    /// Its short name, `mpich` or `openmpi`, as `cryo_mpi_flavour` gives it.
    pub const fn c_name(self) -> &'static CStr {
        match self {
            MpiFlavour::Mpich => c"mpich",
            MpiFlavour::OpenMpi => c"openmpi",
        }
    }

    /// [`MpiFlavour::c_name`] as a `str`.
    pub fn name(self) -> &'static str {
        self.c_name().to_str().unwrap_or("?")
    }

    /// The runtime library built for it.
    pub const fn library(self) -> &'static str {
        match self {
            MpiFlavour::Mpich => "libcryo_rank.so (-lcryo_rank)",
            MpiFlavour::OpenMpi => "libcryo_rank_openmpi.so (-lcryo_rank_openmpi)",
        }
    }

    /// Accepts a program's communicator of `program_bytes` bytes, or names
    /// the flavour it needs.
    pub fn check(program_bytes: usize) -> Result<(), InitError> {
        if program_bytes == HANDLE_BYTES {
            return Ok(());
        }
        let Some(program) = Self::of_handle_bytes(program_bytes) else {
            return Err(InitError::Mpi(format!(
                "this program's MPI_Comm is {program_bytes} bytes, the size of no MPI's handles \
                 (this libcryo_rank was built for {}, {HANDLE_BYTES}-byte handles)",
                Self::BUILT.name()
            )));
        };
        Err(InitError::WrongMpi {
            program: program.name(),
            program_bytes,
            built: Self::BUILT.name(),
            built_bytes: HANDLE_BYTES,
            wanted: program.library(),
        })
    }
}

/// `sizeof(MPI_Comm)` in the MPI this runtime was built against.
pub const HANDLE_BYTES: usize = std::mem::size_of::<ffi::MPI_Comm>();

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_built_flavour_accepts_its_own_handles_only() {
        assert!(MpiFlavour::check(HANDLE_BYTES).is_ok());
        let other = if HANDLE_BYTES == 4 { 8 } else { 4 };
        let err = MpiFlavour::check(other).unwrap_err().to_string();
        let wanted = MpiFlavour::of_handle_bytes(other).unwrap();
        assert_ne!(wanted, MpiFlavour::BUILT);
        assert!(err.contains(wanted.library()), "{err}");
        assert!(
            err.contains(&format!("built for {}", MpiFlavour::BUILT.name())),
            "{err}"
        );
    }

    #[test]
    fn handles_are_named_by_size() {
        assert_eq!(MpiFlavour::of_handle_bytes(4), Some(MpiFlavour::Mpich));
        assert_eq!(MpiFlavour::of_handle_bytes(8), Some(MpiFlavour::OpenMpi));
        assert_eq!(MpiFlavour::of_handle_bytes(0), None);
        let err = MpiFlavour::check(3).unwrap_err().to_string();
        assert!(
            err.contains("3 bytes, the size of no MPI's handles"),
            "{err}"
        );
    }
}
