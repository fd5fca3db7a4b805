//! What `cryo checkpoint`, `preempt` and `status` print: a checkpoint's
//! outcome, what a restart from it will not give back, and a running job's
//! state.

use std::process::ExitCode;

use anyhow::{bail, Result};
use cryo_core::protocol::{JobResponse, JobStatus};

use crate::human;

/// What a job falls back on when an epoch aborts: its newest committed
/// epoch (`latest`, as the store says, if it could be read), if it has
/// one yet.
pub(crate) fn what_stands<E>(latest: Result<Option<u64>, E>) -> String {
    match latest {
        Ok(Some(epoch)) => format!("epoch {epoch}, the newest committed, stands"),
        Ok(None) => "the job has no committed epoch yet".into(),
        Err(_) => "the previous committed epoch, if any, stands".into(),
    }
}

/// Names what a restart from the epoch just committed will not give back.
pub(crate) fn warn_unrestorable(store: &std::path::Path, job: &str, response: &JobResponse) {
    let JobResponse::Committed { epoch, .. } = response else {
        return;
    };
    let manifest = cryo_core::Store::open(store)
        .and_then(|s| s.existing_job(job))
        .map_err(|e| e.to_string())
        .and_then(|j| j.load_manifest(*epoch).map_err(|e| e.to_string()));
    match manifest {
        Ok(manifest) => {
            for warning in crate::holdings::warnings(&manifest) {
                cryo_core::say!("job {job}: epoch {epoch}: warning: {warning}");
            }
        }
        Err(err) => cryo_core::say!(
            "job {job}: epoch {epoch}: cannot read its manifest to list what a restart will not restore: {err}"
        ),
    }
}

/// Whether the running job's coordinator puts it back in Slurm's queue
/// when it stops it, and as which job: `None` when that cannot be read.
pub(crate) fn requeues(store: &std::path::Path, job: &str) -> Option<Option<String>> {
    let job_store = cryo_core::Store::open(store).ok()?.existing_job(job).ok()?;
    let addr = crate::registry::Registry::of(&job_store)
        .coordinator(job)
        .ok()?;
    Some(addr.requeues)
}

/// The job's newest committed epoch, as the store says; `Err` when the
/// store or the job cannot be read.
fn newest_committed(store: &std::path::Path, job: &str) -> Result<Option<u64>, ()> {
    cryo_core::Store::open(store)
        .and_then(|s| s.existing_job(job))
        .map_err(drop)
        .and_then(|j| j.latest_committed().map_err(drop))
}

/// How long `cryo preempt` waits for the job's `cryo run` to exit once
/// the job is told to stop (its launcher is given 10 s, then killed).
const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Once `cryo preempt` is answered: waits until the job's `cryo run` (or
/// restart) has exited, so that its nodes are free and a restart is not
/// refused, then says so and what becomes of the job. When its store
/// cannot be read, it neither waits nor doubts a checkpoint: the line then
/// says what a restart would do with one.
pub(crate) fn after_preempt(
    store: &std::path::Path,
    job: &str,
    requeues: Option<Option<String>>,
    response: &JobResponse,
) {
    if matches!(response, JobResponse::Refused { .. }) {
        return;
    }
    let job_store = cryo_core::Store::open(store)
        .and_then(|s| s.existing_job(job))
        .ok();
    let stopped = job_store
        .as_ref()
        .is_none_or(|j| crate::registry::Registry::of(j).wait_run_released(STOP_PATIENCE));
    if stopped
        && job_store
            .as_ref()
            .is_some_and(|j| crate::registry::Registry::of(j).finished())
    {
        // It ended on its own meanwhile (a rank had called cryo_finalize):
        // a restart would run its last steps again.
        println!("job {job}: finished on its own, as it had reached its end: there is nothing to restart");
        return;
    }
    let state = if stopped {
        "stopped".to_owned()
    } else {
        let secs = STOP_PATIENCE.as_secs();
        format!("stopping (its cryo run had not exited after {secs} s)")
    };
    let checkpointed = job_store
        .as_ref()
        .is_none_or(|j| j.latest_committed().map_or(true, |latest| latest.is_some()));
    let after = after_stop(job, requeues, checkpointed);
    println!("job {job}: {state}{after}");
}

