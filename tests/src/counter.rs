//! A counter rank (`cryo-counter`, or its C twin) against an uninterrupted
//! run of the same program: the setup the single-node end-to-end tests
//! share.

use crate::{write_input, Agent, Program, Rank, RankFiles, RankSpec};

/// Steps of every run.
pub const STEPS: u64 = 100;
/// Milliseconds per step of a checkpointed run.
pub const STEP_MS: u64 = 15;

/// A directory and the input the ranks map.
#[derive(Debug)]
pub struct Setup {
    /// The directory of the run.
    pub dir: tempfile::TempDir,
    /// The input file the ranks map.
    pub input: std::path::PathBuf,
}

/// A fresh directory with an input file.
pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.dat");
    write_input(&input, 100_000);
    Setup { dir, input }
}

/// An uninterrupted run of rank `rank` of `program`, without an agent.
pub fn reference(setup: &Setup, program: &Program, rank: u32, state_mb: u64) -> RankFiles {
    let spec = RankSpec {
        program,
        rank,
        agent: None,
        steps: STEPS,
        state_mb,
        step_ms: 0,
    };
    reference_of(setup, &spec)
}

/// An uninterrupted run of `spec` (without its agent and pauses).
pub fn reference_of(setup: &Setup, spec: &RankSpec<'_>) -> RankFiles {
    let files = RankFiles::new(
        setup.dir.path(),
        &format!("ref-{}", spec.rank),
        &setup.input,
    );
    let spec = RankSpec {
        agent: None,
        step_ms: 0,
        ..spec.clone()
    };
    let status = Rank::run(&spec, &files);
    assert!(
        status.success(),
        "reference run failed: {}",
        Rank::stderr(&files)
    );
    files
}

/// Rank `rank` of `program` served by `agent`, at the checkpointed pace.
pub fn spec<'a>(program: &'a Program, rank: u32, agent: &'a Agent, state_mb: u64) -> RankSpec<'a> {
    RankSpec {
        program,
        rank,
        agent: Some(agent),
        steps: STEPS,
        state_mb,
        step_ms: STEP_MS,
    }
}
