//! The flow of tests whose job is checkpointed, computes on, is preempted
//! and is restarted on other nodes: what survives must be what was
//! computed, once.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::state::{steps, wait_child};
use crate::{output_text, wait_until};

/// The last step a job's stdout printed ("step N"), 0 before any.
#[must_use]
pub fn last_step(stdout: &Path) -> u64 {
    steps(&fs::read_to_string(stdout).unwrap_or_default())
        .last()
        .copied()
        .unwrap_or(0)
}

/// A job of 4 ranks on nodes a:2,b:2 run in `dir` by `cryo` (a command in
/// `dir` with its store), its stdout in `dir/run.stdout`.
pub struct Flow<'a> {
    /// Makes `cryo` commands for this job's directory and store.
    pub cryo: &'a dyn Fn() -> Command,
    /// The job's directory.
    pub dir: &'a Path,
    /// The job's name.
    pub job: &'a str,
}

impl std::fmt::Debug for Flow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (f.debug_struct("Flow"))
            .field("dir", &self.dir)
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

impl Flow<'_> {
    /// Runs `command` in the background, checkpoints it once its stdout
    /// printed step `first`, preempts it `more` steps later, checks that
    /// it stopped (exit 75) before step `end`, restarts it on nodes
    /// c:2,d:2 and returns what the restart said.
    pub fn checkpoint_preempt_restart(
        &self,
        command: &[&std::ffi::OsStr],
        first: u64,
        more: u64,
        end: u64,
    ) -> String {
        let stdout = self.dir.join("run.stdout");
        let stderr: PathBuf = self.dir.join("run.stderr");
        let mut run = (self.cryo)()
            .args([
                "run", "--job", self.job, "--nodes", "a:2,b:2", "-n", "4", "--",
            ])
            .args(command)
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        wait_until(&format!("step {first}"), Duration::from_secs(60), || {
            last_step(&stdout) >= first
        });
        let checkpoint = (self.cryo)()
            .args(["checkpoint", self.job])
            .output()
            .unwrap();
        assert!(checkpoint.status.success(), "{}", output_text(&checkpoint));
        let at_checkpoint = last_step(&stdout);
        wait_until(
            &format!("{more} more steps"),
            Duration::from_secs(60),
            || last_step(&stdout) >= at_checkpoint + more,
        );
        let preempt = (self.cryo)().args(["preempt", self.job]).output().unwrap();
        assert!(preempt.status.success(), "{}", output_text(&preempt));
        let status = wait_child(&mut run, Duration::from_secs(60));
        let said = fs::read_to_string(&stderr).unwrap_or_default();
        assert_eq!(status.code(), Some(75), "{said}");
        assert!(
            last_step(&stdout) < end,
            "preempted before the end:\n{said}"
        );

        let restart = (self.cryo)()
            .args(["restart", self.job, "--nodes", "c:2,d:2"])
            .output()
            .unwrap();
        let said = output_text(&restart);
        assert!(restart.status.success(), "{said}");
        said
    }
}
