//! `cryo run --finalize-timeout`: a job whose ranks all called
//! `cryo_finalize` but whose launcher never ends (an MPI library stuck in
//! `MPI_Finalize`) is stopped after the timeout and counted finished;
//! without the option, `cryo run` waits for the launcher as before.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryo_tests::heat2d::{built, compile_mpich_program};
use cryo_tests::output_text;
use cryo_tests::state::have_mpi;

fn compile(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("hangs_in_finalize");
    compile_mpich_program("tests/programs/hangs_in_finalize.c", &out);
    out
}

fn cryo_run(dir: &std::path::Path, program: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(built().join("cryo"));
    cmd.env("CRYO_STORE", dir.join("store"))
        .env_remove("CRYO_FINALIZE_TIMEOUT")
        .args(["run", "--job", "fin", "--nodes", "a:1,b:1", "-n", "2"])
        .arg("--scratch")
        .arg(dir.join("scratch"))
        .args(extra)
        .arg("--")
        .arg(program)
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

#[test]
fn a_launcher_stuck_after_every_rank_finalized_is_stopped() {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-finalize-")
        .tempdir()
        .unwrap();
    let program = compile(dir.path());

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
