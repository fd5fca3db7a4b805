//! The agents' connections as the coordinator sees them, and what the
//! agents say of their ranks: which registered, which left and how.
//!
//! An agent whose link was lost (a partition longer than the link
//! timeout) dials in again and states its ranks afresh (`agent/src/roster.rs`):
//! a registration or departure heard before is taken as a repeat, so the
//! statement is the same whether the coordinator heard everything or
//! nothing meanwhile.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::Instant;

use cryo_core::protocol::{AbortReason, Departure};

use crate::epoch::{Event as EpochEvent, Phase};
use crate::link_loss::LinkLoss;
use crate::running::Coordinator;
use crate::session::AgentMode;

/// One node's agent.
pub(crate) struct AgentHandle {
    /// The writing half of its connection; `None` once lost.
    pub(crate) writer: Option<TcpStream>,
    /// The protocol version it speaks: it is answered in that version.
    pub(crate) version: u16,
    pub(crate) ranks: BTreeSet<u32>,
    /// The agent process, when `cryo run` started it.
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
    /// The number of its current connection (`peers::next_link`): the loss
    /// of an older one, after the agent rejoined, is no news.
    pub(crate) link: u64,
    /// Why and when its connection was lost, until it rejoins.
    pub(crate) lost: Option<(LinkLoss, Instant)>,
}

impl AgentHandle {
    /// An agent not connected yet; `child` when `cryo run` started it.
    pub(crate) fn unconnected(child: Option<Child>, log: PathBuf) -> AgentHandle {
        AgentHandle {
            writer: None,
            version: cryo_core::protocol::PROTOCOL_VERSION,
            ranks: BTreeSet::new(),
            child,
            log,
            link: 0,
            lost: None,
        }
    }
}

/// How long after a rank that vanished without a word another rank that
/// says how it left (an exit status, a failed restart) is taken as the
/// cause: a launcher kills the other ranks as soon as one exits, and two
/// agents' reports may cross on the way.
const CAUSE_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

impl Coordinator {
    /// Whether a rank that left as `how` says is likelier the job's failure
    /// than the first one noted: it is the first, or the first vanished
    /// without a word just before it and this one says how it left.
    fn is_likelier_cause(&self, how: &Departure, now: Instant) -> bool {
        match (&self.first_left, self.first_left_at) {
            (Some((_, _, first)), Some(at)) => {
                !first.says_how()
                    && how.says_how()
                    && now.saturating_duration_since(at) < CAUSE_WINDOW
            }
            _ => true,
        }
    }

    /// The first agent lost while ranks still ran and not back since: node,
    /// why and when. Its ranks' ends are not seen, so a failure that began
    /// there is not blamed on a rank of a node still heard from.
    pub(crate) fn first_lost_agent(&self) -> Option<(String, String, Instant)> {
        (self.agents.iter())
            .filter_map(|(node, agent)| agent.lost.as_ref().map(|(why, at)| (node, why, *at)))
            .filter(|(.., at)| self.all_finalized_at.is_none_or(|all| *at < all))
            .min_by_key(|(.., at)| *at)
            .map(|(node, why, at)| (node.clone(), why.to_string(), at))
    }

    /// The nodes of `ranks` whose agent was lost: those ranks' ends were
    /// never seen.
    pub(crate) fn lost_nodes_of(&self, ranks: &[u32]) -> Vec<&str> {
        (self.agents.iter())
            .filter(|(_, agent)| {
                agent.writer.is_none() && agent.ranks.iter().any(|rank| ranks.contains(rank))
            })
            .map(|(node, _)| node.as_str())
            .collect()
    }

    /// An agent said hello: a spawned one is expected, an external one
    /// joins the job (any node the launcher used), and one heard from
    /// before rejoins after a lost link.
    pub(crate) fn on_agent_connected(
        &mut self,
        node: String,
        writer: TcpStream,
        version: u16,
        link: u64,
    ) {
        let external = matches!(self.opts.agents, AgentMode::External { .. });
        let job = self.opts.job.clone();
        let agent = match self.agents.get_mut(&node) {
            Some(agent) => agent,
            None if external => {
                tracing::info!(job = %job, node = %node, "agent.joined");
                cryo_core::say!("cryo: agent on node {node} joined");
                let joined = AgentHandle::unconnected(None, PathBuf::new());
                self.agents.entry(node.clone()).or_insert(joined)
            }
            None => return,
        };
        let again = agent.writer.is_some() || agent.lost.is_some();
        if external {
            // A restarted agent on the same node: its ranks register with
            // it again.
            agent.ranks.clear();
        }
        agent.writer = Some(writer);
        agent.version = version;
        agent.link = link;
        if let Some((why, at)) = agent.lost.take() {
            let secs = at.elapsed().as_secs_f64();
            tracing::info!(job = %job, node = %node, lost_s = secs, "agent.rejoined");
            cryo_core::say!(
                "cryo: the agent on node {node} is back ({secs:.0} s after it was lost: {why})"
            );
        }
        if again {
            // What it reported on its old connection may not have arrived:
            // the epoch under way cannot count on it.
            if let Some(epoch) = self.epoch.as_mut() {
                epoch.apply(EpochEvent::AgentLost { node }, Instant::now());
                self.progress();
            }
        }
    }

