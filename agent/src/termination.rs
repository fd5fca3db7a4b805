//! A `SIGTERM` to the agent itself. Slurm's process tracking sends it to
//! every process of the step, the agent (a child of slurmstepd) among
//! them, at `scancel` or a preemption it gives no warning of. The ranks
//! take theirs as a request for a checkpoint and a stop
//! (`rank/src/termination.rs`), which needs their agent: a coordinated
//! agent with ranks stays until the last of them has gone (the stop after
//! the checkpoint ends them) or [`GRACE`] has passed. With none, without
//! its coordinator, and for an agent serving alone, `SIGTERM` ends it at
//! once, as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::server::Shared;

/// The longest an agent stays for its ranks after a `SIGTERM`: longer than
/// a rank's own grace (30 s), so that a rank waiting for a checkpoint is
/// not left without its agent.
pub(crate) const GRACE: Duration = Duration::from_secs(45);

/// Set by the handler.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_signal: libc::c_int) {
    TERMINATED.store(true, Ordering::Release);
}

/// Takes `SIGTERM` and watches for it; `shared` tells whether ranks are
/// still there. Returns without taking it if it cannot watch.
pub(crate) fn watch(shared: Weak<Shared>) {
    let Some(first) = shared.upgrade() else {
        return;
    };
    let (job, node) = (first.config.job.clone(), first.config.node.clone());
    drop(first);
    let spawned = std::thread::Builder::new()
        .name("cryo-sigterm".into())
        .spawn(move || {
            while !TERMINATED.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let since = Instant::now();
            let mut said = false;
            loop {
                let (ranks, coordinated) = shared.upgrade().map_or((0, false), |s| {
                    let linked = s.link.as_ref().is_some_and(|l| l.is_connected());
                    (s.rank_conns().len(), linked)
                });
                if ranks == 0 {
                    tracing::info!(job = %job, node = %node, "agent.sigterm: no ranks left; the agent ends");
                    break;
                }
                if !coordinated {
                    tracing::info!(job = %job, node = %node, ranks, "agent.sigterm: no coordinator to checkpoint the ranks; the agent ends");
                    break;
                }
                if since.elapsed() >= GRACE {
                    tracing::warn!(job = %job, node = %node, ranks, grace_s = GRACE.as_secs(), "agent.sigterm: the ranks are still there; the agent ends");
                    break;
                }
                if !said {
                    said = true;
                    tracing::info!(job = %job, node = %node, ranks, "agent.sigterm: staying for the ranks' checkpoint and stop");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            end_now();
        });
    if spawned.is_err() {
        return;
    }
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_term as *const () as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`; `on_term` only
    // stores to an atomic, which is async-signal safe.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Gives `SIGTERM` its default action back and sends it to this process.
fn end_now() {
    // SAFETY: sigaction is plain data; SIG_DFL is a valid action; kill has
    // no preconditions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}
