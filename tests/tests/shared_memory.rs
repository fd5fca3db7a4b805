//! Memory a rank shares with other processes is written through their
//! page tables, which its write tracking never sees. An MPI-3 shared
//! window whose segments are registered with `cryo_protect` and written
//! only by node neighbours must still come back from an incremental
//! checkpoint as it was.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::state::{have_mpi, steps, wait_child};
use cryo_tests::{output_text, wait_until};

const STEPS: &str = "24";

fn cryo(dir: &Path) -> Command {
    let mut cmd = cryo_in(dir);
    cmd.env("CRYO_DIRTY_TRACKING", "on");
    cmd
}

fn logged_steps(path: &Path) -> u64 {
    steps(&fs::read_to_string(path).unwrap_or_default())
        .last()
        .copied()
        .unwrap_or(0)
}

#[test]
fn a_shared_window_written_by_neighbours_survives_an_incremental_checkpoint() {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-shared-window-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("shared_window");
    compile_mpich_program("tests/programs/shared_window.c", &program);
    let reference = cryo(dir.path())
        .args([
            "run",
            "--job",
            "reference",
            "--nodes",
            "a:2,b:2",
            "-n",
            "4",
            "--",
        ])
        .arg(&program)
        .args([STEPS, "0", "reference.out"])
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", output_text(&reference));

    let stdout = dir.path().join("run.stdout");
    let mut run = cryo(dir.path())
        .args([
            "run", "--job", "window", "--nodes", "a:2,b:2", "-n", "4", "--",
        ])
        .arg(&program)
        .args([STEPS, "150", "run.out"])
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(dir.path().join("run.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_until("step 4", Duration::from_secs(60), || {
        logged_steps(&stdout) >= 4
    });
    let first = cryo(dir.path())
        .args(["checkpoint", "window"])
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", output_text(&first));
    let at_first = logged_steps(&stdout);
    // The neighbours write into every segment between the two checkpoints.
    wait_until("four more steps", Duration::from_secs(60), || {
        logged_steps(&stdout) >= at_first + 4
    });
    let second = cryo(dir.path())
        .args(["preempt", "window"])
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", output_text(&second));
    let status = wait_child(&mut run, Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "preempted before the end");
    assert!(logged_steps(&stdout) < 24, "preempted before the end");

    let restart = cryo(dir.path())
        .args(["restart", "window", "--nodes", "c:2,d:2"])
        .output()
        .unwrap();
    assert!(restart.status.success(), "{}", output_text(&restart));
    let (want, got) = (
        fs::read_to_string(dir.path().join("reference.out")).unwrap(),
        fs::read_to_string(dir.path().join("run.out")).unwrap(),
    );
    assert_eq!(
        want,
        got,
        "the segments came back stale\n{}",
        output_text(&restart)
    );
}
