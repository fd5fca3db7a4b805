//! `cryo run` resuming a job by itself (`--resume`, or a Slurm requeue's
//! start) takes only the checkpoints of its own run: a job name used
//! again by a run that started from the beginning (a Slurm job id given
//! again, two `cryo run` in one batch script) never resumes the earlier
//! run's state, and a requeue's start refuses a command other than the
//! one that took the checkpoints.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::Path;
use std::process::Output;

use cryo_tests::heat2d::{built, Mpi};
use cryo_tests::output_text;

/// `cryo run --job res` of 2 MPI ranks of `quiesce-bench` for `secs`
/// seconds, with `extra` options and environment.
fn run(dir: &Path, extra: &[&str], env: &[(&str, &str)], secs: &str) -> Output {
    std::process::Command::new(built().join("cryo"))
        .env("CRYO_STORE", dir.join("store"))
        .env_remove("SLURM_RESTART_COUNT")
        .envs(env.iter().copied())
        .current_dir(dir)
        .args(["run", "--job", "res", "-n", "2", "--nodes", "a:2"])
        .args(extra)
        .arg("--")
        .arg(built().join("quiesce-bench"))
        .args([
            "--trials",
            "0",
            "--state-bytes",
            "1048576",
            "--run-secs",
            secs,
        ])
        .output()
        .unwrap()
}

#[test]
fn a_resume_takes_only_its_own_runs_checkpoints() {
    if let Some(problem) = Mpi::Mpich.missing() {
        eprintln!("SKIPPED: {problem} (install mpich); the resume test did not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // An earlier run under the name, with checkpoints.
    let earlier = run(dir, &["--interval", "1"], &[], "5");
    let said = output_text(&earlier);
    assert!(
        earlier.status.success() && said.contains("committed"),
        "{said}"
    );

    // The name used again from the beginning, for another command; then
    // resumed before it took a checkpoint of its own.
    let fresh = run(dir, &[], &[], "0");
    assert!(fresh.status.success(), "{}", output_text(&fresh));
    let resumed = run(dir, &["--resume"], &[], "0");
    let said = output_text(&resumed);
    assert!(resumed.status.success(), "{said}");
    assert!(
        said.contains("has no checkpoint of this run yet") && !said.contains("resuming job"),
        "resumed the earlier run's checkpoint:\n{said}"
    );

    // A requeued Slurm job's start with a command other than the one
    // recorded: refused before anything starts.
    let requeued = run(dir, &[], &[("SLURM_RESTART_COUNT", "1")], "1");
    let said = output_text(&requeued);
    assert!(!requeued.status.success(), "{said}");
    assert!(
        said.contains("not resuming another command's state") && said.contains("--run-secs 0"),
        "{said}"
    );

    // `cryo restart` still restarts the newest epoch, as asked, but says
    // whose it is.
    let restarted = std::process::Command::new(built().join("cryo"))
        .env("CRYO_STORE", dir.join("store"))
        .current_dir(dir)
        .args(["restart", "res", "--nodes", "a:2"])
        .output()
        .unwrap();
    let said = output_text(&restarted);
    assert!(said.contains("is an earlier run's"), "{said}");
}
