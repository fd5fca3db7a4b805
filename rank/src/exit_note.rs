//! A rank that exits before finalizing tells its agent the status it exits
//! with, so that the job's end names "rank 2 exited with status 1" rather
//! than a connection that closed.
//!
//! glibc's `on_exit` runs at `exit` (C's, Fortran's `STOP`, Python's
//! `sys.exit`), not at `_exit` or a signal: `MPI_Abort` (both MPICH and
//! Open MPI leave with `_exit`) and a crash still show as a disconnection.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use cryo_core::protocol::{RankToAgent, EXIT_STATUS_VERSION};

/// The process whose exit is noted: a child forked without `exec` that
/// calls `exit` runs the same handlers, and must not speak for the rank.
static RANK_PID: AtomicU32 = AtomicU32::new(0);

extern "C" {
    /// glibc: like `atexit`, with the exit status.
    fn on_exit(function: extern "C" fn(c_int, *mut c_void), arg: *mut c_void) -> c_int;
}

/// Notes this process's exit from now on (once per process).
pub(crate) fn arm() {
    RANK_PID.store(std::process::id(), Ordering::Release);
    static ARMED: Once = Once::new();
    ARMED.call_once(|| {
        // SAFETY: `note_exit` is an `extern "C"` function that lives as long
        // as the process and ignores its argument, so a null one is fine.
        let rc = unsafe { on_exit(note_exit, std::ptr::null_mut()) };
        if rc != 0 {
            tracing::debug!("exit_note.unarmed");
        }
    });
}

extern "C" fn note_exit(status: c_int, _: *mut c_void) {
    // Nothing may unwind out of an exit handler.
    let _ = std::panic::catch_unwind(|| tell_agent(status));
}

fn tell_agent(status: c_int) {
    if RANK_PID.load(Ordering::Acquire) != std::process::id() {
        return;
    }
    // Another thread may hold the runtime while this one exits; the note
    // is not worth a deadlock at exit.
    let Some(guard) = crate::runtime::try_lock() else {
        return;
    };
    // After `finalize` the connection is gone: nothing to say.
    let Some(conn) = guard.as_ref().and_then(|runtime| runtime.conn.as_ref()) else {
        return;
    };
    if conn.agent_version >= EXIT_STATUS_VERSION {
        let _ = conn.send(&RankToAgent::Exiting { status });
    }
}
