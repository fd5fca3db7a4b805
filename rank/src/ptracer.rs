//! Lets the node's agent read this rank's memory where the Yama security
//! module restricts ptrace to a process's ancestors.
//!
//! The agent copies a parked rank (or its snapshot) with
//! `process_vm_readv`, which needs ptrace access to it. With
//! `kernel.yama.ptrace_scope = 1` (Ubuntu's default) only an ancestor may
//! have it, and the agent is the rank's sibling: the launcher started the
//! rank. `prctl(PR_SET_PTRACER, agent)` names the agent as an allowed
//! tracer of this process. The relation belongs to one process and is not
//! inherited, so a snapshot child names the agent again for itself.
//!
//! Without Yama the call fails with `EINVAL` and nothing is needed; with
//! scope 2 or 3 only a privileged agent can read the rank, and the agent
//! names the refusal when a checkpoint tries (`agent/src/procfs.rs`).

use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Names `agent_pid` as a process allowed to trace this one. Raw system
/// call only: also called in a snapshot child, where nothing else is safe.
pub(crate) fn allow_raw(agent_pid: libc::pid_t) -> Result<(), Errno> {
    let pid = libc::c_ulong::try_from(agent_pid).map_err(|_| Errno::EINVAL)?;
    // SAFETY: prctl with integer arguments only; it changes nothing but
    // Yama's list of this process's allowed tracers.
    let done = unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PTRACER as libc::c_ulong,
            pid,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Names the agent at the other end of `agent` as this rank's tracer, at
/// `cryo_init`: a kernel without Yama (`EINVAL`) needs nothing; another
/// failure is logged, and the agent names the refusal should a checkpoint
/// then fail to read the rank.
pub(crate) fn allow_agent(agent: &UnixStream, job: &str, rank: u32) {
    let agent_pid = match getsockopt(agent, PeerCredentials) {
        // Only this rank's user (or root) may read it: an agent of
        // another user's is not named, whatever socket it bound.
        Ok(creds) if creds.uid() != 0 && creds.uid() != nix::unistd::geteuid().as_raw() => {
            tracing::warn!(
                job,
                rank,
                agent_uid = creds.uid(),
                "rank.ptracer: the agent is another user's"
            );
            return;
        }
        Ok(creds) => creds.pid(),
        Err(err) => {
            tracing::warn!(job, rank, error = %err, "rank.ptracer: the agent's pid (SO_PEERCRED)");
            return;
        }
    };
    match allow_raw(agent_pid) {
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(err) => tracing::warn!(
            job,
            rank,
            agent_pid,
            error = %err,
            "rank.ptracer: could not let the agent read this rank (PR_SET_PTRACER)"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_that_does_not_fit_is_refused_without_a_call() {
        assert_eq!(allow_raw(-5), Err(Errno::EINVAL));
    }
}
