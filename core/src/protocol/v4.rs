//! Protocol version 4's layouts of the messages that version 5 changed.
//!
//! Version 5 made every epoch failure a typed [`AbortReason`]; version 4
//! carried text. The variants keep their order, so each layout here differs
//! from today's only in those fields. A version 5 server reads a version 4
//! client's frames through these types (text becomes
//! [`AbortReason::Text`]) and answers it in them (a reason becomes its
//! `Display` text).
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{AbortReason, MIN_PROTOCOL_VERSION};
use super::{AgentStatus, CheckpointReport, JobStatus};
use crate::format::codec::{self, CodecError};

/// The first version with typed reasons.
const TYPED_REASONS: u16 = 5;

/// Encodes `msg` in the layout a peer of `version` reads.
pub(super) fn encode_as<Old, New>(msg: &New, version: u16) -> Result<Vec<u8>, CodecError>
where
    Old: Serialize + for<'a> From<&'a New>,
    New: Serialize,
{
    if version < TYPED_REASONS {
        debug_assert!(version >= MIN_PROTOCOL_VERSION);
        codec::encode(&Old::from(msg))
    } else {
        codec::encode(msg)
    }
}

/// Decodes a payload a peer of `version` wrote.
pub(super) fn decode_as<Old, New>(version: u16, payload: &[u8]) -> Result<New, CodecError>
where
    Old: DeserializeOwned + Into<New>,
    New: DeserializeOwned,
{
    if version < TYPED_REASONS {
        codec::decode::<Old>(payload).map(Into::into)
    } else {
        codec::decode(payload)
    }
}

fn text(reason: &AbortReason) -> String {
    reason.to_string()
}

/// `CoordinatorToAgent`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum CoordinatorToAgent {
    Welcome { job: String, world_size: u32 },
    Refused { reason: String },
    Checkpoint { epoch: u64, park_timeout_ms: u64 },
    Abort { epoch: u64, reason: String },
    Committed { epoch: u64 },
    ArmRestart { epoch: u64 },
    Shutdown,
}

impl From<&super::CoordinatorToAgent> for CoordinatorToAgent {
    fn from(msg: &super::CoordinatorToAgent) -> Self {
        use super::CoordinatorToAgent as New;
        match msg.clone() {
            New::Welcome { job, world_size } => Self::Welcome { job, world_size },
            New::Refused { reason } => Self::Refused { reason },
            New::Checkpoint {
                epoch,
                park_timeout_ms,
            } => Self::Checkpoint {
                epoch,
                park_timeout_ms,
            },
            New::Abort { epoch, reason } => Self::Abort {
                epoch,
                reason: text(&reason),
            },
            New::Committed { epoch } => Self::Committed { epoch },
            New::ArmRestart { epoch } => Self::ArmRestart { epoch },
            New::Shutdown => Self::Shutdown,
        }
    }
}

impl From<CoordinatorToAgent> for super::CoordinatorToAgent {
    fn from(msg: CoordinatorToAgent) -> Self {
        use CoordinatorToAgent as Old;
        match msg {
            Old::Welcome { job, world_size } => Self::Welcome { job, world_size },
            Old::Refused { reason } => Self::Refused { reason },
            Old::Checkpoint {
                epoch,
                park_timeout_ms,
            } => Self::Checkpoint {
                epoch,
                park_timeout_ms,
            },
            Old::Abort { epoch, reason } => Self::Abort {
                epoch,
                reason: AbortReason::Text(reason),
            },
            Old::Committed { epoch } => Self::Committed { epoch },
            Old::ArmRestart { epoch } => Self::ArmRestart { epoch },
            Old::Shutdown => Self::Shutdown,
        }
    }
}

/// `AgentToCoordinator`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum AgentToCoordinator {
    RankRegistered {
        rank: u32,
        pid: u32,
        restored_epoch: Option<u64>,
    },
    RankLeft {
        rank: u32,
        why: String,
    },
    Copied {
        epoch: u64,
        rank: u32,
        bytes: u64,
        pause_us: u64,
    },
    Durable {
        epoch: u64,
        rank: u32,
        written: u64,
    },
    Failed {
        epoch: u64,
        reason: String,
    },
}

impl From<&super::AgentToCoordinator> for AgentToCoordinator {
    fn from(msg: &super::AgentToCoordinator) -> Self {
        use super::AgentToCoordinator as New;
        match msg.clone() {
            New::RankRegistered {
                rank,
                pid,
                restored_epoch,
            } => Self::RankRegistered {
                rank,
                pid,
                restored_epoch,
            },
            New::RankLeft { rank, why } => Self::RankLeft { rank, why },
            New::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            } => Self::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            },
            New::Durable {
                epoch,
                rank,
                written,
            } => Self::Durable {
                epoch,
                rank,
                written,
            },
            New::Failed { epoch, reason } => Self::Failed {
                epoch,
                reason: text(&reason),
            },
        }
    }
}

