//! The application's own output buffers: a C++ `std::ofstream`, Python's
//! file objects, a logger's queue. The runtime cannot see them, so the
//! application registers hooks that flush them, and each checkpoint calls
//! them on the safe point's thread before it records the rank's files
//! (then flushes C's stdio and gfortran's units itself). Output buffered
//! at a checkpoint and never flushed would be lost on a restart: the files
//! come back as they were on disk at the checkpoint.

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A hook as C registers it: `flush(arg)`.
pub type CFlushHook = unsafe extern "C" fn(arg: *mut c_void);

type Hook = Arc<dyn Fn() + Send + Sync>;

static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

/// The epoch the hooks last ran for: an MPI rank flushes at the agreed
/// target and again at its park, and an expensive hook must not pay
/// twice (epochs are never reused within a process).
static RAN_FOR: AtomicU64 = AtomicU64::new(u64::MAX);

/// Registers `flush`, called at each checkpoint (in the order registered)
/// before the rank's files are recorded, for the rest of the process's
/// life. It runs on the thread that called the safe point; a panic in it is
/// caught and logged, and the checkpoint goes on.
pub fn at_checkpoint(flush: impl Fn() + Send + Sync + 'static) {
    HOOKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Arc::new(flush));
}

/// Registers a C hook: `flush(arg)` at each checkpoint.
///
/// # Safety
///
/// `flush` must be safe to call with `arg` from the safe point's thread at
/// any later checkpoint (`arg` stays valid for the life of the process),
/// and must not unwind (a C++ exception must not leave it).
pub unsafe fn at_checkpoint_c(flush: CFlushHook, arg: *mut c_void) {
    // The address crosses threads as a number: the hook is only ever
    // called on a safe point's thread, as the caller promised.
    let arg = arg as usize;
    at_checkpoint(move || {
        // SAFETY: the registration's contract.
        unsafe { flush(arg as *mut c_void) }
    });
}

/// Calls every registered hook, in order, once per epoch. A hook that
/// registers another does not deadlock: the list is copied first.
pub(crate) fn run(rank: u32, epoch: u64) {
    if RAN_FOR.swap(epoch, Ordering::SeqCst) == epoch {
        return;
    }
    let hooks: Vec<Hook> = HOOKS.lock().unwrap_or_else(PoisonError::into_inner).clone();
    for (index, hook) in hooks.iter().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| hook())).is_err() {
            tracing::warn!(rank, epoch, hook = index, "checkpoint.flush_hook_panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn count(arg: *mut c_void) {
        // SAFETY: registered below with a pointer to a live static.
        let step = unsafe { *arg.cast::<usize>() };
        CALLS.fetch_add(step, Ordering::SeqCst);
    }

    static STEP: usize = 10;

    #[test]
    fn hooks_run_in_order_and_a_panicking_one_does_not_stop_the_rest() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = Arc::clone(&order);
        at_checkpoint(move || first.lock().unwrap().push(1));
        at_checkpoint(|| panic!("a hook that fails"));
        let again = Arc::clone(&order);
        at_checkpoint(move || {
            again.lock().unwrap().push(2);
            // Registering from a hook must not deadlock.
            at_checkpoint(|| {});
        });
        // SAFETY: `count` reads a usize through a pointer to a static.
        unsafe { at_checkpoint_c(count, std::ptr::addr_of!(STEP).cast_mut().cast()) };

        let before = CALLS.load(Ordering::SeqCst);
        run(0, 1);
        assert_eq!(*order.lock().unwrap(), vec![1, 2]);
        assert_eq!(CALLS.load(Ordering::SeqCst) - before, 10);
        run(0, 2);
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 1, 2]);
        // Once per epoch: the park after the agreed target's flush.
        run(0, 2);
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 1, 2]);
    }
}
