//! A warning of the job's end that reached a rank (its `SIGUSR1`, from
//! Slurm's `--signal` without `B:`), passed on to the coordinator, which
//! does what a `SIGUSR1` to `cryo run` does (`rank/src/warning.rs`); and a
//! `SIGTERM` that reached a rank (`scancel`, a preemption without a
//! warning, `kill`), passed on as a `SIGTERM` to `cryo run`: a checkpoint
//! and a stop (`rank/src/termination.rs`).
//!
//! Every rank of a node is warned at once; the first warning of each
//! signal is passed on and the rest of the burst is not. The coordinator,
//! warned by every node, starts one checkpoint. The warning goes as a
//! control request (`JobRequest::Warning` or `Terminated`) on a connection
//! of its own, so that the reports on the agent's link keep their layout
//! for older coordinators.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::protocol::{write_message_as, JobRequest, TERMINATION_VERSION, WARNING_VERSION};
use cryo_core::token::JobToken;

use crate::config::AgentConfig;
use crate::link::CoordinatorLink;
use crate::ranks::RankConn;

/// Warnings within this time of one passed on are the same burst.
const BURST: Duration = Duration::from_secs(30);

/// When this agent last passed a warning (`SIGUSR1`) on.
static LAST: Mutex<Option<Instant>> = Mutex::new(None);
/// When this agent last passed a `SIGTERM` on.
static LAST_TERM: Mutex<Option<Instant>> = Mutex::new(None);

/// Passes the warning (`signal`) of rank `conn` on to the coordinator,
/// unless one was passed on moments ago or there is no coordinator to
/// tell; a `SIGTERM` that cannot be passed on is answered to the rank as
/// unanswered, so that it ends.
pub(crate) fn pass_on(
    config: &AgentConfig,
    link: Option<&CoordinatorLink>,
    conn: &Arc<RankConn>,
    signal: i32,
) {
    let (job, node, rank) = (&config.job, &config.node, conn.rank);
    let terminated = signal == libc::SIGTERM;
    let unanswered = || {
        if terminated {
            conn.tell_unanswered();
        }
    };
    let name = nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"));
    let (Some(link), Some(token)) = (link.filter(|l| l.is_connected()), &config.token) else {
        tracing::warn!(job = %job, node = %node, rank, signal = %name, "rank.warned: no coordinator to pass it on to");
        unanswered();
        return;
    };
    let (needed, last) = if terminated {
        (TERMINATION_VERSION, &LAST_TERM)
    } else {
        (WARNING_VERSION, &LAST)
    };
    if link.version() < needed {
        tracing::warn!(job = %job, node = %node, rank, signal = %name, coordinator_version = link.version(), "rank.warned: the coordinator is too old to take it");
        unanswered();
        return;
    }
    if !first_of_burst(last, Instant::now()) {
        tracing::debug!(job = %job, node = %node, rank, signal = %name, "rank.warned: already passed on");
        return;
    }
    tracing::info!(job = %job, node = %node, rank, signal = %name, "rank.warned: passed on to the coordinator");
    let from = format!("{name} to rank {rank} on node {node}");
    let request = if terminated {
        JobRequest::Terminated { from }
    } else {
        JobRequest::Warning { from }
    };
    let (addr, job, node, token, conn) = (
        link.addr().to_owned(),
        job.clone(),
        node.clone(),
        token.clone(),
        Arc::clone(conn),
    );
    // The rank's reader must not wait on the coordinator.
    let spawned = std::thread::Builder::new()
        .name("cryo-warning".into())
        .spawn(move || {
            if let Err(err) = send(&addr, &job, &node, &token, &request, needed) {
                tracing::error!(job = %job, node = %node, coordinator = %addr, error = %err, "rank.warning_lost");
                if terminated {
                    conn.tell_unanswered();
                }
            }
        });
    if let Err(err) = spawned {
        tracing::error!(job = %config.job, error = %err, "rank.warning_lost");
    }
}

/// Whether a warning at `now` starts a new burst; records it if so.
fn first_of_burst(last: &Mutex<Option<Instant>>, now: Instant) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_some_and(|at| now.saturating_duration_since(at) < BURST) {
        return false;
    }
    *last = Some(now);
    true
}

fn send(
    addr: &str,
    job: &str,
    node: &str,
    token: &JobToken,
    request: &JobRequest,
    needed: u16,
) -> Result<(), String> {
    let stream = crate::link::try_connect(addr).map_err(|e| format!("connecting: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let version = auth::greet_as_control(&stream, job, format!("cryo-agent on {node}"), token)
        .map_err(|e| e.to_string())?;
    if version < needed {
        return Err(format!(
            "the coordinator speaks protocol version {version}, older than {needed}"
        ));
    }
    write_message_as(&mut &stream, request, version).map_err(|e| format!("sending: {e}"))?;
    // Not answered: the coordinator closes the connection once it has it.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = [0u8; 64];
    let _ = std::io::Read::read(&mut &stream, &mut rest);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_warnings_is_passed_on_once() {
        let last = Mutex::new(None);
        let t0 = Instant::now();
        assert!(first_of_burst(&last, t0));
        assert!(!first_of_burst(&last, t0 + Duration::from_millis(5)));
        assert!(!first_of_burst(
            &last,
            t0 + BURST - Duration::from_millis(1)
        ));
        assert!(first_of_burst(&last, t0 + BURST));
    }
}
