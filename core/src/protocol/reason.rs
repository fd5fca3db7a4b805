//! Why an epoch was given up, as a value: the agent, the coordinator, the
//! `cryo` client and the tests match its variants; its `Display` is for
//! people. Travels in `AgentToCoordinator::Failed`,
//! `CoordinatorToAgent::Abort`, `JobResponse::Aborted` and
//! `ControlResponse::Failed` (protocol version 5 and newer; an older peer's
//! text arrives as [`AbortReason::Text`]).
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which step of an epoch a deadline caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Ranks not yet parked and copied (the job-visible pause).
    Copied,
    /// Ranks copied but their parts not yet durable in the store.
    Durable,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Copied => "copied",
            Stage::Durable => "durable",
        })
    }
}

/// Why an epoch was aborted or could not start. Every variant that a node
/// agent reports is wrapped in [`AbortReason::OnNode`] by the agent, so the
/// node that failed is always known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
pub enum AbortReason {
    /// A rank did not reach a safe point in time.
    #[error("rank {rank} did not reach a safe point within {waited_ms} ms")]
    ParkTimeout {
        /// The rank.
        rank: u32,
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// A rank took the checkpoint request but never parked.
    #[error("rank {rank} took the checkpoint request but never parked")]
    NeverParked {
        /// The rank.
        rank: u32,
    },
    /// A rank refused to park (MPI: a message was in flight at the safe
    /// point, or the ranks could not agree on one).
    #[error("rank {rank} refused to park: {detail}")]
    RankRefused {
        /// The rank.
        rank: u32,
        /// The rank's own account.
        detail: String,
    },
    /// A rank left the job (exited, was killed) before it was copied.
    #[error("rank {rank} left before reaching a safe point ({why})")]
    RankLeft {
        /// The rank.
        rank: u32,
        /// How it left.
        why: String,
    },
    /// A rank reported that the job does not have.
    #[error("rank {rank} reported, but the job has only {world_size} ranks")]
    UnknownRank {
        /// The rank.
        rank: u32,
        /// Ranks in the job.
        world_size: u32,
    },
    /// Reading a parked rank's memory or fd table failed.
    #[error("capturing rank {rank}: {detail}")]
    Capture {
        /// The rank.
        rank: u32,
        /// The capture error.
        detail: String,
    },
    /// The store has no room left.
    #[error("the store is full: {detail}")]
    StoreFull {
        /// The failed step and path.
        detail: String,
    },
    /// Writing or committing to the store failed.
    #[error("the store failed: {detail}")]
    Store {
        /// The failed step and path.
        detail: String,
    },
    /// The coordinator's deadline for the epoch passed.
    #[error("deadline passed after {:.1}s with ranks {} not {stage}", *elapsed_ms as f64 / 1000.0, render_ranks(missing))]
    Deadline {
        /// What the missing ranks had not done.
        stage: Stage,
        /// Milliseconds since the epoch was requested.
        elapsed_ms: u64,
        /// The ranks that had not.
        missing: Vec<u32>,
    },
    /// The coordinator lost a node's agent during the epoch.
    #[error("lost the agent on node {node:?}")]
    AgentLost {
        /// The node.
        node: String,
    },
    /// The agent lost its coordinator during the epoch.
    #[error("lost the coordinator at {addr}: {detail}")]
    CoordinatorLost {
        /// The coordinator's address.
        addr: String,
        /// How.
        detail: String,
    },
    /// The epoch is not newer than one already started, aborted or
    /// committed.
    #[error(
        "epoch {epoch} is not newer than epoch {newest}, already started, aborted or given up"
    )]
    NotNewer {
        /// The requested epoch.
        epoch: u64,
        /// The newest one seen.
        newest: u64,
    },
    /// Another epoch is still capturing or draining.
    #[error("checkpoint of epoch {busy} is still in progress")]
    Busy {
        /// The epoch in progress.
        busy: u64,
    },
    /// Ranks agreed on an epoch that the coordinator never asked this node
    /// for in time.
    #[error(
        "no checkpoint request for epoch {epoch} arrived within {waited_ms} ms of the rank parking"
    )]
    Unsolicited {
        /// The epoch the ranks parked for.
        epoch: u64,
        /// How long the agent held them.
        waited_ms: u64,
    },
    /// No rank is registered with the agent.
    #[error("no rank is registered with this agent")]
    NoRanks,
    /// The ranks registered are not the ones a node-local epoch needs.
    #[error("registered ranks are {registered:?}; a node-local epoch needs ranks {expected:?} (is a rank still starting, or did one exit?)")]
    RanksMissing {
        /// Ranks registered with the agent.
        registered: Vec<u32>,
        /// Ranks the epoch needs.
        expected: Vec<u32>,
    },
    /// The job is shutting down.
    #[error("the job is shutting down")]
    ShuttingDown,
    /// The job's processes ended during the epoch.
    #[error("the job ended ({status}) during the checkpoint")]
    JobEnded {
        /// How it ended.
        status: String,
    },
    /// An operator or a failure elsewhere aborted the epoch.
    #[error("aborted by the coordinator: {0}")]
    Coordinator(Box<AbortReason>),
    /// The agent itself failed (a thread could not start, say).
    #[error("the agent failed: {detail}")]
    Agent {
        /// What failed.
        detail: String,
    },
    /// A reason reported by a node's agent, with the node.
    #[error("node {node}: {reason}")]
    OnNode {
        /// The node.
        node: String,
        /// The agent's reason.
        reason: Box<AbortReason>,
    },
    /// Text from a peer of protocol version 4, which had no typed reasons.
    #[error("{0}")]
    Text(String),
    /// A rank reached a safe point after the request but the agreement on
    /// where to park never completed: another rank did not reach one (an
    /// MPI job waits for all of its ranks).
    #[error(
        "rank {rank} waited {waited_ms} ms at a safe point for the other ranks, which never \
         all reached one (is cryo_checkpoint_point called on every rank?)"
    )]
    WaitedForOthers {
        /// The rank.
        rank: u32,
        /// How long the agent waited.
        waited_ms: u64,
    },
}

