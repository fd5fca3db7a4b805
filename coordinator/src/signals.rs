//! The signals `cryo run` acts on: SIGUSR1 (checkpoint, or checkpoint and
//! requeue under Slurm), SIGTERM (preempt), SIGINT (stop). The handler only
//! sets flags; the event loop reads them.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{self, SigHandler, Signal};

pub(crate) static GOT_USR1: AtomicBool = AtomicBool::new(false);
pub(crate) static GOT_TERM: AtomicBool = AtomicBool::new(false);
pub(crate) static GOT_INT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: std::os::raw::c_int) {
    // Only atomic stores: async-signal-safe.
    match signal {
        libc_sig::USR1 => GOT_USR1.store(true, Ordering::Release),
        libc_sig::TERM => GOT_TERM.store(true, Ordering::Release),
        _ => GOT_INT.store(true, Ordering::Release),
    }
}

mod libc_sig {
    pub const USR1: i32 = nix::sys::signal::Signal::SIGUSR1 as i32;
    pub const TERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;
}

pub(crate) fn install_signal_handlers() -> Result<()> {
    for sig in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to atomics, which is
        // async-signal-safe, and it is installed before any thread that
        // could race with it starts.
        unsafe { signal::signal(sig, SigHandler::Handler(on_signal)) }
            .with_context(|| format!("installing the {sig} handler"))?;
    }
    Ok(())
}
