//! The checkpoint epoch state machine, free of I/O so it can be tested alone.
//!
//! ```text
//!  coordinator            agents (one per node)              ranks
//!      | Checkpoint{E} ------->| set control-page flag = E ------>|
//!      |                       |          all ranks agree on the same safe
//!      |                       |          point (MPI), barrier, park
//!      |                       |<------------- Parked{E, regions} |
//!      |                       | process_vm_readv into buffer pool |
//!      |<------ Copied{E, r} --| Resume{E} ----------------------->| runs on
//!      |                       | hash + zstd + write chunks, part  |
//!      |<----- Durable{E, r} --|                                   |
//!  all ranks durable: commit_epoch(E) = manifest published (link(2))
//!      |------ Committed{E} -->|
//! ```
//!
//! Any failure (an agent lost, a rank lost, a write error, the deadline)
//! aborts the epoch until every rank is durable: the coordinator tells every
//! agent `Abort{E}`, which resumes parked ranks and discards the pending
//! parts. The previous committed epoch is never touched. Once every rank is
//! durable the commit alone decides: it runs off the event thread
//! ([`crate::commit`]), and nothing else (a lost agent, the deadline, the
//! job ending) can abort the epoch under it.
//!
//! A failure that is only a consequence (a rank held at its safe point by
//! one that never reached its own) does not abort at once: the epoch waits
//! for the cause, which the agent of the rank that never reached a safe
//! point reports at about the same deadline, so that the user is told which
//! rank to look at. It waits until every rank is copied or on a node that
//! has reported a failure (no cause can come any more), and at most
//! [`CAUSE_WAIT`]: agents' park deadlines differ by when each got the
//! request, and on a busy node an agent starved by its ranks reports
//! seconds late.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cryo_core::protocol::{AbortReason, Stage};

/// How long a consequence waits at most for its cause before it aborts the
/// epoch itself, while some rank is neither copied nor on a node that has
/// reported (an agent that stopped answering; the deadline or the loss of
/// its connection usually comes first).
pub const CAUSE_WAIT: Duration = Duration::from_secs(30);

/// Phase of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Agents asked; waiting for every rank's memory to be copied.
    Quiescing,
    /// Every rank copied and resumed; waiting for durability.
    Draining,
    /// Every rank durable; the manifest is being committed.
    Committing,
    /// Committed.
    Committed,
    /// Aborted, with the reason.
    Aborted(AbortReason),
}

/// What happened to the epoch, as fed by the coordinator's event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A rank's memory was copied (it has resumed).
    Copied {
        /// The rank.
        rank: u32,
        /// Bytes copied.
        bytes: u64,
    },
    /// A rank's chunks and part are durable.
    Durable {
        /// The rank.
        rank: u32,
        /// Stored bytes it wrote.
        written: u64,
    },
    /// An agent, a rank or the job failed the epoch.
    Failed(AbortReason),
    /// An agent's connection was lost.
    AgentLost {
        /// The node.
        node: String,
    },
}

/// One checkpoint epoch in flight.
#[derive(Debug, Clone)]
pub struct Epoch {
    /// Epoch number.
    pub epoch: u64,
    /// World size.
    pub world_size: u32,
    /// Phase.
    pub phase: Phase,
    /// When it was requested.
    pub started: Instant,
    /// When it must be committed by.
    pub deadline: Instant,
    /// Ranks whose memory was copied, with bytes.
    pub copied: BTreeMap<u32, u64>,
    /// Ranks durable, with bytes written.
    pub durable: BTreeMap<u32, u64>,
    /// When the last rank resumed (the job-visible pause ends).
    pub all_copied_at: Option<Instant>,
    /// A consequence reported, held until its cause arrives, every rank is
    /// accounted for, or the time given.
    held: Option<(AbortReason, Instant)>,
    /// The node of each rank, as far as known ([`Epoch::placed`]).
    nodes: BTreeMap<u32, String>,
    /// Nodes whose agent reported a failure of this epoch.
    failed_nodes: BTreeSet<String>,
}

