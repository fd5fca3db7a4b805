//! The restart figure: every rank killed, the agent armed with the epoch,
//! the ranks started again, timed until each says it restarted.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_agent::client;
use cryo_core::protocol::{ControlRequest, ControlResponse};

use super::{spawn_rank, status, wait_until, AgentBenchError, Config, Kill};

/// Kills the ranks (`children` holds the agent first), restarts them from
/// `epoch` with `restore_threads` (default: the runtime's), and returns
/// the time from starting them to every rank restored.
pub(super) fn restart(
    cfg: &Config<'_>,
    socket: &Path,
    children: &mut Kill,
    epoch: u64,
    restore_threads: Option<usize>,
) -> Result<u64, AgentBenchError> {
    for child in children.0.iter_mut().skip(1) {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.0.truncate(1);
    wait_until("the ranks to leave", Duration::from_secs(30), || {
        Ok(status(socket)?.ranks.is_empty())
    })?;
    match client::request(socket, &ControlRequest::ArmRestart { epoch: Some(epoch) })? {
        ControlResponse::RestartArmed { .. } => {}
        other => {
            return Err(AgentBenchError::Answer {
                what: "arming the restart",
                answer: format!("{other:?}"),
            })
        }
    }
    let errs: Vec<PathBuf> = (0..cfg.procs)
        .map(|r| {
            cfg.dir
                .join(format!("p{}-s{}-r{r}.err", cfg.procs, cfg.size >> 20))
        })
        .collect();
    let t = Instant::now();
    for rank in 0..cfg.procs {
        children
            .0
            .push(spawn_rank(cfg, socket, rank, restore_threads)?);
    }
    wait_until("every rank to restart", Duration::from_secs(600), || {
        Ok(errs.iter().all(|e| {
            fs::read_to_string(e)
                .map(|t| t.contains("restarted from epoch"))
                .unwrap_or(false)
        }))
    })?;
    Ok(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
}
