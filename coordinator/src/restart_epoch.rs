//! Which committed epoch a restart starts from: the one asked for, which
//! must verify, or the newest that does.

use anyhow::{bail, Result};
use cryo_core::JobStore;

/// The epoch a restart starts from: `asked` (`cryo restart --epoch`), which
/// must be committed and verify, or else the newest committed epoch whose
/// chunks are all stored whole and undamaged (`JobStore::check_manifest`:
/// no decompression, so the restart does not decode every chunk twice),
/// warning about each newer one that is not.
pub fn choose_restart_epoch(job: &JobStore, asked: Option<u64>) -> Result<u64> {
    let mut epochs = job.committed_epochs()?;
    if let Some(asked) = asked {
        if !epochs.contains(&asked) {
            bail!("job {:?} has no committed epoch {asked}", job.name());
        }
        return match epoch_problem(job, asked) {
            None => Ok(asked),
            Some(problem) => bail!(
                "epoch {asked} of job {:?} {problem}: restart from another epoch (--epoch), or leave --epoch out for the newest that verifies",
                job.name()
            ),
        };
    }
    if epochs.is_empty() {
        bail!(
            "job {:?} has no committed epoch: no checkpoint of it was ever completed, so there is \
             nothing to restart from (run it again from the start with cryo run)",
            job.name()
        );
    }
    epochs.reverse();
    for (n, epoch) in epochs.iter().enumerate() {
        let Some(problem) = epoch_problem(job, *epoch) else {
            return Ok(*epoch);
        };
        let next = if n + 1 < epochs.len() {
            "falling back to an older epoch"
        } else {
            "and no older epoch is left"
        };
        cryo_core::say!("cryo: warning: epoch {epoch} {problem}; {next}");
        // Retention then keeps the sound epochs this restart falls back to.
        if let Err(err) = job.mark_damaged(*epoch, &problem) {
            tracing::warn!(job = %job.name(), epoch, error = %err, "epoch.damage_not_noted");
        }
    }
    bail!(
        "job {:?} has no committed epoch that passes verification",
        job.name()
    )
}

/// What is wrong with `epoch`'s image, if anything: unreadable metadata, or
/// chunks not stored whole and undamaged.
fn epoch_problem(job: &JobStore, epoch: u64) -> Option<String> {
    match job.load_manifest(epoch) {
        Ok(manifest) => {
            // Stored whole and undamaged is checked here, fast; each rank
            // hash-checks its chunks as it decodes them at restore.
            let report = job.check_manifest(&manifest);
            let first = report.bad.first()?;
            Some(format!(
                "fails verification ({} bad chunk uses; first: rank {} region {:?}: {})",
                report.bad.len(),
                first.rank,
                first.region,
                first.problem
            ))
        }
        Err(err) => Some(format!("is unreadable ({err})")),
    }
}