impl Epoch {
    /// A new epoch for `world_size` ranks with `timeout`.
    pub fn new(epoch: u64, world_size: u32, timeout: Duration, now: Instant) -> Epoch {
        Epoch {
            epoch,
            world_size,
            phase: Phase::Quiescing,
            started: now,
            deadline: now + timeout,
            copied: BTreeMap::new(),
            durable: BTreeMap::new(),
            all_copied_at: None,
            held: None,
            nodes: BTreeMap::new(),
            failed_nodes: BTreeSet::new(),
        }
    }

    /// This epoch with the node of each rank: a consequence is then
    /// reported as soon as no cause can come any more.
    #[must_use]
    pub fn placed(mut self, nodes: impl IntoIterator<Item = (u32, String)>) -> Epoch {
        self.nodes.extend(nodes);
        self
    }

    /// Whether the epoch is over (committed or aborted).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Aborted(_))
    }

    fn abort(&mut self, reason: AbortReason) {
        if !self.is_finished() {
            self.phase = Phase::Aborted(reason);
        }
    }

    /// Applies an event; returns the new phase. Once every rank is durable
    /// only the commit's outcome changes the phase.
    pub fn apply(&mut self, event: Event, now: Instant) -> &Phase {
        if self.is_finished() || self.phase == Phase::Committing {
            return &self.phase;
        }
        match event {
            Event::Copied { rank, bytes } if rank < self.world_size => {
                self.copied.insert(rank, bytes);
            }
            Event::Durable { rank, written } if rank < self.world_size => {
                // Durable implies copied (an agent may report both at once).
                self.copied.entry(rank).or_insert(0);
                self.durable.insert(rank, written);
            }
            Event::Copied { rank, .. } | Event::Durable { rank, .. } => {
                self.abort(AbortReason::UnknownRank {
                    rank,
                    world_size: self.world_size,
                });
            }
            Event::Failed(reason) if reason.is_consequence() => {
                if let Some(node) = reason.node() {
                    self.failed_nodes.insert(node.to_owned());
                }
                if self.held.is_none() {
                    self.held = Some((reason, now + CAUSE_WAIT));
                }
            }
            Event::Failed(reason) => self.abort(reason),
            Event::AgentLost { node } => self.abort(AbortReason::AgentLost { node }),
        }
        self.release_held(now);
        self.advance(now);
        &self.phase
    }

    /// Checks the deadline (which a commit under way no longer has), and
    /// whether a held consequence waited long enough for its cause.
    pub fn tick(&mut self, now: Instant) -> &Phase {
        self.release_held(now);
        let waiting = matches!(self.phase, Phase::Quiescing | Phase::Draining);
        if waiting && now >= self.deadline {
            let stage = match self.phase {
                Phase::Quiescing => Stage::Copied,
                _ => Stage::Durable,
            };
            self.abort(AbortReason::Deadline {
                stage,
                elapsed_ms: u64::try_from((now - self.started).as_millis()).unwrap_or(u64::MAX),
                missing: self.missing().into_iter().collect(),
            });
        }
        &self.phase
    }

    /// Aborts with the held consequence once its cause can no longer come
    /// or its time is up.
    fn release_held(&mut self, now: Instant) {
        let waiting = matches!(self.phase, Phase::Quiescing | Phase::Draining);
        let over = |(_, until): &(AbortReason, Instant)| now >= *until || self.no_cause_to_come();
        if waiting && self.held.as_ref().is_some_and(over) {
            if let Some((reason, _)) = self.held.take() {
                self.abort(reason);
            }
        }
    }

    /// Whether every rank is copied or on a node that reported a failure:
    /// whatever held a rank at its safe point has been said, if anything.
    fn no_cause_to_come(&self) -> bool {
        (0..self.world_size).all(|rank| {
            self.copied.contains_key(&rank)
                || (self.nodes.get(&rank)).is_some_and(|node| self.failed_nodes.contains(node))
        })
    }

    fn advance(&mut self, now: Instant) {
        if self.phase == Phase::Quiescing && self.copied.len() == self.world_size as usize {
            self.phase = Phase::Draining;
            self.all_copied_at = Some(now);
        }
        if self.phase == Phase::Draining && self.durable.len() == self.world_size as usize {
            self.phase = Phase::Committing;
        }
    }

    /// Records the outcome of the manifest commit.
    pub fn committed(&mut self, result: Result<(), AbortReason>) {
        match result {
            Ok(()) if self.phase == Phase::Committing => self.phase = Phase::Committed,
            Ok(()) => self.abort(AbortReason::Agent {
                detail: "commit attempted before every rank was durable".into(),
            }),
            Err(reason) => {
                // The commit decides even from Committing, which `abort`
                // alone would also allow; said here for the reader.
                self.phase = Phase::Aborted(reason);
            }
        }
    }

    /// Ranks still outstanding in the current phase.
    pub fn missing(&self) -> BTreeSet<u32> {
        let done = match self.phase {
            Phase::Quiescing => &self.copied,
            _ => &self.durable,
        };
        (0..self.world_size)
            .filter(|r| !done.contains_key(r))
            .collect()
    }

    /// Bytes copied so far.
    pub fn bytes_copied(&self) -> u64 {
        self.copied.values().sum()
    }

    /// Stored bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.durable.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> (Epoch, Instant) {
        let now = Instant::now();
        (Epoch::new(7, 3, Duration::from_secs(10), now), now)
    }

    #[test]
    fn commits_only_when_every_rank_is_durable() {
        let (mut e, now) = epoch();
        for rank in 0..3 {
            assert_eq!(
                e.apply(Event::Copied { rank, bytes: 10 }, now),
                if rank < 2 {
                    &Phase::Quiescing
                } else {
                    &Phase::Draining
                }
            );
        }
        assert_eq!(e.bytes_copied(), 30);
        e.apply(
            Event::Durable {
                rank: 0,
                written: 5,
            },
            now,
        );
        e.apply(
            Event::Durable {
                rank: 2,
                written: 5,
            },
            now,
        );
        assert_eq!(e.phase, Phase::Draining);
        assert_eq!(e.missing(), BTreeSet::from([1]));
        e.apply(
            Event::Durable {
                rank: 1,
                written: 5,
            },
            now,
        );
        assert_eq!(e.phase, Phase::Committing);
        e.committed(Ok(()));
        assert_eq!(e.phase, Phase::Committed);
    }

    #[test]
    fn agent_loss_aborts_and_nothing_revives_it() {
        let (mut e, now) = epoch();
        e.apply(Event::Copied { rank: 0, bytes: 1 }, now);
        e.apply(Event::AgentLost { node: "b".into() }, now);
        assert!(matches!(&e.phase, Phase::Aborted(AbortReason::AgentLost { node }) if node == "b"));
        for rank in 0..3 {
            e.apply(Event::Durable { rank, written: 1 }, now);
        }
        e.committed(Ok(()));
        assert!(matches!(e.phase, Phase::Aborted(_)));
    }

    #[test]
    fn deadline_names_the_missing_ranks() {
        let (mut e, now) = epoch();
        e.apply(Event::Copied { rank: 1, bytes: 1 }, now);
        e.tick(now + Duration::from_secs(5));
        assert_eq!(e.phase, Phase::Quiescing);
        e.tick(now + Duration::from_secs(11));
        assert!(
            matches!(&e.phase, Phase::Aborted(AbortReason::Deadline { stage: Stage::Copied, missing, .. }) if missing == &[0, 2]),
            "{:?}",
            e.phase
        );
    }

    #[test]
    fn failures_and_unknown_ranks_abort() {
        let (mut e, now) = epoch();
        let full = AbortReason::StoreFull {
            detail: "writing chunks/ab".into(),
        }
        .on_node("a");
        e.apply(Event::Failed(full.clone()), now);
        assert_eq!(e.phase, Phase::Aborted(full));
        let (mut e, now) = epoch();
        e.apply(Event::Copied { rank: 9, bytes: 1 }, now);
        assert!(matches!(e.phase, Phase::Aborted(_)));
        let (mut e, _) = epoch();
        e.committed(Ok(()));
        assert!(matches!(e.phase, Phase::Aborted(_)));
    }

    #[test]
    fn once_every_rank_is_durable_only_the_commit_decides() {
        let (mut e, now) = epoch();
        for rank in 0..3 {
            e.apply(Event::Durable { rank, written: 1 }, now);
        }
        assert_eq!(e.phase, Phase::Committing);
        e.apply(Event::AgentLost { node: "a".into() }, now);
        e.apply(Event::Failed(AbortReason::ShuttingDown), now);
        e.tick(now + Duration::from_secs(60));
        assert_eq!(
            e.phase,
            Phase::Committing,
            "nothing aborts a commit under way"
        );
        e.committed(Err(AbortReason::Store {
            detail: "publishing the manifest: EIO".into(),
        }));
        assert!(matches!(e.phase, Phase::Aborted(AbortReason::Store { .. })));
    }

    fn held(rank: u32, node: &str) -> AbortReason {
        AbortReason::WaitedForOthers {
            rank,
            waited_ms: 8000,
        }
        .on_node(node)
    }

    /// Ranks 0 and 1 on node a, rank 2 on node b.
    fn placed() -> (Epoch, Instant) {
        let (e, now) = epoch();
        let nodes = [(0, "a"), (1, "a"), (2, "b")].map(|(r, n)| (r, n.to_owned()));
        (e.placed(nodes), now)
    }

    #[test]
    fn a_held_rank_waits_for_the_cause_while_its_node_has_not_reported() {
        let (mut e, now) = placed();
        e.apply(Event::Failed(held(0, "a")), now);
        e.apply(Event::Failed(held(1, "a")), now);
        // An agent starved by its ranks reports seconds after the other.
        e.tick(now + Duration::from_secs(5));
        assert_eq!(e.phase, Phase::Quiescing, "node b has not reported");
        let cause = AbortReason::ParkTimeout {
            rank: 2,
            waited_ms: 8000,
        }
        .on_node("b");
        e.apply(Event::Failed(cause.clone()), now + Duration::from_secs(6));
        assert_eq!(e.phase, Phase::Aborted(cause));
    }

    #[test]
    fn a_held_rank_is_the_reason_at_once_when_every_node_has_reported() {
        let (mut e, now) = placed();
        e.apply(Event::Failed(held(1, "a")), now);
        assert_eq!(e.phase, Phase::Quiescing);
        e.apply(Event::Failed(held(2, "b")), now);
        assert_eq!(e.phase, Phase::Aborted(held(1, "a")), "the first one held");
        // Copied ranks cannot be the cause either.
        let (mut e, now) = placed();
        e.apply(Event::Copied { rank: 2, bytes: 1 }, now);
        e.apply(Event::Failed(held(0, "a")), now);
        assert_eq!(e.phase, Phase::Aborted(held(0, "a")));
    }

    #[test]
    fn a_held_rank_is_the_reason_when_no_cause_comes() {
        // Rank 2's node is not known: only the time ends the wait.
        let now = Instant::now();
        let nodes = [(0, "b".to_owned()), (1, "a".to_owned())];
        let mut e = Epoch::new(7, 3, CAUSE_WAIT * 2, now).placed(nodes);
        e.apply(Event::Failed(held(1, "a")), now);
        e.apply(Event::Failed(held(0, "b")), now);
        e.tick(now + CAUSE_WAIT - Duration::from_millis(1));
        assert_eq!(e.phase, Phase::Quiescing);
        e.tick(now + CAUSE_WAIT);
        assert_eq!(e.phase, Phase::Aborted(held(1, "a")), "the first one held");
    }

    #[test]
    fn a_held_rank_does_not_outlast_the_deadline_or_a_lost_agent() {
        let (mut e, now) = epoch();
        e.apply(Event::Failed(held(1, "a")), now);
        e.apply(Event::AgentLost { node: "b".into() }, now);
        assert!(matches!(&e.phase, Phase::Aborted(AbortReason::AgentLost { node }) if node == "b"));
        let (mut e, now) = epoch();
        e.apply(
            Event::Failed(held(1, "a")),
            now + Duration::from_secs(9) + CAUSE_WAIT / 2,
        );
        e.tick(now + Duration::from_secs(10));
        assert!(matches!(
            e.phase,
            Phase::Aborted(AbortReason::Deadline { .. })
        ));
    }
}
