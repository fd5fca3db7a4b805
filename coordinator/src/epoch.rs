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
//! aborts the epoch: the coordinator tells every agent `Abort{E}`, which
//! resumes parked ranks and discards the pending parts. The previous
//! committed epoch is never touched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
    Aborted(String),
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
    /// An agent or rank reported a failure.
    Failed {
        /// Who (node or rank).
        who: String,
        /// Why.
        reason: String,
    },
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
        }
    }

    /// Whether the epoch is over (committed or aborted).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Aborted(_))
    }

    fn abort(&mut self, reason: String) {
        if !self.is_finished() {
            self.phase = Phase::Aborted(reason);
        }
    }

    /// Applies an event; returns the new phase.
    pub fn apply(&mut self, event: Event, now: Instant) -> &Phase {
        if self.is_finished() {
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
                self.abort(format!(
                    "rank {rank} reported, but the job has only {} ranks",
                    self.world_size
                ));
            }
            Event::Failed { who, reason } => self.abort(format!("{who}: {reason}")),
            Event::AgentLost { node } => {
                self.abort(format!("lost the agent on node {node:?}"));
            }
        }
        self.advance(now);
        &self.phase
    }

    /// Checks the deadline.
    pub fn tick(&mut self, now: Instant) -> &Phase {
        if !self.is_finished() && now >= self.deadline {
            let missing = self.missing();
            let stage = match self.phase {
                Phase::Quiescing => "copied",
                _ => "durable",
            };
            self.abort(format!(
                "deadline passed after {:.1}s with ranks {} not {stage}",
                (now - self.started).as_secs_f64(),
                render_ranks(&missing)
            ));
        }
        &self.phase
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
    pub fn committed(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) if self.phase == Phase::Committing => self.phase = Phase::Committed,
            Ok(()) => self.abort("commit attempted before every rank was durable".into()),
            Err(reason) => self.abort(format!("commit failed: {reason}")),
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

/// `0-3,5` style rendering of a rank set.
pub fn render_ranks(ranks: &BTreeSet<u32>) -> String {
    let mut parts = Vec::new();
    let mut iter = ranks.iter().copied().peekable();
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
        assert!(matches!(&e.phase, Phase::Aborted(r) if r.contains("\"b\"")));
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
            matches!(&e.phase, Phase::Aborted(r) if r.contains("ranks 0,2 not copied")),
            "{:?}",
            e.phase
        );
    }

    #[test]
    fn failures_and_unknown_ranks_abort() {
        let (mut e, now) = epoch();
        e.apply(
            Event::Failed {
                who: "node a".into(),
                reason: "disk full".into(),
            },
            now,
        );
        assert!(matches!(&e.phase, Phase::Aborted(r) if r.contains("disk full")));
        let (mut e, now) = epoch();
        e.apply(Event::Copied { rank: 9, bytes: 1 }, now);
        assert!(matches!(e.phase, Phase::Aborted(_)));
        let (mut e, _) = epoch();
        e.committed(Ok(()));
        assert!(matches!(e.phase, Phase::Aborted(_)));
    }

    #[test]
    fn renders_rank_ranges() {
        assert_eq!(
            render_ranks(&BTreeSet::from([0, 1, 2, 5, 7, 8])),
            "0-2,5,7-8"
        );
        assert_eq!(render_ranks(&BTreeSet::new()), "(none)");
    }
}
