//! Where an epoch's progress goes: the two modes differ only here.
//!
//! * [`Standalone`]: the control client that asked is told when every rank
//!   has resumed, and the agent commits the epoch itself.
//! * [`Coordinated`]: each rank's `Copied` and `Durable` go to the
//!   coordinator, which commits once every node's ranks are durable.

use std::sync::mpsc::Sender;

use cryo_core::format::manifest::WriteStats;
use cryo_core::protocol::{AgentToCoordinator, CheckpointReport, RankCaptureReport};
use cryo_core::store::JobStore;

use super::EpochError;
use crate::link::CoordinatorLink;

/// What an epoch tells the world as it goes.
pub(crate) trait EpochSink: Sync {
    /// The ranks the epoch must capture, or `None` for whichever local
    /// ranks are registered (possibly none).
    fn expected_ranks(&self, registered: u32) -> Option<Vec<u32>>;

    /// Whether one rank's failure stops the others at once (the epoch is
    /// then lost on every node, so there is no point finishing it here).
    fn fail_fast(&self) -> bool;

    /// A rank's memory is copied and it runs again.
    fn copied(&self, epoch: u64, report: &RankCaptureReport);

    /// Every local rank runs again; `report` is not committed yet.
    fn all_resumed(&self, report: CheckpointReport);

    /// A rank's part is durable in the store.
    fn durable(&self, epoch: u64, rank: u32, stats: &WriteStats);

    /// Every local part is durable. Returns the committed epoch's stats if
    /// this sink commits.
    fn finish(&self, epoch: u64, world_size: u32) -> Result<Option<WriteStats>, EpochError>;

    /// The epoch failed here.
    fn failed(&self, epoch: u64);
}

/// A node-local epoch asked for on the control socket.
pub(crate) struct Standalone<'a> {
    pub(crate) job: &'a JobStore,
    /// Ranks the node-local job has (default: those registered).
    pub(crate) ranks: Option<u32>,
    pub(crate) chunk_size: usize,
    /// The control client's thread, waiting for the first answer.
    pub(crate) tx: Sender<Result<CheckpointReport, EpochError>>,
}

impl EpochSink for Standalone<'_> {
    fn expected_ranks(&self, registered: u32) -> Option<Vec<u32>> {
        Some((0..self.ranks.unwrap_or(registered)).collect())
    }

    fn fail_fast(&self) -> bool {
        false
    }

    fn copied(&self, _epoch: u64, _report: &RankCaptureReport) {}

    fn all_resumed(&self, report: CheckpointReport) {
        let _ = self.tx.send(Ok(report));
    }

    fn durable(&self, _epoch: u64, _rank: u32, _stats: &WriteStats) {}

    fn finish(&self, epoch: u64, world_size: u32) -> Result<Option<WriteStats>, EpochError> {
        let chunk_size = u32::try_from(self.chunk_size).unwrap_or(u32::MAX);
        let manifest = self
            .job
            .commit_epoch(epoch, world_size, chunk_size)
            .map_err(|source| EpochError::Commit { epoch, source })?;
        Ok(Some(manifest.stats()))
    }

    fn failed(&self, epoch: u64) {
        let _ = self.job.discard_pending(epoch);
    }
}

/// An epoch the coordinator asked for.
pub(crate) struct Coordinated<'a> {
    pub(crate) link: &'a CoordinatorLink,
}

impl EpochSink for Coordinated<'_> {
    fn expected_ranks(&self, _registered: u32) -> Option<Vec<u32>> {
        None
    }

    fn fail_fast(&self) -> bool {
        true
    }

    fn copied(&self, epoch: u64, report: &RankCaptureReport) {
        self.link.send(&AgentToCoordinator::Copied {
            epoch,
            rank: report.rank,
            // What was copied, not the state's size: chunks unchanged since
            // the last epoch are reused, not copied.
            bytes: report.copied_bytes,
            pause_us: report.pause_ns / 1000,
        });
    }

    fn all_resumed(&self, _report: CheckpointReport) {}

    fn durable(&self, epoch: u64, rank: u32, stats: &WriteStats) {
        self.link.send(&AgentToCoordinator::Durable {
            epoch,
            rank,
            written: stats.new_stored_bytes,
        });
    }

    fn finish(&self, _epoch: u64, _world_size: u32) -> Result<Option<WriteStats>, EpochError> {
        // The coordinator commits once every node's ranks are durable.
        Ok(None)
    }

    fn failed(&self, _epoch: u64) {
        // The parts are removed when the epoch ends or is aborted.
    }
}
