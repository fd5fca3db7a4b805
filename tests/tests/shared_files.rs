//! One file written by several ranks through their own buffers: every
//! rank's output must be in the file before any rank's files are recorded,
//! or a restart cuts back lines other ranks flushed a moment later.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::preempted::Flow;
use cryo_tests::state::have_mpi;

const STEPS: u64 = 16;
const RANKS: u64 = 4;

#[test]
fn a_log_all_ranks_append_to_through_stdio_keeps_every_line_across_a_restart() {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-shared-log-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("shared_log");
    compile_mpich_program("tests/programs/shared_log.c", &program);
    let cryo = || cryo_in(dir.path());
    let flow = Flow {
        cryo: &cryo,
        dir: dir.path(),
        job: "shared",
    };
    let steps = STEPS.to_string();
    let said = flow.checkpoint_preempt_restart(
        &[program.as_ref(), steps.as_ref(), "150".as_ref()],
        3,
        3,
        STEPS,
    );
    let log = fs::read_to_string(dir.path().join("shared.log")).unwrap();
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort_unstable();
    let mut want: Vec<String> = (0..RANKS)
        .flat_map(|rank| (1..=STEPS).map(move |step| format!("rank {rank} step {step}")))
        .collect();
    want.sort_unstable();
    assert_eq!(
        lines, want,
        "the shared log lost or repeated lines across the restart:\n{said}"
    );
}
