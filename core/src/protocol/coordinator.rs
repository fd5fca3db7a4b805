//! Between a job's coordinator and its node agents.
use serde::{Deserialize, Serialize};

use super::reason::with_older_reason;
use super::{v13, v4, AbortReason, Command, Departure, Message};
use super::{FINAL_CHECKPOINT_VERSION, HEARTBEAT_VERSION, TYPED_DEPARTURE_VERSION};
use crate::format::codec::{self, CodecError};
/// Messages from a job's coordinator to a node agent (TCP, after a
/// [`Hello`] with [`Peer::Agent`] and the job token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorToAgent {
    /// Accepted: the job and its world size.
    Welcome {
        /// The job.
        job: String,
        /// Ranks in the whole job.
        world_size: u32,
    },
    /// Refused (bad token, unknown job, duplicate node).
    Refused {
        /// Why.
        reason: String,
    },
    /// Capture every local rank for `epoch` and make its part durable; do
    /// not commit (the coordinator does, once every rank of every node is
    /// durable).
    Checkpoint {
        /// The epoch.
        epoch: u64,
        /// Milliseconds the agent may wait for its ranks to park.
        park_timeout_ms: u64,
    },
    /// Give up `epoch`: resume parked ranks, discard local parts.
    Abort {
        /// The epoch.
        epoch: u64,
        /// Why (logged by the agent, told to its parked ranks).
        reason: AbortReason,
    },
    /// The epoch was committed (for the agent's log and status).
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// Ranks registering from now on restart from `epoch`.
    ArmRestart {
        /// The epoch.
        epoch: u64,
    },
    /// The job is over: exit.
    Shutdown,
    /// `Checkpoint` before the job stops (a preemption, a requeue): each
    /// rank stays parked until its part is durable, so the store has the
    /// node's cores and the ranks compute nothing that would be lost. An
    /// agent older than [`FINAL_CHECKPOINT_VERSION`] is sent `Checkpoint`.
    FinalCheckpoint {
        /// The epoch.
        epoch: u64,
        /// Milliseconds the agent may wait for its ranks to park.
        park_timeout_ms: u64,
    },
}

impl CoordinatorToAgent {
    /// The request for `epoch`: `FinalCheckpoint` when the job stops after
    /// it, else `Checkpoint`.
    pub fn checkpoint(epoch: u64, park_timeout_ms: u64, job_stops: bool) -> CoordinatorToAgent {
        if job_stops {
            CoordinatorToAgent::FinalCheckpoint {
                epoch,
                park_timeout_ms,
            }
        } else {
            CoordinatorToAgent::Checkpoint {
                epoch,
                park_timeout_ms,
            }
        }
    }
}

impl Message for CoordinatorToAgent {
    const COMMAND: Command = Command::CoordinatorToAgent;

    fn encode_for(&self, version: u16) -> Result<Vec<u8>, CodecError> {
        match self {
            // An older agent knows only the plain request.
            CoordinatorToAgent::FinalCheckpoint {
                epoch,
                park_timeout_ms,
            } if version < FINAL_CHECKPOINT_VERSION => {
                let plain = CoordinatorToAgent::Checkpoint {
                    epoch: *epoch,
                    park_timeout_ms: *park_timeout_ms,
                };
                v4::encode_as::<v4::CoordinatorToAgent, _>(&plain, version)
            }
            _ => {
                let older = with_older_reason!(self, version, CoordinatorToAgent::Abort { epoch });
                v4::encode_as::<v4::CoordinatorToAgent, _>(older.as_ref().unwrap_or(self), version)
            }
        }
    }

    fn decode_from(version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        v4::decode_as::<v4::CoordinatorToAgent, _>(version, payload)
    }
}

/// Messages from a node agent to its job's coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToCoordinator {
    /// A rank registered with this agent.
    RankRegistered {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// Restarted from this epoch, if any.
        restored_epoch: Option<u64>,
    },
    /// A rank left (exited, killed or finalized).
    RankLeft {
        /// The rank.
        rank: u32,
        /// How, as its agent saw it.
        how: Departure,
    },
    /// A rank's memory was copied and it resumed.
    Copied {
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
        /// Bytes copied (from its memory, a snapshot or its input files);
        /// the rest of its state was unchanged since the last epoch.
        bytes: u64,
        /// How long it was paused, in microseconds.
        pause_us: u64,
    },
    /// A rank's chunks and part are durable in the store.
    Durable {
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
        /// Stored bytes newly written.
        written: u64,
    },
    /// The agent could not complete `epoch`.
    Failed {
        /// The epoch.
        epoch: u64,
        /// Why, naming the node, and the rank or file.
        reason: AbortReason,
    },
    /// The agent is alive: sent every quarter of the link timeout, so that
    /// an agent that is stopped or hung (its kernel still answering TCP)
    /// falls silent and is counted lost. Sent only to a coordinator of
    /// version [`HEARTBEAT_VERSION`] or newer.
    Alive,
}

impl Message for AgentToCoordinator {
    const COMMAND: Command = Command::AgentToCoordinator;

    fn encode_for(&self, version: u16) -> Result<Vec<u8>, CodecError> {
        if *self == AgentToCoordinator::Alive && version < HEARTBEAT_VERSION {
            return Err(CodecError::Encode(format!(
                "a heartbeat cannot be sent to a peer of protocol version {version} \
                 (it takes them from version {HEARTBEAT_VERSION})"
            )));
        }
        let older = with_older_reason!(self, version, AgentToCoordinator::Failed { epoch });
        let msg = older.as_ref().unwrap_or(self);
        if version >= TYPED_DEPARTURE_VERSION {
            return codec::encode(msg);
        }
        let layout = v13::AgentToCoordinator::from(msg);
        v4::encode_as::<v4::AgentToCoordinator, _>(&layout, version)
    }

    fn decode_from(version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        if version >= TYPED_DEPARTURE_VERSION {
            return codec::decode(payload);
        }
        v4::decode_as::<v4::AgentToCoordinator, v13::AgentToCoordinator>(version, payload)
            .map(Into::into)
    }
}
