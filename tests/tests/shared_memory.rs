//! Memory a rank shares with other processes is written through their
//! page tables, which its write tracking never sees. An MPI-3 shared
//! window whose segments are registered with `cryo_protect` and written
//! only by node neighbours must still come back from an incremental
//! checkpoint as it was.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::Path;
use std::process::Command;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::output_text;
use cryo_tests::preempted::Flow;
use cryo_tests::state::have_mpi;

const STEPS: &str = "24";

fn cryo(dir: &Path) -> Command {
    let mut cmd = cryo_in(dir);
    cmd.env("CRYO_DIRTY_TRACKING", "on");
    cmd
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

    // The neighbours write into every segment between the two checkpoints.
    let cryo = || cryo(dir.path());
    let flow = Flow {
        cryo: &cryo,
        dir: dir.path(),
        job: "window",
    };
    let said = flow.checkpoint_preempt_restart(
        &[
            program.as_ref(),
            STEPS.as_ref(),
            "150".as_ref(),
            "run.out".as_ref(),
        ],
        4,
        4,
        24,
    );
    let (want, got) = (
        fs::read_to_string(dir.path().join("reference.out")).unwrap(),
        fs::read_to_string(dir.path().join("run.out")).unwrap(),
    );
    assert_eq!(want, got, "the segments came back stale\n{said}");
}
