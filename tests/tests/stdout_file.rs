//! A rank's stdout sent to a file of its own before `cryo_init` (`freopen`
//! after `MPI_Init`, as codes that keep a log per rank do; `srun --output`
//! hands tasks such a file too): the restarted run opens it again the same
//! way, emptying it with "w", and cryo gives it back as it was at the
//! checkpoint, so each rank's file ends with every line once, in order.
//! Even with the job's whole directory removed after the checkpoint: the
//! restart makes it again, starts the launcher in it and puts the files
//! back. A file opened after `cryo_init` at every start, with
//! `fopen(name, "w")`, `open` with `O_TRUNC` or `freopen(name, "w",
//! stdout)` (`rank/src/reopen/`), is continued as it was at the checkpoint,
//! not emptied.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::state::{have_mpi, wait_child};
use cryo_tests::{output_text, wait_until};

const RANKS: u32 = 2;
const STEPS: u64 = 80;

/// What rank `rank`'s file holds after an uninterrupted run: at step s
/// the running sum of the allreduce of `k + rank` over both ranks and the
/// steps k so far, (s + 1)².
fn expected(rank: u64) -> String {
    (0..STEPS)
        .map(|step| {
            let acc = (step + 1) * (step + 1);
            format!("rank {rank} step {step} acc {acc}.0\n")
        })
        .collect()
}

fn cryo(dir: &Path) -> Command {
    cryo_in(dir)
}

fn survives(mode: &str, remove_the_run_directory: bool) {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-stdout-file-")
        .tempdir()
        .unwrap();
    let dir = dir.path();
    let program = dir.join("prints_each_step");
    let run_dir = dir.join("run");
    fs::create_dir(&run_dir).unwrap();
    compile_mpich_program("tests/programs/prints_each_step.c", &program);
    let log = dir.join("run.log");
    let mut run = cryo(dir)
        .current_dir(&run_dir)
        .args(["run", "--job", "logs", "--nodes", "a:1,b:1", "-n"])
        .arg(RANKS.to_string())
        .arg("--")
        .arg(&program)
        .args([&STEPS.to_string(), "20", mode])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let lines = |rank: u32| {
        fs::read_to_string(run_dir.join(format!("out.{rank}")))
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until("rank 1's 20th line", Duration::from_secs(60), || {
        lines(1) >= 20
    });
    let checkpoint = cryo(dir).args(["checkpoint", "logs"]).output().unwrap();
    assert!(checkpoint.status.success(), "{}", output_text(&checkpoint));
    let at = lines(1);
    wait_until("steps past the checkpoint", Duration::from_secs(60), || {
        lines(1) >= at + 5
    });
    cryo_tests::kill_every_process_mentioning(&dir.display().to_string());
    let _ = wait_child(&mut run, Duration::from_secs(30));
    if remove_the_run_directory {
        fs::remove_dir_all(&run_dir).unwrap();
    }

    let restart = cryo(dir)
        .args(["restart", "logs", "--nodes", "c:2"])
        .output()
        .unwrap();
    let said = format!(
        "{}\n--- the first run:\n{}",
        output_text(&restart),
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(restart.status.success(), "{said}");
    for rank in 0..RANKS {
        let held = fs::read_to_string(run_dir.join(format!("out.{rank}"))).unwrap();
        assert!(
            held == expected(u64::from(rank)),
            "out.{rank} ({mode}) differs from an uninterrupted run's:\n{held}\n{said}"
        );
    }
    if mode == "w" && !remove_the_run_directory {
        // The job has finished: restarting it again runs it again from
        // its checkpoint, and says so.
        let again = cryo(dir)
            .args(["restart", "logs", "--nodes", "c:2"])
            .output()
            .unwrap();
        let said = output_text(&again);
        assert!(again.status.success(), "{said}");
        assert!(
            said.contains("finished when it last ran; this restart runs it again from epoch 1"),
            "{said}"
        );
    }
}

#[test]
fn stdout_sent_to_a_file_before_cryo_init_comes_back_as_it_was() {
    survives("w", false);
}

#[test]
fn stdout_appended_to_a_file_before_cryo_init_holds_each_line_once() {
    survives("a", false);
}

#[test]
fn a_job_directory_removed_after_the_checkpoint_is_made_again() {
    survives("w", true);
}

#[test]
fn a_log_opened_again_with_fopen_w_after_a_restart_continues() {
    survives("fopen", false);
}

#[test]
fn a_log_opened_again_with_o_trunc_after_a_restart_continues() {
    survives("open", false);
}

#[test]
fn stdout_sent_to_a_file_after_cryo_init_continues_after_a_restart() {
    survives("freopen", false);
}
