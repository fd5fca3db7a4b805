//! What a store fault test checks once the faulty epoch has failed: the
//! previous epoch is intact, and once the store is mended the job
//! checkpoints again and restarts exactly.

use crate::{assert_same_file, Agent, Rank, RankFiles, RankSpec};

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
