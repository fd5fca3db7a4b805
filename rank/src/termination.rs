//! A `SIGTERM` that reaches a rank: `scancel`, a preemption Slurm gives no
//! warning of (`PreemptMode=REQUEUE` with a `GraceTime`), `kill`.
//!
//! Slurm sends it to every task of the job at once, and to `cryo run`:
//! left to its default action it ends the ranks before they can park, and
//! what they computed since the last checkpoint is lost. From `cryo_init`
//! on, a rank whose `SIGTERM` is still the default takes it instead: the
//! rank computes on to its next safe point, which passes it to its agent
//! (`RankToAgent::Warned`) and so to the coordinator, which takes the
//! checkpoint before the stop (as for a `SIGTERM` to `cryo run`, which
//! Slurm sends too). Parked for it, the rank waits until its agent says
//! its part is durable (`AgentToRank::Held`); a `SIGTERM` from then on
//! ends it as before, and the coordinator's stop of the launcher sends
//! one. Slurm's `SIGKILL` after its `KillWait` (or `GraceTime`) bounds the
//! whole, as it always did.
//!
//! A `SIGTERM` that no checkpoint answers still ends the rank: at once
//! when the agent says it cannot reach the coordinator (`Held` with epoch
//! 0), else after [`GRACE`] outside a park, when a thread of the runtime
//! gives the signal its default action. A `SIGTERM` in a child the application forked, or
//! after `cryo_finalize`, ends that process at once. An application that
//! installed its own `SIGTERM` handler before `cryo_init` keeps it (the
//! runtime leaves the signal alone), and one installed after takes the
//! signal back.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use cryo_core::protocol::TERMINATION_VERSION;

/// How long a `SIGTERM` waits, outside a park, for the checkpoint it asked
/// for: Slurm's default `KillWait`, past which Slurm kills the task anyway.
pub(crate) const GRACE: Duration = Duration::from_secs(30);

/// Set by the handler; cleared when the signal is passed on.
static PENDING: AtomicBool = AtomicBool::new(false);
/// The rank's process (a forked child inherits the handler, not the job).
static RANK_PID: AtomicI32 = AtomicI32::new(0);
/// Whether a `SIGTERM` has come (the grace thread is counting).
static TERMINATED: AtomicBool = AtomicBool::new(false);
/// Parked at a safe point: the agent, not the grace, decides.
static PARKED: AtomicBool = AtomicBool::new(false);
/// Held to the stop with a durable part, or finalized: `SIGTERM` ends.
static ENDS: AtomicBool = AtomicBool::new(false);
/// Whether the runtime's handler is installed (once per process).
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Whether the rank is a task of a Slurm step.
static SLURM_TASK: AtomicBool = AtomicBool::new(false);

/// Whether a `SIGTERM` waits to be passed on: one load, for the safe point.
#[inline]
pub(crate) fn pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}

/// Takes `SIGTERM` for the job when the agent passes it on (version 17 or
/// newer) and the application left it at its default action.
pub(crate) fn install(agent_version: u16, job: &str, rank: u32) {
    if agent_version < TERMINATION_VERSION || INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current action only (a null new action).
    if unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut old) } != 0 {
        return;
    }
    if old.sa_sigaction != libc::SIG_DFL {
        tracing::info!(
            job,
            rank,
            "rank.sigterm: the application handles SIGTERM itself; a SIGTERM takes no checkpoint"
        );
        return;
    }
    let (job_name, rank_no) = (job.to_owned(), rank);
    // It polls rather than waits on a pipe: an fd of the runtime's would
    // be one more for every checkpoint to tell from the application's.
    let spawned = std::thread::Builder::new()
        .name("cryo-sigterm".into())
        .spawn(move || grace(&job_name, rank_no));
    if let Err(err) = spawned {
        tracing::warn!(job, rank, error = %err, "rank.sigterm: not taken (no thread)");
        return;
    }
    SLURM_TASK.store(
        std::env::var_os("SLURM_STEP_ID").is_some(),
        Ordering::Release,
    );
    // SAFETY: getpid has no preconditions.
    RANK_PID.store(unsafe { libc::getpid() }, Ordering::Release);
    // SAFETY: as above; every field used is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_term as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised; `on_term` is async-signal
    // safe (atomics, getpid, sigaction and kill).
    if unsafe { libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut()) } != 0 {
        tracing::warn!(job, rank, "rank.sigterm: SIGTERM could not be taken");
    }
}

