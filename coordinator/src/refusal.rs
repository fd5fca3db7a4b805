//! Why a checkpoint cannot start now, typed, so that a preemption can tell
//! a reason that passes (an agent away, which dials in again by itself)
//! from one that does not; the text is for people.

use std::fmt;
use std::time::Duration;

use crate::link_loss::LinkLoss;

/// Why [`crate::running`]'s `start_checkpoint` refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// An epoch is under way.
    InProgress {
        /// The epoch under way.
        epoch: u64,
    },
    /// Ranks have left the job (ended, or killed).
    RanksLeft {
        /// How many left.
        left: usize,
        /// The job's world size.
        ranks: u32,
    },
    /// Not every rank has registered with its agent yet.
    NotRegistered {
        /// How many have.
        registered: usize,
        /// The job's world size.
        ranks: u32,
    },
    /// An agent is not connected: lost (`lost`: why, and how long ago),
    /// or not connected yet.
    AgentAway {
        /// Its node.
        node: String,
        /// Why and how long ago its link was lost, if it ever had one.
        lost: Option<(LinkLoss, Duration)>,
    },
    /// An agent that dialed in again has not yet stated every rank it
    /// held (it does so right after its hello).
    Restating {
        /// The ranks not stated again yet.
        ranks: usize,
    },
    /// The store could not name the next epoch.
    Store(String),
}

impl Refusal {
    /// Whether the reason passes by itself soon: an agent that lost its
    /// link dials in again once the network lets it, and then states its
    /// ranks again.
    pub(crate) fn awaits_an_agent(&self) -> bool {
        match self {
            Self::AgentAway {
                lost: Some((loss, _)),
                ..
            } => loss.may_rejoin(),
            Self::Restating { .. } => true,
            _ => false,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InProgress { epoch } => {
                write!(f, "checkpoint of epoch {epoch} is still in progress")
            }
            Self::RanksLeft { left, ranks } => write!(
                f,
                "{left} of {ranks} ranks have left the job (ended, or killed: Slurm sends the \
                 ranks its SIGTERM too)"
            ),
            Self::NotRegistered { registered, ranks } => write!(
                f,
                "only {registered} of {ranks} ranks have registered with their agents yet"
            ),
            Self::AgentAway { node, lost: None } => {
                write!(f, "the agent on node {node:?} is not connected")
            }
            Self::AgentAway {
                node,
                lost: Some((why, ago)),
            } => write!(
                f,
                "the agent on node {node:?} is not connected (lost {:.0} s ago: {why}; it dials \
                 in again by itself once the network lets it, and the next checkpoint can then \
                 go ahead)",
                ago.as_secs_f64()
            ),
            Self::Restating { ranks } => write!(
                f,
                "{ranks} ranks are not stated again yet by their agent, which dialed in again"
            ),
            Self::Store(why) => write!(f, "the store cannot name the next epoch: {why}"),
        }
    }
}
