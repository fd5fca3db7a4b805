//! One file written by several ranks through their own buffers: every
//! rank's output must be in the file before any rank's files are recorded,
//! or a restart cuts back lines other ranks flushed a moment later.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::time::Duration;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::state::{have_mpi, steps, wait_child};
use cryo_tests::{output_text, wait_until};

const STEPS: u64 = 16;
const RANKS: u64 = 4;

/// The last step rank 0 printed.
fn printed_step(path: &std::path::Path) -> u64 {
    steps(&fs::read_to_string(path).unwrap_or_default())
        .last()
        .copied()
        .unwrap_or(0)
}

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
    let stdout = dir.path().join("run.stdout");
    let mut run = cryo_in(dir.path())
        .args([
            "run", "--job", "shared", "--nodes", "a:2,b:2", "-n", "4", "--",
        ])
        .arg(&program)
        .args([STEPS.to_string().as_str(), "150"])
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(dir.path().join("run.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_until("step 3", Duration::from_secs(60), || {
        printed_step(&stdout) >= 3
    });
    let first = cryo_in(dir.path())
        .args(["checkpoint", "shared"])
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", output_text(&first));
    let at_first = printed_step(&stdout);
    wait_until("three more steps", Duration::from_secs(60), || {
        printed_step(&stdout) >= at_first + 3
    });
    let second = cryo_in(dir.path())
        .args(["preempt", "shared"])
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", output_text(&second));
    let status = wait_child(&mut run, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(75),
        "{}",
        fs::read_to_string(dir.path().join("run.stderr")).unwrap_or_default()
    );
    assert!(printed_step(&stdout) < STEPS, "preempted before the end");

    let restart = cryo_in(dir.path())
        .args(["restart", "shared", "--nodes", "c:2,d:2"])
        .output()
        .unwrap();
    let said = output_text(&restart);
    assert!(restart.status.success(), "{said}");
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