    /// Whether `link` is an older connection of `node`'s agent, which has
    /// dialed in again since.
    pub(crate) fn is_replaced_link(&self, node: &str, link: u64) -> bool {
        self.agents
            .get(node)
            .is_some_and(|agent| agent.link != link)
    }

    /// Whether `node`'s agent holds `rank`.
    fn holds(&self, node: &str, rank: u32) -> bool {
        self.agents
            .get(node)
            .is_some_and(|agent| agent.ranks.contains(&rank))
    }

    /// `rank` registered with `node`'s agent; `false` when the agent said
    /// so before (it rejoined).
    pub(crate) fn on_rank_registered(
        &mut self,
        node: &str,
        rank: u32,
        pid: u32,
        restored_epoch: Option<u64>,
    ) -> bool {
        if self.pids.get(&rank) == Some(&pid)
            && (self.gone.contains(&rank) || self.holds(node, rank))
        {
            // An agent that rejoined states its ranks again.
            return false;
        }
        self.gone.remove(&rank);
        if let Some(agent) = self.agents.get_mut(node) {
            agent.ranks.insert(rank);
        }
        self.pids.insert(rank, pid);
        tracing::info!(job = %self.opts.job, node, rank, pid, restored_epoch, "rank.registered");
        true
    }

    /// `rank` left `node`'s agent as `how` says; `false` when the agent
    /// said so before (it rejoined).
    pub(crate) fn on_rank_left(
        &mut self,
        node: &str,
        rank: u32,
        how: &Departure,
        now: Instant,
    ) -> bool {
        if self.gone.contains(&rank) && !self.holds(node, rank) {
            // Stated again by an agent that rejoined.
            return false;
        }
        self.gone.insert(rank);
        if let Some(agent) = self.agents.get_mut(node) {
            agent.ranks.remove(&rank);
        }
        if !how.is_finalized() && self.is_likelier_cause(how, now) {
            self.first_left = Some((rank, node.to_owned(), how.clone()));
            self.first_left_at = Some(now);
        }
        if how.is_finalized() && self.finalized.insert(rank) {
            let world = usize::try_from(self.opts.ranks).unwrap_or(usize::MAX);
            if self.finalized.len() == world {
                self.all_finalized_at = Some(now);
            }
        }
        if let Some(epoch) = self.epoch.as_mut() {
            if epoch.phase == Phase::Quiescing && !epoch.copied.contains_key(&rank) {
                let why = how.to_string();
                let reason = AbortReason::RankLeft { rank, why }.on_node(node);
                epoch.apply(EpochEvent::Failed(reason), now);
            }
        }
        true
    }

    /// An agent's connection `link` ended. One already back on a newer
    /// connection is no news.
    pub(crate) fn on_agent_lost(&mut self, node: &str, loss: &LinkLoss, link: u64) {
        if self.is_replaced_link(node, link) {
            tracing::info!(job = %self.opts.job, node, why = %loss, link, "agent.old_link_closed");
            return;
        }
        if self.epoch.is_some() {
            tracing::error!(job = %self.opts.job, node, why = %loss, "agent.lost");
            cryo_core::say!("cryo: lost the agent on node {node} ({loss})");
        } else if self.all_finalized_at.is_some() {
            // Every rank has said goodbye: the agents of a Slurm step stop
            // with it, so this is the job's end, not news.
            tracing::info!(job = %self.opts.job, node, why = %loss, "agent.gone_at_end");
        } else {
            // Between checkpoints it matters only for the next one.
            tracing::warn!(job = %self.opts.job, node, why = %loss, "agent.lost");
            cryo_core::say!("cryo: lost the agent on node {node} ({loss})");
        }
        if let Some(agent) = self.agents.get_mut(node) {
            agent.writer = None;
            agent.lost = Some((loss.clone(), Instant::now()));
        }
        if let Some(epoch) = self.epoch.as_mut() {
            epoch.apply(
                EpochEvent::AgentLost {
                    node: node.to_owned(),
                },
                Instant::now(),
            );
        }
        self.progress();
    }
}

#[cfg(test)]
#[path = "agent_links_tests.rs"]
mod tests;
