//! The state suite, in the spirit of CRIU's zdtm: small C programs
//! (`tests/state/`), each holding its open files in one "shape" the way real
//! applications do (dup'ed fds, an `O_APPEND` log, `O_RDWR` read-back,
//! `pread`/`pwrite`, unlinked scratch files, a file replaced at its path,
//! `/dev/null` and `/dev/zero`, a directory fd with `openat`, stdio streams
//! with full and line buffers, a renamed file, `MAP_SHARED` and
//! `MAP_PRIVATE` file mappings, a log the program buffers itself and
//! flushes from a `cryo_at_checkpoint` hook, logs opened, appended to and
//! closed at every step, a file shared through MPI-IO and opened again by
//! the restarted run), plus `all`, every shape in one job.
//!
//! Each test compiles its program with `mpicc`, runs it uninterrupted with
//! `mpiexec` (the reference), then runs it under `cryo run` on emulated
//! nodes, checkpoints it halfway, lets it run a few steps past the
//! checkpoint, `kill -9`s everything and restarts it on another node
//! layout. The restarted run must resume right after the checkpointed step
//! and end with an output directory byte-identical to the reference's, file
//! by file, with the same names. The programs check themselves as they go
//! (fd flags and offsets, file sizes, read-back contents, mappings) and
//! abort with the reason on stderr, which `cryo restart` passes on. The
//! harness is `cryo_tests::state`; `state_faults.rs` uses it for what a
//! checkpoint refuses, falls back from, or names as lost.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;

use cryo_tests::state::{repo_root, survives_kill_and_restart, ALL_ITERS, ITERS, SHAPES};

/// One test per shape: 2 ranks on two emulated nodes, restarted on one
/// node with both.
macro_rules! shape_test {
    ($name:ident, $shape:literal) => {
        #[test]
        fn $name() {
            survives_kill_and_restart($shape, ITERS, 2, ("a:1,b:1", "c:2"), &[]);
        }
    };
}

shape_test!(state_dup_survives_kill_and_restart, "dup");
shape_test!(state_append_survives_kill_and_restart, "append");
shape_test!(state_rdwr_survives_kill_and_restart, "rdwr");
shape_test!(state_pio_survives_kill_and_restart, "pio");
shape_test!(state_unlinked_survives_kill_and_restart, "unlinked");
shape_test!(state_recreated_survives_kill_and_restart, "recreated");
shape_test!(state_devnull_survives_kill_and_restart, "devnull");
shape_test!(state_dirfd_survives_kill_and_restart, "dirfd");
shape_test!(state_stdio_full_survives_kill_and_restart, "stdio_full");
shape_test!(state_stdio_line_survives_kill_and_restart, "stdio_line");
shape_test!(state_renamed_survives_kill_and_restart, "renamed");
shape_test!(state_map_shared_survives_kill_and_restart, "map_shared");
shape_test!(state_map_private_survives_kill_and_restart, "map_private");
shape_test!(state_stdout_file_survives_kill_and_restart, "stdout_file");
shape_test!(state_own_buffer_survives_kill_and_restart, "own_buffer");
shape_test!(state_reopened_survives_kill_and_restart, "reopened");
shape_test!(state_mpiio_survives_kill_and_restart, "mpiio");
shape_test!(state_odirect_survives_kill_and_restart, "odirect");
shape_test!(state_region_file_survives_kill_and_restart, "region_file");
shape_test!(state_process_survives_kill_and_restart, "process");

/// Every shape in one job of 6 ranks on three nodes, restarted on six.
#[test]
fn state_all_survives_kill_and_restart() {
    survives_kill_and_restart(
        "all",
        ALL_ITERS,
        6,
        ("a:2,b:2,c:2", "d:1,e:1,f:1,g:1,h:1,i:1"),
        &[],
    );
}

/// The list above names every program in tests/state/ (a new shape's file
/// without a test, or a test without its file, fails here).
#[test]
fn state_suite_lists_every_shape() {
    let dir = repo_root().join("tests/state");
    let mut on_disk: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".c").map(str::to_owned)
        })
        .filter(|name| name != "harness")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SHAPES.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "tests/state/*.c and SHAPES disagree");
    let header = fs::read_to_string(dir.join("state.h")).unwrap();
    for shape in SHAPES {
        assert!(
            header.contains(&format!("X({shape})")),
            "{shape} is missing from STATE_SHAPES in tests/state/state.h"
        );
    }
}

/// A Fortran program logging through a formatted unit, whose buffered lines
/// the runtime flushes on the checkpoint path; the restarted run connects
/// a unit to the restored fd again (`/proc/self/fd/N`, `position='append'`).
#[test]
fn state_fortran_unit_survives_kill_and_restart() {
    if !cryo_tests::state::have_fortran() {
        return;
    }
    survives_kill_and_restart(
        cryo_tests::state::FORTRAN_SHAPE,
        ITERS,
        2,
        ("a:1,b:1", "c:2"),
        &[],
    );
}
