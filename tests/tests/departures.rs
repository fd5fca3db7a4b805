//! How a job that fails says which rank left first, and how: a rank that
//! calls `exit` before `cryo_finalize` is named with its status (its
//! runtime tells the agent as it exits), even when the launcher's kill of
//! another rank is reported first; one that leaves without running exit
//! handlers (`MPI_Abort`, a crash, a kill) is named as such.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::output_text;
use cryo_tests::state::have_mpi;

/// `cryo run` of `leaves_early` on two nodes, rank 1 leaving as `how`
/// says: its exit status and what it printed.
fn run_leaving(how: &str) -> Option<(std::process::ExitStatus, String)> {
    run_leaving_behind(how).map(|(status, said, _)| (status, said))
}

/// [`run_leaving`], and the processes of the job still running once
/// `cryo run` has exited (they are killed then).
fn run_leaving_behind(
    how: &str,
) -> Option<(std::process::ExitStatus, String, Vec<nix::unistd::Pid>)> {
    if !have_mpi() {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-departures-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("leaves_early");
    compile_mpich_program("tests/programs/leaves_early.c", &program);
    let out = cryo_in(dir.path())
        .args(["run", "--job", "leaves", "--nodes", "a:1,b:1", "-n", "2"])
        .arg("--scratch")
        .arg(dir.path().join("scratch"))
        .arg("--")
        .arg(&program)
        .arg(how)
        .output()
        .unwrap();
    let marker = dir.path().display().to_string();
    let left = cryo_tests::pids_where(|cmdline| {
        cmdline
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
    });
    cryo_tests::kill_every_process_mentioning(&marker);
    Some((out.status, output_text(&out), left))
}

#[test]
fn a_rank_that_exits_early_is_named_with_its_status() {
    let Some((status, said)) = run_leaving("exit") else {
        return;
    };
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("rank 1 (node b) left first: it exited with status 7 before cryo_finalize"),
        "{said}"
    );
}

#[test]
fn a_rank_that_aborts_is_named_as_ended_without_a_word() {
    let Some((status, said)) = run_leaving("abort") else {
        return;
    };
    assert!(!status.success(), "{said}");
    // Rank 1's abort and the launcher's kill of rank 0 both end a process
    // without a word: either may be reported first.
    assert!(
        said.contains("left first: its process ended without a word"),
        "{said}"
    );
    assert!(!said.contains("exited with status"), "{said}");
}

#[test]
fn ranks_that_vanish_under_a_launcher_that_ends_well_do_not_finish_the_job() {
    let Some((status, said)) = run_leaving("vanish") else {
        return;
    };
    assert!(
        said.contains("ranks 0, 1 did not finish") && said.contains("not marked finished"),
        "{said}"
    );
    assert!(!said.contains("job leaves finished"), "{said}");
    // The launcher's own status stays the exit status.
    assert!(status.success(), "{said}");
}

/// A helper a rank started in a session of its own, and that outlives the
/// rank, is stopped once the job has ended, as Hydra's proxies and ranks
/// are that a stopped launcher leaves running (they too run in sessions of
/// their own, where a signal to the launcher's process group does not
/// reach them): `cryo run` adopts whatever its launcher leaves behind.
#[test]
fn what_the_job_leaves_running_ends_with_it() {
    let Some((status, said, left)) = run_leaving_behind("helper") else {
        return;
    };
    assert!(status.success(), "{said}");
    assert!(said.contains("job leaves finished"), "{said}");
    assert!(
        left.is_empty(),
        "{left:?} of the job outlived its cryo run:\n{said}"
    );
    assert!(
        said.contains("stopped what the job's launcher left running after it ended ("),
        "{said}"
    );
}

/// `kill -9` of `cryo run` (the OOM killer, an impatient user) takes its
/// launcher, ranks and agents with it: nothing of the job computes on
/// unseen beside the copy a restart would start.
#[test]
fn a_killed_cryo_run_takes_its_job_with_it() {
    use std::time::Duration;
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-killed-run-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("prints_each_step");
    compile_mpich_program("tests/programs/prints_each_step.c", &program);
    let stdout = dir.path().join("job.stdout");
    let cryo = |args: &[&str]| {
        let mut cmd = cryo_in(dir.path());
        cmd.args(args);
        cmd
    };
    let mut run = cryo(&["run", "--job", "killed", "--nodes", "a:1,b:1", "-n", "2"])
        .arg("--scratch")
        .arg(dir.path().join("scratch"))
        .arg("--")
        .arg(&program)
        .args(["100000", "20"])
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(dir.path().join("run.stderr")).unwrap())
        .spawn()
        .unwrap();
    cryo_tests::wait_until("20 lines", Duration::from_secs(60), || {
        cryo_tests::lines(&stdout) >= 20
    });
    let checkpoint = cryo(&["checkpoint", "killed"]).output().unwrap();
    assert!(checkpoint.status.success(), "{}", output_text(&checkpoint));
    run.kill().unwrap();
    run.wait().unwrap();
    let marker = dir.path().display().to_string();
    let job_processes =
        || cryo_tests::pids_where(|cmdline| String::from_utf8_lossy(cmdline).contains(&marker));
    let left = std::time::Instant::now();
    while !job_processes().is_empty() && left.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivors = job_processes();
    cryo_tests::kill_every_process_mentioning(&marker);
    assert!(
        survivors.is_empty(),
        "the job's processes outlived its cryo run by 30 s: {survivors:?}"
    );
}