extern "C" fn on_term(_signal: libc::c_int, _info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: getpid is async-signal safe.
    let here = unsafe { libc::getpid() };
    if here != RANK_PID.load(Ordering::Acquire) || ENDS.load(Ordering::Acquire) {
        end_now();
        return;
    }
    PENDING.store(true, Ordering::Relaxed);
    TERMINATED.store(true, Ordering::Release);
}

/// Gives `SIGTERM` back its default action and sends it to the process:
/// it ends once the signal is unblocked (at once outside the handler,
/// when the handler returns inside it).
fn end_now() {
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    // SAFETY: a valid action for SIGTERM; then kill, async-signal safe.
    unsafe {
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}

/// How often the grace thread looks.
const TICK: Duration = Duration::from_millis(250);

/// The grace thread: once a `SIGTERM` has come, ends the rank when it has
/// spent [`GRACE`] outside a park without being finalized.
fn grace(job: &str, rank: u32) {
    crate::quiet_thread::block_signals();
    while !TERMINATED.load(Ordering::Acquire) {
        if ENDS.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(TICK);
    }
    tracing::info!(
        job,
        rank,
        "rank.sigterm: taken; the next safe point asks for a checkpoint and a stop"
    );
    let mut outside_park = Duration::ZERO;
    loop {
        let start = Instant::now();
        std::thread::sleep(TICK);
        if ENDS.load(Ordering::Acquire) {
            return;
        }
        if !PARKED.load(Ordering::Acquire) {
            outside_park += start.elapsed();
        }
        if outside_park >= GRACE {
            tracing::warn!(
                job,
                rank,
                grace_s = GRACE.as_secs(),
                "rank.sigterm: no checkpoint came; the rank ends"
            );
            end_now();
            return;
        }
    }
}

/// Passes a pending `SIGTERM` on to the agent, from a safe point.
pub(crate) fn pass_on() {
    crate::warning::send_warned(libc::SIGTERM, &PENDING);
}

/// Marks the rank parked (or running again): a park does not count
/// against the grace.
pub(crate) fn set_parked(parked: bool) {
    PARKED.store(parked, Ordering::Release);
}

/// The rank finalized: a `SIGTERM` ends it from now on.
pub(crate) fn may_end() {
    ENDS.store(true, Ordering::Release);
}

/// No checkpoint will answer a `SIGTERM` (the agent cannot reach the
/// coordinator): one ends the rank as it would have, and one that came
/// ends it now.
pub(crate) fn unanswered() {
    ENDS.store(true, Ordering::Release);
    if TERMINATED.load(Ordering::Acquire) {
        tracing::info!("rank.sigterm: no coordinator to checkpoint the job; the rank ends");
        end_now();
    }
}

/// The rank's part of the checkpoint before the stop is durable: a
/// `SIGTERM` ends it from now on. A Slurm task that had one ends now:
/// Slurm sent it to the whole step, which it kills after its `KillWait`,
/// and srun, told that the step is cancelled, passes on no more signals,
/// so the stop `cryo run` asks of it would not reach the rank. (Under
/// another launcher the stop does, and a rank that ended first would have
/// the launcher report its death in the job's output.)
pub(crate) fn held() {
    ENDS.store(true, Ordering::Release);
    if TERMINATED.load(Ordering::Acquire) && SLURM_TASK.load(Ordering::Acquire) {
        tracing::info!("rank.sigterm: the rank's part is durable; it ends");
        end_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_agent_leaves_sigterm_alone() {
        install(TERMINATION_VERSION - 1, "j", 0);
        assert!(!INSTALLED.load(Ordering::Acquire));
        // SAFETY: sigaction is plain data.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current action only.
        let read = unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut now) };
        assert_eq!(read, 0);
        assert_eq!(now.sa_sigaction, libc::SIG_DFL);
    }
}
