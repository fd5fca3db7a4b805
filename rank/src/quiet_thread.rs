//! The runtime's threads inside the application's process take none of
//! its signals. The kernel hands a signal sent to the process to any
//! thread that does not block it: an application that blocks `SIGUSR1` or
//! `SIGTERM` in its own threads, to take it with `sigwait` on one of them,
//! would otherwise see it run its handler on ours, or its default action
//! (the end of the process) taken there.

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

/// Signals a fault raises in the thread that caused it: blocked, the
/// kernel would kill the process rather than run the application's
/// handler.
const FAULTS: [Signal; 6] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

/// Blocks every signal but the faults in the calling thread; called first
/// by each thread the runtime starts. A refusal leaves the mask as it
/// was, which is only the old behaviour.
pub(crate) fn block_signals() {
    let mut set = SigSet::all();
    for fault in FAULTS {
        set.remove(fault);
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_thread_blocks_the_application_signals_but_not_the_faults() {
        let mask = std::thread::spawn(|| {
            block_signals();
            SigSet::thread_get_mask().unwrap()
        })
        .join()
        .unwrap();
        for signal in [
            Signal::SIGTERM,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGINT,
            Signal::SIGALRM,
            Signal::SIGCHLD,
        ] {
            assert!(mask.contains(signal), "{signal} not blocked");
        }
        for fault in FAULTS {
            assert!(!mask.contains(fault), "{fault} blocked");
        }
        // The caller's own mask is untouched.
        let here = SigSet::thread_get_mask().unwrap();
        assert!(!here.contains(Signal::SIGUSR2));
    }
}
