//! Between a `cryo` client (`checkpoint`, `preempt`, `status`) and a job's
//! coordinator.
use serde::{Deserialize, Serialize};

use super::reason::with_older_reason;
use super::{v4, AbortReason, Command, Message};
use crate::format::codec::CodecError;
/// Requests from a `cryo` client (`checkpoint`, `preempt`, `status`) to a
/// job's coordinator (after a [`Hello`] with [`Peer::Control`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Checkpoint now and keep running; answer when committed or aborted.
    Checkpoint,
    /// Checkpoint, then stop the job.
    Preempt,
    /// Describe the job.
    Status,
    /// A warning of the job's end reached a rank (its `SIGUSR1`): do what
    /// a `SIGUSR1` to `cryo run` does. Sent by the rank's agent; not
    /// answered (protocol version 15).
    Warning {
        /// Who was warned, for people: the rank, its node, the signal.
        from: String,
    },
    /// A `SIGTERM` reached a rank (`scancel`, a preemption Slurm gave no
    /// warning of, `kill`): do what a `SIGTERM` to `cryo run` does, a
    /// checkpoint and a stop. Sent by the rank's agent; not answered
    /// (protocol version 17).
    Terminated {
        /// Who was sent it, for people: the rank, its node.
        from: String,
    },
}

impl Message for JobRequest {
    const COMMAND: Command = Command::JobRequest;
}

/// A node's view in [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Ranks registered there.
    pub ranks: Vec<u32>,
    /// Whether its agent is connected.
    pub connected: bool,
}

/// A checkpoint in progress, in [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// The epoch.
    pub epoch: u64,
    /// Phase name.
    pub phase: String,
    /// Ranks copied.
    pub ranks_copied: u32,
    /// Ranks durable.
    pub ranks_durable: u32,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Milliseconds since it was requested.
    pub elapsed_ms: u64,
}

/// What `cryo status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job: String,
    /// World size.
    pub world_size: u32,
    /// Nodes and their ranks.
    pub nodes: Vec<NodeStatus>,
    /// Newest committed epoch.
    pub last_committed: Option<u64>,
    /// The checkpoint in progress.
    pub in_progress: Option<EpochProgress>,
    /// The epoch the job restarted from.
    pub restarted_from: Option<u64>,
}

/// Answers from a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobResponse {
    /// Refused (bad token, busy).
    Refused {
        /// Why.
        reason: String,
    },
    /// The checkpoint committed.
    Committed {
        /// The epoch.
        epoch: u64,
        /// Longest pause of any rank, microseconds.
        max_pause_us: u64,
        /// From the request to the last rank parked, microseconds.
        quiesce_us: u64,
        /// Bytes copied.
        bytes: u64,
        /// Stored bytes written.
        written: u64,
        /// From request to commit, milliseconds.
        elapsed_ms: u64,
    },
    /// The checkpoint aborted; the previous epoch stands.
    Aborted {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: AbortReason,
    },
    /// The job's status.
    Status(JobStatus),
}

impl Message for JobResponse {
    const COMMAND: Command = Command::JobResponse;

    fn encode_for(&self, version: u16) -> Result<Vec<u8>, CodecError> {
        let older = with_older_reason!(self, version, JobResponse::Aborted { epoch });
        v4::encode_as::<v4::JobResponse, _>(older.as_ref().unwrap_or(self), version)
    }

    fn decode_from(version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        v4::decode_as::<v4::JobResponse, _>(version, payload)
    }
}
