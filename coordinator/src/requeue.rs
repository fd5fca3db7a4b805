//! Putting a Slurm job back in the queue after its preemption checkpoint.

use std::process::Command;

/// Puts this Slurm job back in the queue after a preemption checkpoint;
/// when it starts again, `cryo run` resumes from the newest checkpoint.
pub(crate) fn requeue_slurm_job(job: &str) {
    let Some(id) = this_slurm_job() else {
        cryo_core::say!("cryo: --requeue: not inside a Slurm job (no SLURM_JOB_ID); not requeued");
        return;
    };
    cryo_core::say!("cryo: requeueing Slurm job {id}");
    match Command::new("scontrol").arg("requeue").arg(&id).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("pending") => {
            cryo_core::say!("cryo: Slurm job {id} is already back in the queue");
        }
        Ok(out) => cryo_core::say!(
            "cryo: scontrol requeue {id} failed ({}): {}; the job stays out of the queue \
             (Slurm refuses a job submitted with --no-requeue, or where JobRequeue=0): \
             `cryo restart {job}` in a new allocation resumes it from its newest checkpoint",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => cryo_core::say!(
            "cryo: cannot run scontrol requeue {id}: {err}; `cryo restart {job}` in a new \
             allocation resumes the job from its newest checkpoint"
        ),
    }
}

/// The Slurm job this process runs in, as `scontrol requeue` names it;
/// `None` outside Slurm.
pub(crate) fn this_slurm_job() -> Option<String> {
    let id = std::env::var("SLURM_JOB_ID")
        .ok()
        .filter(|id| !id.is_empty())?;
    Some(requeue_id(id, |name| std::env::var(name).ok()))
}

/// The id that names this job alone to `scontrol requeue`: an array task's
/// `ARRAY_TASK` form, since the first task's own job id is the array's
/// and would requeue every task of it.
fn requeue_id(job_id: String, var: impl Fn(&str) -> Option<String>) -> String {
    match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(array), Some(task)) if !array.is_empty() && !task.is_empty() => {
            format!("{array}_{task}")
        }
        _ => job_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_task_is_requeued_alone() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                (pairs.iter())
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(requeue_id("13".into(), env(&[])), "13");
        let task = env(&[("SLURM_ARRAY_JOB_ID", "13"), ("SLURM_ARRAY_TASK_ID", "1")]);
        assert_eq!(requeue_id("13".into(), task), "13_1");
        let task = env(&[("SLURM_ARRAY_JOB_ID", "13"), ("SLURM_ARRAY_TASK_ID", "0")]);
        assert_eq!(requeue_id("14".into(), task), "13_0");
    }
}
