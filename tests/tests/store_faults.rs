//! The store failing as an epoch opens, after the agent has raised its
//! ranks' requests (it raises them first, so that the ranks head for their
//! safe point while the store opens the epoch): the checkpoint fails with a
//! store error, no rank is left parked, the previous epoch stays intact,
//! and the next checkpoint after the store is mended restarts exactly.
#![allow(clippy::unwrap_used)]

use std::fs;

use cryo_core::protocol::AbortReason;
use cryo_tests::recovery::{
    counter_spec, epoch_1_intact_then_restart_exact, failed_checkpoint, reference_run,
};
use cryo_tests::{lines, Agent, Program, Rank, RankFiles};

#[test]
fn a_store_that_cannot_open_the_epoch_fails_it_and_leaves_no_rank_parked() {
    let dir = tempfile::tempdir().unwrap();
    let program = Program::Rust;
    let (input, reference) = reference_run(dir.path(), &program);
    let store = dir.path().join("store");
    // Epoch 2 is held after the requests are raised, long enough for the
    // rank (a step every 5 ms) to park before the store fails to open it.
    let mut agent = Agent::spawn_node(
        dir.path(),
        &store,
        "begin",
        "test-node",
        &[],
        &[("CRYO_FAULT", "pause-at:begin:2:500")],
    );
    agent.wait_ready();
    let files = RankFiles::new(dir.path(), "run", &input);
    let running = counter_spec(&program, Some(&agent));
    let mut rank = Rank::start(&running, &files);
    agent.wait_ranks(1);
    rank.wait_lines(3);
    agent.checkpoint();

    // Where the store opens an epoch is now a file: creating the epoch's
    // directory fails (a file is in the way), even as root.
    let job = agent.job_store();
    let pending = job.pending_dir();
    fs::remove_dir_all(&pending).unwrap();
    fs::write(&pending, b"not a directory").unwrap();
    let reason = failed_checkpoint(&agent);
    assert!(
        matches!(reason.root(), AbortReason::Store { .. }),
        "{reason:?}"
    );
    // The rank parked for epoch 2 and was let go: it computes on.
    rank.wait_lines(lines(&files.log) + 20);
    assert!(
        agent.log_text().contains("fault.paused"),
        "the fault hook did not hold epoch 2"
    );
    epoch_1_intact_then_restart_exact(&agent, rank, &running, &files, &reference, || {
        fs::remove_file(&pending).unwrap();
    });
}
