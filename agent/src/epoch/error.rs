//! Why an epoch failed on this node, typed, and how that reads on the wire.

use std::time::Duration;

use cryo_core::protocol::{AbortReason, Departure};
use cryo_core::store::writer::{BeginError, WriteError};
use cryo_core::store::CommitError;
use thiserror::Error;

use crate::capture::CaptureError;

/// An epoch, or one rank's part of it, failed on this node.
#[derive(Debug, Error)]
pub enum EpochError {
    /// Standalone: no rank is registered.
    #[error("no rank is registered with this agent")]
    NoRanks,
    /// Standalone: the registered ranks are not the whole job.
    #[error("registered ranks are {registered:?}; a node-local epoch needs ranks {expected:?} (is a rank still starting, or did one exit?)")]
    RanksMissing {
        /// Ranks registered.
        registered: Vec<u32>,
        /// Ranks needed.
        expected: Vec<u32>,
    },
    /// The epoch could not be opened in the store.
    #[error("opening epoch {epoch} in the store: {source}")]
    Begin {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: BeginError,
    },
    /// A rank did not reach a safe point within the park timeout.
    #[error("rank {rank} (pid {pid}) did not reach a safe point within {waited:?}")]
    ParkTimeout {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// The park timeout.
        waited: Duration,
    },
    /// A rank reached a safe point after the request, but the ranks never
    /// agreed on where to park within the park timeout: some other rank
    /// did not reach one.
    #[error(
        "rank {rank} (pid {pid}) waited {waited:?} at a safe point for the other ranks to reach one"
    )]
    WaitedForOthers {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// The park timeout.
        waited: Duration,
    },
    /// A rank took the request but never parked.
    #[error("rank {rank} (pid {pid}) took the checkpoint request but never parked")]
    NeverParked {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
    },
    /// A rank refused to park.
    #[error("rank {rank} (pid {pid}) refused to park: {detail}")]
    Refused {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// The rank's reason.
        detail: String,
    },
    /// A rank left before it parked.
    #[error("rank {rank} (pid {pid}) left before reaching a safe point ({how})")]
    Left {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// How.
        how: Departure,
    },
    /// Capturing a parked rank failed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Making a rank's part durable failed.
    #[error(transparent)]
    Part(#[from] WriteError),
    /// Standalone: the commit failed.
    #[error("committing epoch {epoch}: {source}")]
    Commit {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: CommitError,
    },
    /// A rank's capture thread panicked.
    #[error("rank {rank}: its capture thread panicked")]
    Panicked {
        /// The rank.
        rank: u32,
    },
    /// The epoch was cancelled (by the coordinator, a lost coordinator, the
    /// job's end, or another rank's failure).
    #[error("epoch {epoch} stopped: {reason}")]
    Cancelled {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: AbortReason,
    },
    /// The agent could not start the epoch's thread.
    #[error("spawning the epoch thread: {0}")]
    Spawn(std::io::Error),
}

impl EpochError {
    /// The typed reason peers see.
    pub fn reason(&self) -> AbortReason {
        match self {
            EpochError::NoRanks => AbortReason::NoRanks,
            EpochError::RanksMissing {
                registered,
                expected,
            } => AbortReason::RanksMissing {
                registered: registered.clone(),
                expected: expected.clone(),
            },
            EpochError::ParkTimeout { rank, waited, .. } => AbortReason::ParkTimeout {
                rank: *rank,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            },
            EpochError::WaitedForOthers { rank, waited, .. } => AbortReason::WaitedForOthers {
                rank: *rank,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            },
            EpochError::NeverParked { rank, .. } => AbortReason::NeverParked { rank: *rank },
            EpochError::Refused { rank, detail, .. } => AbortReason::RankRefused {
                rank: *rank,
                detail: detail.clone(),
            },
            EpochError::Left { rank, how, .. } => AbortReason::RankLeft {
                rank: *rank,
                why: how.to_string(),
            },
            EpochError::Capture(CaptureError::Write(err)) | EpochError::Part(err) => {
                AbortReason::store(err)
            }
            EpochError::Capture(err) => AbortReason::Capture {
                rank: err.rank(),
                detail: err.to_string(),
            },
            EpochError::Begin {
                source: BeginError::NotNewer { epoch, latest, .. },
                ..
            } => AbortReason::NotNewer {
                epoch: *epoch,
                newest: *latest,
            },
            EpochError::Begin { .. } | EpochError::Commit { .. } => AbortReason::store(self),
            EpochError::Panicked { rank } => AbortReason::Capture {
                rank: *rank,
                detail: self.to_string(),
            },
            EpochError::Cancelled { reason, .. } => reason.clone(),
            EpochError::Spawn(_) => AbortReason::Agent {
                detail: self.to_string(),
            },
        }
    }

    /// Whether this rank failed only because the epoch was cancelled.
    pub fn is_cancellation(&self) -> bool {
        matches!(self, EpochError::Cancelled { .. })
    }

    /// Whether this failure is another's consequence: a cancellation, or a
    /// rank held at its safe point by one that never reached its own. The
    /// cause is reported before it.
    pub fn is_consequence(&self) -> bool {
        self.is_cancellation() || self.reason().is_consequence()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryo_core::store::fs::IoStepError;

    #[test]
    fn a_full_store_is_named_as_such() {
        let full = WriteError::Chunk {
            rank: 2,
            source: IoStepError::new(
                "write chunk",
                "/store/chunks/ab",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ),
        };
        assert!(matches!(
            EpochError::Part(full).reason(),
            AbortReason::StoreFull { .. }
        ));
        let eio = WriteError::Chunk {
            rank: 2,
            source: IoStepError::new(
                "write chunk",
                "/store/chunks/ab",
                std::io::Error::from_raw_os_error(libc::EIO),
            ),
        };
        match EpochError::Capture(CaptureError::Write(eio)).reason() {
            AbortReason::Store { detail } => assert!(detail.contains("chunks/ab"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rank_held_at_its_safe_point_is_a_consequence_not_the_cause() {
        let held = EpochError::WaitedForOthers {
            rank: 0,
            pid: 10,
            waited: Duration::from_millis(3000),
        };
        assert_eq!(
            held.reason(),
            AbortReason::WaitedForOthers {
                rank: 0,
                waited_ms: 3000
            }
        );
        assert!(held.is_consequence());
        let cause = EpochError::ParkTimeout {
            rank: 1,
            pid: 11,
            waited: Duration::from_millis(3000),
        };
        assert!(!cause.is_consequence());
    }

    #[test]
    fn rank_failures_keep_their_rank() {
        let err = EpochError::ParkTimeout {
            rank: 3,
            pid: 10,
            waited: Duration::from_millis(250),
        };
        assert_eq!(
            err.reason(),
            AbortReason::ParkTimeout {
                rank: 3,
                waited_ms: 250
            }
        );
    }
}