/// The first protocol version that knows [`AbortReason::WaitedForOthers`].
pub const WAITED_FOR_OTHERS_VERSION: u16 = 10;

/// `$msg` (a `&$enum`) as a peer of `$version` must read it, if it is the
/// reason-carrying `$enum::$variant { $fields.., reason }` and that peer
/// does not know every reason ([`AbortReason::for_version`]); else `None`.
macro_rules! with_older_reason {
    ($msg:expr, $version:expr, $enum:ident :: $variant:ident { $($field:ident),* }) => {
        match $msg {
            $enum::$variant { $($field,)* reason }
                if $version < $crate::protocol::WAITED_FOR_OTHERS_VERSION =>
            {
                Some($enum::$variant {
                    $($field: $field.clone(),)*
                    reason: reason.for_version($version),
                })
            }
            _ => None,
        }
    };
}
pub(super) use with_older_reason;

impl AbortReason {
    /// This reason as a peer of `version` reads it: a variant newer than
    /// the peer becomes the nearest one it knows (a rank held at its safe
    /// point reads as one that did not park in time).
    pub fn for_version(&self, version: u16) -> AbortReason {
        match self {
            AbortReason::WaitedForOthers { rank, waited_ms }
                if version < WAITED_FOR_OTHERS_VERSION =>
            {
                AbortReason::ParkTimeout {
                    rank: *rank,
                    waited_ms: *waited_ms,
                }
            }
            AbortReason::OnNode { node, reason } => AbortReason::OnNode {
                node: node.clone(),
                reason: Box::new(reason.for_version(version)),
            },
            AbortReason::Coordinator(reason) => {
                AbortReason::Coordinator(Box::new(reason.for_version(version)))
            }
            other => other.clone(),
        }
    }

    /// Whether this reason is only a consequence of another failure that
    /// should be reported instead (a rank held at its safe point by one
    /// that never reached its own).
    pub fn is_consequence(&self) -> bool {
        matches!(self.root(), AbortReason::WaitedForOthers { .. })
    }

    /// The reason under any [`AbortReason::OnNode`] and
    /// [`AbortReason::Coordinator`] wrappers.
    pub fn root(&self) -> &AbortReason {
        match self {
            AbortReason::OnNode { reason, .. } | AbortReason::Coordinator(reason) => reason.root(),
            other => other,
        }
    }

    /// The node a reason names, if an agent reported it.
    pub fn node(&self) -> Option<&str> {
        match self {
            AbortReason::OnNode { node, .. } => Some(node),
            AbortReason::Coordinator(reason) => reason.node(),
            _ => None,
        }
    }

    /// Wraps a reason with the node that reported it.
    pub fn on_node(self, node: &str) -> AbortReason {
        match self {
            already @ AbortReason::OnNode { .. } => already,
            reason => AbortReason::OnNode {
                node: node.to_owned(),
                reason: Box::new(reason),
            },
        }
    }

    /// Whether the epoch was lost to a full store.
    pub fn is_disk_full(&self) -> bool {
        matches!(self.root(), AbortReason::StoreFull { .. })
    }

    /// A store failure as a reason: a full store (`ENOSPC`, `EDQUOT`
    /// anywhere in the error's chain) is told apart, since the operator's
    /// remedy differs.
    pub fn store(err: &(dyn std::error::Error + 'static)) -> AbortReason {
        let detail = err.to_string();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return AbortReason::StoreFull { detail };
                }
            }
            next = err.source();
        }
        AbortReason::Store { detail }
    }
}

/// `0-3,5` style rendering of a rank set (sorted, deduplicated).
pub fn render_ranks(ranks: &[u32]) -> String {
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_ranks_and_nodes() {
        let reason = AbortReason::Deadline {
            stage: Stage::Durable,
            elapsed_ms: 1500,
            missing: vec![3, 0, 1, 2, 5],
        }
        .on_node("n1");
        assert_eq!(
            reason.to_string(),
            "node n1: deadline passed after 1.5s with ranks 0-3,5 not durable"
        );
        assert_eq!(reason.node(), Some("n1"));
        assert!(matches!(
            reason.root(),
            AbortReason::Deadline {
                stage: Stage::Durable,
                ..
            }
        ));
        // Wrapping twice keeps the first node.
        assert_eq!(reason.clone().on_node("n2").node(), Some("n1"));
    }

    #[test]
    fn full_store_is_found_under_wrappers() {
        let full = AbortReason::Coordinator(Box::new(
            AbortReason::StoreFull { detail: "x".into() }.on_node("a"),
        ));
        assert!(full.is_disk_full());
        assert!(!AbortReason::ShuttingDown.is_disk_full());
    }

    #[test]
    fn store_errors_tell_a_full_disk_apart() {
        let full = crate::store::fs::IoStepError::new(
            "write chunk",
            "/s/chunks/ab",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(
            AbortReason::store(&full),
            AbortReason::StoreFull { .. }
        ));
        let eio = crate::store::fs::IoStepError::new(
            "write chunk",
            "/s/chunks/ab",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        match AbortReason::store(&eio) {
            AbortReason::Store { detail } => assert!(detail.contains("/s/chunks/ab"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renders_rank_ranges() {
        assert_eq!(render_ranks(&[]), "(none)");
        assert_eq!(render_ranks(&[7]), "7");
        assert_eq!(render_ranks(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
    }
}
