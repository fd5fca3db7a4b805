//! The rank's goodbye: the MPI quiesce's last agreement, the prefetch and
//! snapshots ended, the agent told, its socket shut.

use std::sync::atomic::{AtomicU64, Ordering};

use cryo_core::protocol::RankToAgent;

use crate::runtime::{lock, FLAG, IDLE};

/// What `finalize` runs first: the MPI quiesce's final agreement, when
/// `init_mpi` attached it (so the runtime does not depend on the quiesce).
static BEFORE_FINALIZE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Has `finalize` run `hook` first (once; later calls are ignored).
pub(crate) fn before_finalize(hook: fn()) {
    let _ = BEFORE_FINALIZE.set(hook);
}

/// Says goodbye to the agent and stops checkpointing. Regions stay mapped.
pub fn finalize() {
    if let Some(hook) = BEFORE_FINALIZE.get() {
        hook();
    }
    crate::reopen::close_window();
    // The job is ending: a SIGTERM now ends this rank as it would have.
    crate::termination::may_end();
    crate::prefetch::stop();
    crate::snapshot::wait_all();
    let mut guard = lock();
    FLAG.store(
        &IDLE as *const AtomicU64 as *mut AtomicU64,
        Ordering::Release,
    );
    if let Some(runtime) = guard.as_mut() {
        if let Some(conn) = runtime.conn.take() {
            let _ = conn.send(&RankToAgent::Goodbye);
            // The shutdown ends `crate::offers`' wait at once. The control
            // page stays mapped: FLAG may have been loaded by a racing safe
            // point. The fds close here.
            let _ = conn.sock.shutdown(std::net::Shutdown::Both);
            drop(conn);
        }
    }
}
