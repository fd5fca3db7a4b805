//! `cryo run --finalize-timeout`: a job whose ranks all called
//! `cryo_finalize` but whose launcher never ends (an MPI library stuck in
//! `MPI_Finalize`) is stopped after the timeout and counted finished;
//! without the option, `cryo run` waits for the launcher as before.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::output_text;
use cryo_tests::state::have_mpi;

/// A scratch folder with the program compiled in it; `None` without MPI.
fn compiled() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    if !have_mpi() {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-finalize-")
        .tempdir()
        .unwrap();
    let program = compile(dir.path());
    Some((dir, program))
}

fn compile(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("hangs_in_finalize");
    compile_mpich_program("tests/programs/hangs_in_finalize.c", &out);
    out
}

fn cryo_run(dir: &std::path::Path, program: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = cryo_in(dir);
    cmd.env_remove("CRYO_FINALIZE_TIMEOUT")
        .args(["run", "--job", "fin", "--nodes", "a:1,b:1", "-n", "2"])
        .arg("--scratch")
        .arg(dir.join("scratch"))
        .args(extra)
        .arg("--")
        .arg(program);
    cmd
}

#[test]
fn a_launcher_stuck_after_every_rank_finalized_is_stopped() {
    let Some((dir, program)) = compiled() else {
        return;
    };

    // With the timeout: stopped about 2 s after both ranks finalized.
    let start = Instant::now();
    let out = cryo_run(dir.path(), &program, &["--finalize-timeout", "2"])
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("stopping it (--finalize-timeout)"), "{said}");
    // The job's output ends with the program's own lines: the launcher was
    // not given the chance to report the stop on it.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut last: Vec<&str> = stdout.lines().collect();
    last.sort_unstable();
    assert_eq!(last, ["rank 0 done", "rank 1 done"], "{said}");
    assert!(start.elapsed() < Duration::from_secs(60), "{said}");

    // Without it, cryo run waits for the launcher, as it always did.
    let mut child = cryo_run(dir.path(), &program, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let still_running = child.try_wait().unwrap().is_none();
    cryo_tests::kill_every_process_mentioning(&dir.path().display().to_string());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        still_running,
        "cryo run without --finalize-timeout did not wait for its launcher"
    );
}

/// A SIGTERM (a preemption, `scancel`) that comes once the ranks have
/// called `cryo_finalize` finds nothing to checkpoint: the job is ending
/// by itself, so `cryo run` lets it end (here by the finalize timeout)
/// and exits 0, instead of stopping it as preempted without a checkpoint
/// (which under Slurm requeued a finished job from its start).
#[test]
fn a_stop_asked_while_the_job_finishes_lets_it_end() {
    stop_while_finishing(false);
}

/// `cryo preempt` of a job that finishes meanwhile says that it finished:
/// it said "stopped" and "run it again from the start", which would run a
/// finished job's last steps again.
#[test]
fn a_preemption_of_a_job_that_finishes_says_it_finished() {
    stop_while_finishing(true);
}

/// Stops the job once both ranks called `cryo_finalize`: with
/// `cryo preempt` (`by_preempt`) or a SIGTERM to `cryo run`.
fn stop_while_finishing(by_preempt: bool) {
    let Some((dir, program)) = compiled() else {
        return;
    };
    let stdout = dir.path().join("run.stdout");
    let stderr = dir.path().join("run.stderr");
    let mut child = cryo_run(dir.path(), &program, &["--finalize-timeout", "6"])
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&stdout)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the ranks did not finish: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both ranks called cryo_finalize right after their line.
    std::thread::sleep(Duration::from_millis(1500));
    let preempt = by_preempt.then(|| {
        cryo_in(dir.path())
            .args(["preempt", "fin"])
            .output()
            .unwrap()
    });
    if !by_preempt {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "cryo run exited {status}:\n{said}");
    assert!(said.contains("is finishing"), "{said}");
    assert!(!said.contains("preempted"), "{said}");
    if let Some(preempt) = preempt {
        let answer = output_text(&preempt);
        // Refused once every rank has left cryo; a preemption that came
        // a moment sooner aborts its epoch and says so when the run ends.
        assert!(
            answer.contains("the job is left to end")
                || answer.contains("job fin: finished on its own"),
            "{answer}\n{said}"
        );
        assert!(
            !answer.contains("stopped") && !answer.contains("run it again"),
            "{answer}\n{said}"
        );
    }
}
