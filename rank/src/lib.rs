//! cryo-rank: the runtime linked into every rank, from Rust or from C
//! (`include/cryo.h`).
//!
//! * [`init`] connects to the node agent named by `$CRYO_AGENT_SOCKET`,
//!   registers the job, rank and pid, and shares a 4 KiB control page with
//!   it. On a restart it re-opens the rank's files before returning, at the
//!   same fd numbers and offsets. Without `$CRYO_AGENT_SOCKET` the runtime
//!   runs alone: regions work, checkpoints never happen.
//! * [`region`] maps a named region at a deterministic address inside a
//!   reservation made at init, so pointers into regions stay valid across a
//!   restart; on a restart it comes back with its saved contents.
//!   [`protect`] registers a buffer the application owns.
//! * [`checkpoint_point`] is the safe point: one load of a word the agent
//!   sets in the control page. Only when a checkpoint is pending does the
//!   rank park, send its region table and wait for the agent to copy its
//!   memory and resume it.
//! * [`restored_epoch`] says which epoch the process restarted from.
//! * [`at_checkpoint`] registers a hook that flushes the application's own
//!   output buffers before each checkpoint records its files.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

mod closed_files;
pub mod error;
mod exit_note;
pub mod ffi;
mod file_tails;
pub mod files;
mod finalize;
mod floor;
pub mod flush_hooks;
mod gfortran;
mod held;
mod interpose;
mod library_dirs;
mod library_sockets;
mod mappings;
mod offers;
mod park;
mod prefetch;
mod process_state;
mod ptracer;
#[cfg(feature = "mpi")]
pub mod quiesce;
mod quiet_thread;
mod regions;
mod remake;
mod reopen;
mod restart;
mod restore_threads;
mod runtime;
mod self_copy;
mod snapshot;
mod sparse;
mod std_streams;
mod store_fds;
mod stream_copy;
mod termination;
#[cfg(test)]
mod test_support;
mod warning;
mod workdir;
mod writable;

use std::sync::atomic::Ordering;

pub use error::{CheckpointError, InitError, RegionError, RestoreError};
pub use files::FilePolicy;
pub use flush_hooks::at_checkpoint;
pub use prefetch::{prefetch_status, PrefetchStatus};
#[cfg(feature = "mpi")]
pub use quiesce::{init_mpi, init_mpi_fortran, init_mpi_handle, init_mpi_raw, MpiFlavour};
pub use runtime::{
    finalize, init, init_with, protect, region, restored_epoch, Backing, Config, InitInfo,
    SafePoint, DEFAULT_REGION_BASE, DEFAULT_REGION_RESERVE, RUNTIME_FD_FLOOR,
};

/// The safe point. Call it where the application's state is consistent.
///
/// With no checkpoint pending this is two loads (the flag's address, then
/// the flag) and a branch; in MPI mode (the `quiesce` module) also a counter
/// increment and, every 100 ms, one `MPI_Test`. With one pending, the rank parks until the agent
/// has copied its memory.
#[inline]
pub fn checkpoint_point() -> Result<SafePoint, CheckpointError> {
    if warning::pending() {
        warning::pass_on();
    }
    if termination::pending() {
        termination::pass_on();
    }
    // The set-up after a restart is over.
    reopen::close_window();
    #[cfg(feature = "mpi")]
    if quiesce::MPI_MODE.load(Ordering::Relaxed) {
        return quiesce::mpi_safe_point();
    }
    let flag = runtime::FLAG.load(Ordering::Relaxed);
    // SAFETY: FLAG always points at a live AtomicU64: the static IDLE word
    // or the control page's request word, which is never unmapped.
    let requested = unsafe { &*flag }.load(Ordering::Acquire);
    if requested == 0 {
        return Ok(SafePoint::Continue);
    }
    runtime::park(requested)
}