/// What becomes of a job `cryo preempt` stops, for the line that says so.
pub(crate) fn after_stop(
    job: &str,
    requeues: Option<Option<String>>,
    checkpointed: bool,
) -> String {
    match (requeues, checkpointed) {
        (Some(Some(slurm_job)), true) => format!(
            "; Slurm job {slurm_job} goes back in the queue and resumes from its newest checkpoint (cryo run --requeue)"
        ),
        (Some(Some(slurm_job)), false) => format!(
            "; Slurm job {slurm_job} goes back in the queue and, with no checkpoint yet, starts again from the beginning"
        ),
        (Some(None), true) => format!(
            "; it is not requeued (its cryo run has no --requeue): `cryo restart {job}` resumes it from its newest checkpoint"
        ),
        (_, false) => {
            "; it has no checkpoint yet: run it again from the start with cryo run".to_owned()
        }
        (None, true) => String::new(),
    }
}

pub(crate) fn report_checkpoint(
    store: &std::path::Path,
    job: &str,
    response: &JobResponse,
) -> Result<ExitCode> {
    match response {
        JobResponse::Committed {
            epoch,
            max_pause_us,
            quiesce_us,
            bytes,
            written,
            elapsed_ms,
        } => {
            println!(
                "job {job}: epoch {epoch} committed: quiesced in {:.1} ms, {} copied, longest rank pause {:.1} ms, {} written, {:.2} s",
                *quiesce_us as f64 / 1000.0,
                human::bytes(*bytes),
                *max_pause_us as f64 / 1000.0,
                human::bytes(*written),
                *elapsed_ms as f64 / 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        JobResponse::Aborted { epoch, reason } => {
            let stands = what_stands(newest_committed(store, job));
            cryo_core::say!("job {job}: epoch {epoch} aborted: {reason}; {stands}");
            Ok(ExitCode::FAILURE)
        }
        JobResponse::Refused { reason } => {
            cryo_core::say!("job {job}: checkpoint refused: {reason}");
            Ok(ExitCode::FAILURE)
        }
        JobResponse::Status(_) => bail!("unexpected answer from the coordinator"),
    }
}

/// Renders `cryo status` with a progress bar for a checkpoint in flight.
pub fn render_status(status: &JobStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "job {}: {} ranks", status.job, status.world_size);
    for node in &status.nodes {
        let _ = writeln!(
            out,
            "  node {:<16} ranks {:<12} {}",
            node.node,
            cryo_core::protocol::render_ranks(&node.ranks),
            if node.connected {
                "agent connected"
            } else {
                "AGENT LOST"
            }
        );
    }
    let _ = writeln!(
        out,
        "  last committed epoch: {}{}",
        status
            .last_committed
            .map_or("none".into(), |e| e.to_string()),
        status
            .restarted_from
            .map(|e| format!(" (restarted from epoch {e})"))
            .unwrap_or_default()
    );
    match &status.in_progress {
        None => {
            let _ = writeln!(out, "  no checkpoint in progress");
        }
        Some(p) => {
            let world = status.world_size.max(1);
            let done = if p.ranks_copied < world {
                p.ranks_copied
            } else {
                p.ranks_durable
            };
            let width = 30u32;
            let filled = (done * width / world).min(width) as usize;
            let secs = p.elapsed_ms as f64 / 1000.0;
            let _ = writeln!(
                out,
                "  epoch {} {}: [{}{}] {}/{} ranks copied, {}/{} durable, {} copied, {} written, {}",
                p.epoch,
                p.phase,
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                p.ranks_copied,
                status.world_size,
                p.ranks_durable,
                status.world_size,
                human::bytes(p.bytes_copied),
                human::bytes(p.bytes_written),
                human::rate(p.bytes_copied, secs)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_job_is_said_to_resume_only_from_a_checkpoint_it_has() {
        let requeued = Some(Some("7".to_owned()));
        assert!(after_stop("j", requeued.clone(), true).contains("resumes from its newest"));
        assert!(after_stop("j", requeued, false).contains("starts again from the beginning"));
        assert!(after_stop("j", Some(None), true).contains("`cryo restart j` resumes it"));
        for requeues in [Some(None), None] {
            let line = after_stop("j", requeues, false);
            assert!(line.contains("no checkpoint yet"), "{line}");
            assert!(!line.contains("resumes"), "{line}");
        }
        assert_eq!(after_stop("j", None, true), "");
    }
}
