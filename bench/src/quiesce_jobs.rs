//! What the benchmarks made of `quiesce-bench` jobs under `cryo run`
//! (`first-pause`, `first-request`) share: where they run, and running one
//! job in a scratch directory that is removed after it.

use std::path::PathBuf;

use thiserror::Error;

use crate::start::{bin_dir, StartBenchError};
use crate::suite::{quiesce, QuiesceJob, QuiesceRun, SuiteError};

/// Where such a benchmark runs.
#[derive(Debug, Clone, clap::Args)]
pub struct JobPlace {
    /// Scratch directory for stores and baselines (on the disk to measure).
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// Directory with `cryo`, `cryo-agent`, `cryo-counter` and
    /// `quiesce-bench` (default: next to this `cryo-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Hold an exclusive flock(2) on this file during each measurement, so
    /// cooperating builds on a shared machine wait instead of skewing it.
    #[arg(long)]
    pub lock: Option<PathBuf>,
}

/// Such a benchmark failed.
#[derive(Debug, Error)]
pub enum JobBenchError {
    /// A binary it runs is missing.
    #[error(transparent)]
    Bin(#[from] StartBenchError),
    /// A run failed.
    #[error(transparent)]
    Run(#[from] SuiteError),
}

/// Runs jobs one after the other, each in the same scratch directory.
pub(crate) struct JobRunner<'a> {
    bin: PathBuf,
    scratch: PathBuf,
    place: &'a JobPlace,
}

impl JobPlace {
    /// A runner whose scratch directory is named after `bench`.
    pub(crate) fn runner(&self, bench: &str) -> Result<JobRunner<'_>, JobBenchError> {
        Ok(JobRunner {
            bin: bin_dir(self.bin_dir.as_deref())?,
            scratch: self
                .dir
                .join(format!("cryo-{bench}-{}", std::process::id())),
            place: self,
        })
    }
}

impl JobRunner<'_> {
    /// Runs `job` (the suite's quiesce step) and removes its scratch
    /// directory, whether it succeeded or not.
    pub(crate) fn run(&self, job: &QuiesceJob<'_>) -> Result<QuiesceRun, JobBenchError> {
        let run = quiesce(&self.bin, &self.scratch, self.place.lock.as_deref(), job);
        let _ = std::fs::remove_dir_all(&self.scratch);
        Ok(run?)
    }
}
