//! The job of the store fault tests and what they check once the faulty
//! epoch has failed: the previous epoch is intact, and once the store is
//! mended the job checkpoints again and restarts exactly.

use std::path::Path;

use cryo_core::protocol::{AbortReason, BusyPolicy, Completion, ControlRequest, ControlResponse};

use crate::{assert_same_file, write_input, Agent, Program, Rank, RankFiles, RankSpec};

/// The Rust counter as these tests run it: 400 steps over 4 MiB of state,
/// under `agent` with a step every 5 ms, or alone at full speed.
pub fn counter_spec<'a>(program: &'a Program, agent: Option<&'a Agent>) -> RankSpec<'a> {
    RankSpec {
        program,
        rank: 0,
        agent,
        steps: 400,
        state_mb: 4,
        step_ms: if agent.is_some() { 5 } else { 0 },
    }
}

/// Writes the counter's input in `dir` and runs it once alone: the files
/// every checkpointed run must end identical to. Returns the input's path
/// and the reference run's files.
pub fn reference_run(dir: &Path, program: &Program) -> (std::path::PathBuf, RankFiles) {
    let input = dir.join("input.dat");
    write_input(&input, 100_000);
    let reference = RankFiles::new(dir, "reference", &input);
    assert!(Rank::run(&counter_spec(program, None), &reference).success());
    (input, reference)
}

/// Checks that epoch 1 is the only committed epoch and verifies, runs
/// `mend`, checkpoints `rank` through `agent`, kills it, restarts it from
/// that checkpoint to its end (no step delay) and checks that its state and
/// log end byte-identical to `reference`'s.
pub fn epoch_1_intact_then_restart_exact(
    agent: &Agent,
    rank: Rank,
    running: &RankSpec<'_>,
    files: &RankFiles,
    reference: &RankFiles,
    mend: impl FnOnce(),
) {
    let job = agent.job_store();
    assert_eq!(
        job.committed_epochs().expect("listing committed epochs"),
        vec![1]
    );
    let manifest = job.load_manifest(1).expect("loading epoch 1's manifest");
    assert!(job.verify_manifest(&manifest).is_ok());
    mend();
    let report = agent.checkpoint();
    assert!(report.epoch >= 2);
    rank.kill9();
    assert_eq!(agent.arm_restart(), report.epoch);
    let status = Rank::run(
        &RankSpec {
            step_ms: 0,
            ..running.clone()
        },
        files,
    );
    assert!(status.success(), "{}", Rank::stderr(files));
    assert_same_file(&reference.final_state, &files.final_state);
    assert_same_file(&reference.log, &files.log);
}

/// Asks `agent` for a checkpoint that must fail, and returns why it did.
pub fn failed_checkpoint(agent: &Agent) -> AbortReason {
    match agent.request(&ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Wait,
        until: Completion::Committed,
    }) {
        ControlResponse::Failed { reason, .. } => reason,
        other => panic!("the checkpoint must fail: {other:?}"),
    }
}