impl From<AgentToCoordinator> for super::AgentToCoordinator {
    fn from(msg: AgentToCoordinator) -> Self {
        use AgentToCoordinator as Old;
        match msg {
            Old::RankRegistered {
                rank,
                pid,
                restored_epoch,
            } => Self::RankRegistered {
                rank,
                pid,
                restored_epoch,
            },
            Old::RankLeft { rank, why } => Self::RankLeft { rank, why },
            Old::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            } => Self::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            },
            Old::Durable {
                epoch,
                rank,
                written,
            } => Self::Durable {
                epoch,
                rank,
                written,
            },
            Old::Failed { epoch, reason } => Self::Failed {
                epoch,
                reason: AbortReason::Text(reason),
            },
        }
    }
}

/// `JobResponse`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum JobResponse {
    Refused {
        reason: String,
    },
    Committed {
        epoch: u64,
        max_pause_us: u64,
        quiesce_us: u64,
        bytes: u64,
        written: u64,
        elapsed_ms: u64,
    },
    Aborted {
        epoch: u64,
        reason: String,
    },
    Status(JobStatus),
}

impl From<&super::JobResponse> for JobResponse {
    fn from(msg: &super::JobResponse) -> Self {
        use super::JobResponse as New;
        match msg.clone() {
            New::Refused { reason } => Self::Refused { reason },
            New::Committed {
                epoch,
                max_pause_us,
                quiesce_us,
                bytes,
                written,
                elapsed_ms,
            } => Self::Committed {
                epoch,
                max_pause_us,
                quiesce_us,
                bytes,
                written,
                elapsed_ms,
            },
            New::Aborted { epoch, reason } => Self::Aborted {
                epoch,
                reason: text(&reason),
            },
            New::Status(status) => Self::Status(status),
        }
    }
}

impl From<JobResponse> for super::JobResponse {
    fn from(msg: JobResponse) -> Self {
        use JobResponse as Old;
        match msg {
            Old::Refused { reason } => Self::Refused { reason },
            Old::Committed {
                epoch,
                max_pause_us,
                quiesce_us,
                bytes,
                written,
                elapsed_ms,
            } => Self::Committed {
                epoch,
                max_pause_us,
                quiesce_us,
                bytes,
                written,
                elapsed_ms,
            },
            Old::Aborted { epoch, reason } => Self::Aborted {
                epoch,
                reason: AbortReason::Text(reason),
            },
            Old::Status(status) => Self::Status(status),
        }
    }
}

/// `ControlResponse`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ControlResponse {
    Welcome { node: String, job: String },
    Refused { reason: String },
    Checkpoint(CheckpointReport),
    Busy { epoch: u64, reason: String },
    Failed { epoch: Option<u64>, reason: String },
    RestartArmed { epoch: u64, ranks: u32 },
    Status(AgentStatus),
}

impl From<&super::ControlResponse> for ControlResponse {
    fn from(msg: &super::ControlResponse) -> Self {
        use super::ControlResponse as New;
        match msg.clone() {
            New::Welcome { node, job } => Self::Welcome { node, job },
            New::Refused { reason } => Self::Refused { reason },
            New::Checkpoint(report) => Self::Checkpoint(report),
            New::Busy { epoch, reason } => Self::Busy { epoch, reason },
            New::Failed { epoch, reason } => Self::Failed {
                epoch,
                reason: text(&reason),
            },
            New::RestartArmed { epoch, ranks } => Self::RestartArmed { epoch, ranks },
            New::Status(status) => Self::Status(status),
        }
    }
}

impl From<ControlResponse> for super::ControlResponse {
    fn from(msg: ControlResponse) -> Self {
        use ControlResponse as Old;
        match msg {
            Old::Welcome { node, job } => Self::Welcome { node, job },
            Old::Refused { reason } => Self::Refused { reason },
            Old::Checkpoint(report) => Self::Checkpoint(report),
            Old::Busy { epoch, reason } => Self::Busy { epoch, reason },
            Old::Failed { epoch, reason } => Self::Failed {
                epoch,
                reason: AbortReason::Text(reason),
            },
            Old::RestartArmed { epoch, ranks } => Self::RestartArmed { epoch, ranks },
            Old::Status(status) => Self::Status(status),
        }
    }
}
