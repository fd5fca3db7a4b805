//! Which epoch `cryo run` continues from when it resumes a job: with
//! `--resume`, or by itself when Slurm starts a requeued job again.
//!
//! A job's name is its identity in the store, and names are reused: a
//! Slurm job id given again (a new cluster, a reinstalled controller), a
//! name typed twice, two `cryo run` in one batch script (both
//! `slurm-$SLURM_JOB_ID`). A resume must never pour another run's state
//! into this one, and overwrite that run's files with it. So it takes only
//! epochs of this run's own lineage (those after the epoch that was newest
//! when it started from the beginning, `JobCommand::fresh_after`), and a
//! Slurm requeue, which runs the same batch script again, only resumes the
//! command that took them.

use std::path::Path;

use anyhow::{bail, Result};
use cryo_core::store::Store;

use crate::registry::{JobCommand, Registry};
use crate::session;

/// Who asked for the resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `cryo run --resume`: the command may differ from the checkpointed
    /// one (more steps, say); a difference is said, not refused.
    ByUser,
    /// Slurm started a requeued job again: its batch script runs the same
    /// commands, so one that differs is another run under the same name.
    BySlurm,
}

/// The epoch to continue `command` from under the name `job` in `store`,
/// or none (start from the beginning).
pub fn epoch(store: &Path, job: &str, command: &JobCommand, asked: Asked) -> Result<Option<u64>> {
    let Ok(store) = Store::open(store) else {
        return Ok(None);
    };
    let Ok(job_store) = store.existing_job(job) else {
        return Ok(None);
    };
    let Some(latest) = job_store.latest_committed()? else {
        cryo_core::say!(
            "cryo: job {job:?} has no committed checkpoint yet; starting from the beginning"
        );
        return Ok(None);
    };
    let recorded = Registry::of(&job_store).command().ok();
    if let Some(recorded) = recorded.as_ref().filter(|r| !r.same_program(command)) {
        let what = format!(
            "job {job:?} in {} holds the checkpoints of {}, and this run is {}",
            store.root().display(),
            recorded.describe(),
            command.describe()
        );
        match asked {
            Asked::BySlurm => bail!(
                "{what}: not resuming another command's state. Give each `cryo run` its own \
                 name (`--job NAME`: two in one batch script share slurm-$SLURM_JOB_ID), or \
                 remove the other job's checkpoints"
            ),
            Asked::ByUser => {
                cryo_core::say!("cryo: warning: {what}; resuming it as asked (--resume)")
            }
        }
    }
    let floor = recorded.and_then(|r| r.fresh_after);
    if let Some(floor) = floor.filter(|f| latest <= *f) {
        cryo_core::say!(
            "cryo: job {job:?} has no checkpoint of this run yet (epochs up to {floor} are an \
             earlier run's under the same name); starting from the beginning"
        );
        return Ok(None);
    }
    let epoch = session::choose_restart_epoch(&job_store, None)?;
    if let Some(floor) = floor.filter(|f| epoch <= *f) {
        cryo_core::say!(
            "cryo: job {job:?}: no checkpoint of this run verifies (epochs up to {floor} are an \
             earlier run's); starting from the beginning"
        );
        return Ok(None);
    }
    let manifest = job_store.load_manifest(epoch)?;
    if manifest.world_size != command.world_size {
        bail!(
            "job {job:?} was checkpointed with {} ranks, but this run asks for {}; a restart keeps the world size",
            manifest.world_size,
            command.world_size
        );
    }
    cryo_core::say!("cryo: resuming job {job:?} from epoch {epoch}");
    if Registry::of(&job_store).finished() {
        // A requeue of a job that had ended (scontrol requeue after it
        // completed): its steps after the epoch run, and print, again.
        cryo_core::say!(
            "cryo: note: job {job:?} finished when it last ran; resuming runs it again from \
             epoch {epoch}"
        );
    }
    crate::gone_files::announce(&manifest, store.root());
    Ok(Some(epoch))
}
