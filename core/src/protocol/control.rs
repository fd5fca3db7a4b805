//! Between a local control client (`cryo-agent checkpoint|restart|status`)
//! and its node agent.
use serde::{Deserialize, Serialize};

use super::reason::with_older_reason;
use super::{v4, AbortReason, Command, Message};
use crate::format::codec::CodecError;
use crate::format::manifest::WriteStats;
/// What to do when a checkpoint is requested while one is still draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusyPolicy {
    /// Refuse with [`ControlResponse::Busy`].
    Refuse,
    /// Wait for the previous one to finish.
    Wait,
}

/// When a checkpoint request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Completion {
    /// When every rank has resumed (data still draining).
    Resumed,
    /// When the epoch is committed.
    Committed,
}

/// Requests on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Checkpoint every registered rank.
    Checkpoint {
        /// The epoch number; default: one past the newest known.
        epoch: Option<u64>,
        /// What to do if a checkpoint is draining.
        if_busy: BusyPolicy,
        /// When to answer.
        until: Completion,
        /// Copy every chunk, even those write tracking reports unchanged.
        full: bool,
    },
    /// Make ranks that register from now on restart from an epoch.
    ArmRestart {
        /// The epoch; default: the newest committed.
        epoch: Option<u64>,
    },
    /// Report the agent's state.
    Status,
}

impl Message for ControlRequest {
    const COMMAND: Command = Command::ControlRequest;
}

/// What one rank's capture cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankCaptureReport {
    /// The rank.
    pub rank: u32,
    /// Its pid.
    pub pid: u32,
    /// Region bytes captured.
    pub bytes: u64,
    /// Of those, the bytes copied; the rest were not written since the
    /// previous epoch, whose chunks were reused.
    pub copied_bytes: u64,
    /// From `Parked` received to `Resume` sent, in nanoseconds.
    pub pause_ns: u64,
    /// Time spent copying memory (`process_vm_readv`), in nanoseconds.
    pub copy_ns: u64,
    /// Whether the state exceeded the copy budget and was streamed while
    /// the rank stayed parked.
    pub streamed: bool,
    /// Fds that will be restored.
    pub fds_restored: u32,
    /// Fds listed as not restored.
    pub fds_not_restored: u32,
}

/// The result of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The job.
    pub job: String,
    /// The node.
    pub node: String,
    /// The epoch.
    pub epoch: u64,
    /// Whether the epoch is committed (false when answered at `Resumed`).
    pub committed: bool,
    /// Per-rank figures.
    pub ranks: Vec<RankCaptureReport>,
    /// From the request to every rank resumed, in nanoseconds.
    pub resumed_ns: u64,
    /// From the request to the commit, in nanoseconds (0 if not committed).
    pub total_ns: u64,
    /// What was written.
    pub stats: WriteStats,
    /// The agent's peak RSS (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// The copy budget, in bytes.
    pub copy_budget: u64,
}

/// The agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The job.
    pub job: String,
    /// The node.
    pub node: String,
    /// The store root.
    pub store: String,
    /// Registered ranks and their pids.
    pub ranks: Vec<(u32, u32)>,
    /// The epoch being captured or drained, if any.
    pub busy: Option<u64>,
    /// The newest committed epoch.
    pub last_committed: Option<u64>,
    /// The epoch that registering ranks will restart from, if armed.
    pub armed_restart: Option<u64>,
    /// The copy budget, in bytes.
    pub copy_budget: u64,
    /// Bytes of the copy budget already pre-faulted (ready for a pause
    /// bounded by memory bandwidth).
    pub copy_budget_warm: u64,
    /// The agent's peak RSS, in bytes.
    pub peak_rss_bytes: u64,
}

/// Responses on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// The hello was accepted.
    Welcome {
        /// The agent's node.
        node: String,
        /// Its job.
        job: String,
    },
    /// The hello or request was refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// A checkpoint finished (or all ranks resumed, see [`Completion`]).
    Checkpoint(CheckpointReport),
    /// A checkpoint is still draining and the request said not to wait.
    Busy {
        /// The epoch in progress.
        epoch: u64,
        /// A message for the user.
        reason: String,
    },
    /// The checkpoint failed; nothing was committed.
    Failed {
        /// The epoch, if one was chosen.
        epoch: Option<u64>,
        /// Why.
        reason: AbortReason,
    },
    /// Ranks that register from now on will restart from `epoch`.
    RestartArmed {
        /// The epoch.
        epoch: u64,
        /// Ranks in its manifest.
        ranks: u32,
    },
    /// The agent's state.
    Status(AgentStatus),
}

impl Message for ControlResponse {
    const COMMAND: Command = Command::ControlResponse;

    fn encode_for(&self, version: u16) -> Result<Vec<u8>, CodecError> {
        let older = with_older_reason!(self, version, ControlResponse::Failed { epoch });
        v4::encode_as::<v4::ControlResponse, _>(older.as_ref().unwrap_or(self), version)
    }

    fn decode_from(version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        v4::decode_as::<v4::ControlResponse, _>(version, payload)
    }
}
