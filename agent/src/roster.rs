//! What the coordinator must know of this node's ranks, kept so that an
//! agent whose link was lost can tell it again when it rejoins.
//!
//! Reports sent just before a link died may never have arrived (TCP's send
//! buffer goes with the connection), and reports made while it was down
//! were never sent. So the agent does not replay what it missed: it states
//! the whole of it again. Each rank on the node now registers again, and
//! each rank that left (with how) registers and leaves again. The
//! coordinator takes a report it already had as a repeat, so the
//! statement is the same whether the coordinator heard everything or
//! nothing.

use std::collections::BTreeMap;

use cryo_core::protocol::{AgentToCoordinator, Departure};

/// A rank as it registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    pid: u32,
    restored_epoch: Option<u64>,
}

/// The node's ranks, from the reports the agent made.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    present: BTreeMap<u32, Registration>,
    /// Ranks that left, with their registration (none for a rank turned
    /// away before it registered) and how.
    departed: BTreeMap<u32, (Option<Registration>, Departure)>,
}

impl Roster {
    /// Takes note of a report, sent or not.
    pub(crate) fn record(&mut self, msg: &AgentToCoordinator) {
        match msg {
            AgentToCoordinator::RankRegistered {
                rank,
                pid,
                restored_epoch,
            } => {
                self.departed.remove(rank);
                let registration = Registration {
                    pid: *pid,
                    restored_epoch: *restored_epoch,
                };
                self.present.insert(*rank, registration);
            }
            AgentToCoordinator::RankLeft { rank, how } => {
                let registration = self.present.remove(rank);
                self.departed.insert(*rank, (registration, how.clone()));
            }
            AgentToCoordinator::Copied { .. }
            | AgentToCoordinator::Durable { .. }
            | AgentToCoordinator::Failed { .. }
            | AgentToCoordinator::Alive => {}
        }
    }

    /// The reports that state the roster afresh: departures first (each
    /// after its registration), then the ranks present.
    pub(crate) fn restated(&self) -> Vec<AgentToCoordinator> {
        let registered = |rank: u32, r: &Registration| AgentToCoordinator::RankRegistered {
            rank,
            pid: r.pid,
            restored_epoch: r.restored_epoch,
        };
        let mut out = Vec::new();
        for (rank, (registration, how)) in &self.departed {
            out.extend(registration.as_ref().map(|r| registered(*rank, r)));
            out.push(AgentToCoordinator::RankLeft {
                rank: *rank,
                how: how.clone(),
            });
        }
        out.extend(self.present.iter().map(|(rank, r)| registered(*rank, r)));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn registered(rank: u32, pid: u32) -> AgentToCoordinator {
        AgentToCoordinator::RankRegistered {
            rank,
            pid,
            restored_epoch: None,
        }
    }

    fn left(rank: u32, how: Departure) -> AgentToCoordinator {
        AgentToCoordinator::RankLeft { rank, how }
    }

    #[test]
    fn an_empty_roster_states_nothing() {
        assert!(Roster::default().restated().is_empty());
    }

    #[test]
    fn ranks_present_register_again_and_departed_ones_register_and_leave() {
        let mut roster = Roster::default();
        for msg in [
            registered(0, 100),
            registered(1, 101),
            registered(2, 102),
            left(1, Departure::Finalized),
            // Turned away before it registered: it only leaves.
            left(
                3,
                Departure::RefusedAtRestart {
                    reason: "no image".into(),
                },
            ),
        ] {
            roster.record(&msg);
        }
        assert_eq!(
            roster.restated(),
            [
                registered(1, 101),
                left(1, Departure::Finalized),
                left(
                    3,
                    Departure::RefusedAtRestart {
                        reason: "no image".into()
                    }
                ),
                registered(0, 100),
                registered(2, 102),
            ]
        );
    }

    #[test]
    fn a_rank_that_registers_again_is_no_longer_departed() {
        let mut roster = Roster::default();
        roster.record(&registered(0, 100));
        roster.record(&left(0, Departure::Vanished));
        roster.record(&AgentToCoordinator::RankRegistered {
            rank: 0,
            pid: 200,
            restored_epoch: Some(4),
        });
        assert_eq!(
            roster.restated(),
            [AgentToCoordinator::RankRegistered {
                rank: 0,
                pid: 200,
                restored_epoch: Some(4),
            }]
        );
    }

    #[test]
    fn epoch_reports_are_not_part_of_it() {
        let mut roster = Roster::default();
        roster.record(&AgentToCoordinator::Durable {
            epoch: 1,
            rank: 0,
            written: 5,
        });
        assert!(roster.restated().is_empty());
    }
}
