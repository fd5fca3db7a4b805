//! Waiting for a requeued Slurm job, shared by the single-node Slurm tests
//! and the namespace cluster's.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{output_text, Heat2dFiles};

/// What the wait needs to know of a Slurm cluster.
pub trait SlurmJobs {
    /// `scontrol show job ID`'s `JobState` and `Restarts`.
    fn job_state(&self, id: &str) -> (String, u32);
    /// Lets a pending job start now (`scontrol update JobId=ID
    /// StartTime=now`).
    fn release(&self, id: &str);
    /// Whether a slurmstepd of the job's previous start is still cleaning
    /// up (the next start reuses its step ids, so it must be gone first).
    fn previous_start_alive(&self, _id: &str) -> bool {
        false
    }
    /// The daemons' logs, for a failure's message.
    fn logs(&self) -> String;
}

/// Waits for job `id` to complete, letting each requeued start go as soon
/// as the previous one has been cleaned up instead of after Slurm's fixed
/// hold for requeued jobs (about two minutes). Returns how often it was
/// restarted; panics with the job's output (`job_out`) on failure or after
/// `timeout`.
pub fn wait_done(slurm: &impl SlurmJobs, id: &str, timeout: Duration, job_out: &Path) -> u32 {
    let start = Instant::now();
    let mut pending_since: Option<(u32, Instant)> = None;
    let output = || fs::read_to_string(job_out).unwrap_or_default();
    loop {
        let (state, restarts) = slurm.job_state(id);
        if state == "PENDING" && pending_since.is_none_or(|(seen, _)| seen != restarts) {
            pending_since = Some((restarts, Instant::now()));
        }
        // slurmd refuses a start within the second its previous credential
        // was revoked ("Job credential revoked"): give it a few seconds,
        // and the previous steps time to go.
        let settled = pending_since.is_some_and(|(_, t)| t.elapsed() > Duration::from_secs(5));
        match state.as_str() {
            "COMPLETED" => return restarts,
            "PENDING" if restarts > 0 && settled && !slurm.previous_start_alive(id) => {
                slurm.release(id);
            }
            "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY" => {
                // A job requeued while its script ends passes through an
                // end state on its way back to PENDING.
                std::thread::sleep(Duration::from_secs(3));
                let (again, restarts_again) = slurm.job_state(id);
                assert!(
                    again != state || restarts_again != restarts,
                    "job {id} ended {state}; its output:\n{}\n{}",
                    output(),
                    slurm.logs()
                );
            }
            _ => {}
        }
        assert!(
            start.elapsed() < timeout,
            "job {id} not done after {timeout:?} (state {state}); its output:\n{}\n{}",
            output(),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Submits the Rust heat2d with `slurm/cryo.sbatch` through `sbatch` (a
/// command carrying the cluster's `SLURM_CONF` and any extra environment),
/// with `files`' store, output and folder, then `options` (which override
/// the template's `#SBATCH` lines); returns the job id.
pub fn submit_heat2d(
    mut sbatch: Command,
    files: &Heat2dFiles,
    options: &[&str],
    step_ms: u32,
) -> String {
    let built = crate::heat2d::built();
    sbatch
        .env("PATH", path_with_built())
        .env("CRYO_LOG", "info")
        .arg("--parsable")
        .arg(format!("--cryo={}", files.path("store").display()))
        .arg(format!("--output={}", files.path("job.out").display()))
        .arg(format!("--chdir={}", files.dir().display()))
        .args(options)
        .arg(crate::heat2d::repo_root().join("slurm/cryo.sbatch"))
        .arg(built.join("heat2d"))
        .args(files.app_args("run", step_ms));
    submit(sbatch)
}

/// `PATH` with the built binaries first, so that job scripts find `cryo`.
pub fn path_with_built() -> String {
    format!(
        "{}:{}",
        crate::heat2d::built().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `sbatch`, whose options (`--parsable` among them: sbatch takes
/// options only before the script) and script are given, panics with its
/// output if it fails, and returns the job id.
pub fn submit(mut sbatch: Command) -> String {
    let out = sbatch.output().unwrap();
    assert!(
        out.status.success(),
        "sbatch failed:\n{}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// Whether Slurm can run here; `false` only when skipping was asked for.
pub fn slurm_available() -> bool {
    let missing: Vec<&str> = ["slurmctld", "slurmd", "munged", "sbatch"]
        .into_iter()
        .filter(|cmd| {
            Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    let problem = if !missing.is_empty() {
        Some(format!(
            "Slurm is not installed ({} missing); scripts/install-deps.sh installs slurm-wlm and munge",
            missing.join(", ")
        ))
    } else if !nix::unistd::geteuid().is_root() {
        Some("slurmd must run as root and these tests are not root".to_owned())
    } else {
        None
    };
    match problem {
        None => true,
        Some(problem) if std::env::var_os("CRYO_SKIP_SLURM").is_some() => {
            eprintln!("\n*** SKIPPED: the Slurm tests did not run: {problem} ***\n");
            false
        }
        Some(problem) => panic!(
            "the Slurm tests cannot run: {problem}. Set CRYO_SKIP_SLURM=1 to skip them knowingly."
        ),
    }
}
