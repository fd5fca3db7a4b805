//! A warning of the job's end that reaches a rank rather than `cryo run`.
//!
//! Slurm sends a job's `--signal` (`SIGUSR1` in cryo's examples) to the
//! batch script only with `B:`; `--signal=USR1@120` without it, and a
//! preemption with `send_user_signal`, send it to every task of the job's
//! steps: the ranks. Left alone the signal ends an Open MPI rank (its
//! default action) and is swallowed by MPICH's own handler, and either way
//! the job is stopped without a checkpoint. The runtime takes `SIGUSR1`
//! from `cryo_init` on (calling any handler that was there before it, as
//! MPICH's), and the rank's next safe point passes the warning to its
//! agent (`RankToAgent::Warned`), which passes it to the coordinator: the
//! job is checkpointed (and with `--requeue` stopped and requeued) as for
//! a `SIGUSR1` to `cryo run`. An application that installs its own
//! `SIGUSR1` handler after `cryo_init` keeps the signal to itself.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use cryo_core::protocol::{RankToAgent, WARNING_VERSION};

/// The signal taken as the warning.
pub(crate) const WARNING_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Set by the handler; cleared when the warning is passed on.
static PENDING: AtomicBool = AtomicBool::new(false);
/// The handler that was installed before the runtime's, and its flags.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);
/// Whether the runtime's handler is installed (once per process).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Whether a warning waits to be passed on: one load, for the safe point.
#[inline]
pub(crate) fn pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}

/// Takes `SIGUSR1` for the job when the agent passes warnings on (version
/// 15 or newer); an older agent would drop them, and the signal is left as
/// it was.
pub(crate) fn install(agent_version: u16, job: &str, rank: u32) {
    if agent_version < WARNING_VERSION || INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: sigaction is plain data; zeroed is a valid empty value, and
    // every field used is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_warning as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above; `old` receives the previous action.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // Recorded before the handler can run.
    // SAFETY: reads the current action only (a null new action).
    if unsafe { libc::sigaction(WARNING_SIGNAL, std::ptr::null(), &mut old) } != 0 {
        INSTALLED.store(false, Ordering::Release);
        return;
    }
    PREVIOUS_HANDLER.store(old.sa_sigaction, Ordering::Release);
    PREVIOUS_FLAGS.store(old.sa_flags, Ordering::Release);
    // SAFETY: `action` is fully initialised; `on_warning` is async-signal
    // safe (atomics, and the previous handler, which was installed for
    // this signal).
    if unsafe { libc::sigaction(WARNING_SIGNAL, &action, std::ptr::null_mut()) } != 0 {
        INSTALLED.store(false, Ordering::Release);
        tracing::warn!(job, rank, "rank.warning: SIGUSR1 could not be taken");
    }
}

extern "C" fn on_warning(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    PENDING.store(true, Ordering::Relaxed);
    let previous = PREVIOUS_HANDLER.load(Ordering::Acquire);
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        return;
    }
    if PREVIOUS_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so
        // its handler takes these three arguments, which the kernel gave.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous) };
        handler(signal, info, context);
    } else {
        // SAFETY: a plain handler, installed for this signal.
        let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
        handler(signal);
    }
}

/// Passes a pending warning to the agent, from a safe point.
pub(crate) fn pass_on() {
    send_warned(WARNING_SIGNAL, &PENDING);
}

/// Passes `signal`, pending in `pending`, to the agent. A runtime busy in
/// another thread keeps it for the next safe point.
pub(crate) fn send_warned(signal: libc::c_int, pending: &AtomicBool) {
    let Some(guard) = crate::runtime::try_lock() else {
        return;
    };
    let Some(runtime) = guard.as_ref() else {
        return;
    };
    let Some(conn) = runtime.conn.as_ref() else {
        return;
    };
    if !pending.swap(false, Ordering::AcqRel) {
        return;
    }
    tracing::info!(job = %runtime.job, rank = runtime.config.rank, signal, "rank.warned");
    if let Err(err) = conn.send(&RankToAgent::Warned { signal }) {
        tracing::warn!(job = %runtime.job, rank = runtime.config.rank, error = %err, "rank.warning_not_passed");
    }
}
