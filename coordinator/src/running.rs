//! The running job as the coordinator's event loop sees it: its agents,
//! the epoch in flight, and the clients waiting for it. Owned by the main
//! thread alone, so the epoch logic ([`crate::epoch`]) never needs a lock.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Child;
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use cryo_core::protocol::{
    write_message_as, AbortReason, AgentToCoordinator, CoordinatorToAgent, Departure,
    EpochProgress, JobRequest, JobResponse, JobStatus, NodeStatus,
};
use cryo_core::store::JobStore;

use crate::agent_links::AgentHandle;
use crate::commit::Committer;
use crate::epoch::{Epoch, Event as EpochEvent, Phase};
use crate::human;
use crate::link_loss::LinkLoss;
use crate::peers::Event;
use crate::refusal::Refusal;
use crate::session::{stop_process_group, RunOptions};

/// A `cryo checkpoint` or `preempt` waiting for the epoch's outcome.
pub(crate) struct Waiter {
    pub(crate) reply: Sender<JobResponse>,
    /// A `cryo preempt`: answered by the job's last epoch.
    pub(crate) preempt: bool,
}

/// The job's state, owned by the event loop.
pub(crate) struct Coordinator {
    pub(crate) opts: RunOptions,
    pub(crate) job: JobStore,
    pub(crate) agents: BTreeMap<String, AgentHandle>,
    pub(crate) pids: BTreeMap<u32, u32>,
    pub(crate) epoch: Option<Epoch>,
    max_pause_us: u64,
    last_parked: Option<Instant>,
    waiters: Vec<Waiter>,
    last_attempted: u64,
    pub(crate) preempting: bool,
    /// Whether a `--requeue` job goes back in Slurm's queue once stopped:
    /// asked by Slurm's warning (SIGUSR1) or `cryo preempt`, not by a
    /// SIGTERM (`scancel`), nor once the job finished by itself.
    pub(crate) requeue_on_stop: bool,
    pub(crate) preempt_result: Option<bool>,
    /// The epoch started once the job was to stop: its ranks stay parked
    /// until the job stops, so nothing they compute is lost or redone.
    stop_epoch: Option<u64>,
    /// A periodic checkpoint is held back by an away agent (`interval`).
    pub(crate) interval_deferred: bool,
    /// A stop's wait for agents that lost their link (`preemption`).
    pub(crate) stop_wait: Option<crate::preemption::StopWait>,
    /// The Slurm step running this job's agents (`AgentStarter::SrunStep`).
    pub(crate) agent_step: Option<Child>,
    committer: Committer,
    /// The epoch whose commit is running.
    committing: Option<u64>,
    /// Ranks that said goodbye (`cryo_finalize`).
    pub(crate) finalized: BTreeSet<u32>,
    /// Ranks whose departure was taken (said goodbye or not).
    pub(crate) gone: BTreeSet<u32>,
    /// When the last rank of the world said goodbye.
    pub(crate) all_finalized_at: Option<Instant>,
    /// The first rank that left without saying goodbye: rank, node and
    /// why, as its agent saw it (its restart failed, it died), told when
    /// the job fails.
    pub(crate) first_left: Option<(u32, String, Departure)>,
    /// When `first_left` was noted.
    pub(crate) first_left_at: Option<Instant>,
}

impl Coordinator {
    /// Whether the job is ending by itself: a rank has called
    /// `cryo_finalize`, so no checkpoint of it can be taken any more.
    pub(crate) fn finishing(&self) -> Option<u32> {
        self.finalized.first().copied()
    }

    /// The ranks that registered and have not finalized (said goodbye, or
    /// exited with status 0).
    pub(crate) fn unfinalized(&self) -> Vec<u32> {
        (self.pids.keys())
            .filter(|rank| !self.finalized.contains(rank))
            .copied()
            .collect()
    }

    /// A coordinator for `opts`' job, with no agent yet.
    pub(crate) fn new(
        opts: RunOptions,
        job: JobStore,
        events: Sender<crate::peers::Event>,
    ) -> Self {
        Coordinator {
            committer: Committer::new(job.clone(), opts.ranks, opts.chunk_size, events),
            job,
            agents: BTreeMap::new(),
            pids: BTreeMap::new(),
            epoch: None,
            max_pause_us: 0,
            last_parked: None,
            waiters: Vec::new(),
            last_attempted: 0,
            preempting: false,
            requeue_on_stop: false,
            preempt_result: None,
            stop_epoch: None,
            stop_wait: None,
            interval_deferred: false,
            agent_step: None,
            committing: None,
            finalized: BTreeSet::new(),
            gone: BTreeSet::new(),
            all_finalized_at: None,
            first_left: None,
            first_left_at: None,
            opts,
        }
    }

    fn send(&mut self, node: &str, msg: &CoordinatorToAgent) {
        if let Some(agent) = self.agents.get_mut(node) {
            if let Some(writer) = agent.writer.as_ref() {
                if let Err(err) = write_message_as(&mut &*writer, msg, agent.version) {
                    // Its epoch part then misses its deadline and aborts.
                    tracing::warn!(job = %self.opts.job, node, error = %err, "agent.write_failed");
                    agent.writer = None;
                    let loss = if err.is_disconnect() {
                        LinkLoss::Closed
                    } else {
                        LinkLoss::Unwritable(err.to_string())
                    };
                    agent.lost = Some((loss, Instant::now()));
                }
            }
        }
    }

    fn broadcast(&mut self, msg: &CoordinatorToAgent) {
        let nodes: Vec<String> = self.agents.keys().cloned().collect();
        for node in nodes {
            self.send(&node, msg);
        }
    }

    /// Handles one event of the coordinator's channel.
    pub(crate) fn on_event(&mut self, event: Event) {
        match event {
            Event::AgentConnected {
                node,
                writer,
                version,
                link,
            } => self.on_agent_connected(node, writer, version, link),
            Event::Agent { node, msg } => self.on_agent_message(&node, msg),
            Event::AgentLost { node, why, link } => self.on_agent_lost(&node, &why, link),
            Event::Request { request, reply } => self.on_request(request, reply),
            Event::Committed { epoch, result } => self.on_committed(epoch, result),
        }
    }

    pub(crate) fn registered(&self) -> usize {
        self.agents.values().map(|a| a.ranks.len()).sum()
    }

    fn next_epoch(&self) -> Result<u64> {
        let committed = self.job.latest_committed()?.unwrap_or(0);
        let partial = self
            .job
            .partial_epochs()?
            .iter()
            .map(|(e, _)| *e)
            .max()
            .unwrap_or(0);
        Ok(committed.max(partial).max(self.last_attempted) + 1)
    }

    pub(crate) fn start_checkpoint(&mut self, why: &str) -> Result<u64, Refusal> {
        if let Some(epoch) = &self.epoch {
            return Err(Refusal::InProgress { epoch: epoch.epoch });
        }
        let registered = self.registered();
        let ranks = self.opts.ranks;
        // One pass over the held ranks, not one per rank and agent: a
        // stop waiting for an agent asks this on every tick.
        let held: HashSet<u32> = (self.agents.values())
            .flat_map(|a| a.ranks.iter().copied())
            .collect();
        let restating = (self.pids.keys())
            .filter(|rank| !self.gone.contains(rank) && !held.contains(rank))
            .count();
        if restating > 0 {
            return Err(Refusal::Restating { ranks: restating });
        }
        let left = self.pids.len().saturating_sub(registered);
        if left > 0 {
            return Err(Refusal::RanksLeft { left, ranks });
        }
        if registered < ranks as usize {
            return Err(Refusal::NotRegistered { registered, ranks });
        }
        if let Some((node, agent)) = self.agents.iter().find(|(_, a)| a.writer.is_none()) {
            return Err(Refusal::AgentAway {
                node: node.clone(),
                lost: (agent.lost.as_ref()).map(|(why, at)| (why.clone(), at.elapsed())),
            });
        }
        let epoch = self
            .next_epoch()
            .map_err(|e| Refusal::Store(e.to_string()))?;
        if self.preempting {
            // The stop's checkpoint, whoever started it: a stop waiting
            // for an agent (`preemption`) waits no more.
            self.stop_epoch = Some(epoch);
            self.stop_waiting();
        }
        let _ = self.job.discard_pending(epoch);
        self.last_attempted = epoch;
        self.max_pause_us = 0;
        self.last_parked = None;
        let placement = (self.agents.iter())
            .flat_map(|(node, agent)| agent.ranks.iter().map(|rank| (*rank, node.clone())));
        self.epoch = Some(
            Epoch::new(
                epoch,
                self.opts.ranks,
                self.opts.checkpoint_timeout,
                Instant::now(),
            )
            .placed(placement),
        );
        tracing::info!(job = %self.opts.job, epoch, why, "checkpoint.requested");
        cryo_core::say!("cryo: checkpoint of epoch {epoch} requested ({why})");
        let park_timeout_ms = u64::try_from(self.opts.park_timeout.as_millis()).unwrap_or(u64::MAX);
        // Before the job stops, the ranks stay parked until their parts
        // are durable: what they would compute meanwhile is lost anyway.
        self.broadcast(&CoordinatorToAgent::checkpoint(
            epoch,
            park_timeout_ms,
            self.preempting,
        ));
        Ok(epoch)
    }

    pub(crate) fn on_agent_message(&mut self, node: &str, msg: AgentToCoordinator) {
        let now = Instant::now();
        match msg {
            AgentToCoordinator::RankRegistered {
                rank,
                pid,
                restored_epoch,
            } => {
                if !self.on_rank_registered(node, rank, pid, restored_epoch) {
                    return;
                }
            }
            AgentToCoordinator::RankLeft { rank, how } => {
                if !self.on_rank_left(node, rank, &how, now) {
                    return;
                }
            }
            AgentToCoordinator::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    self.max_pause_us = self.max_pause_us.max(pause_us);
                    let parked = now
                        .checked_sub(Duration::from_micros(pause_us))
                        .unwrap_or(now);
                    self.last_parked = Some(self.last_parked.map_or(parked, |t| t.max(parked)));
                    current.apply(EpochEvent::Copied { rank, bytes }, now);
                    tracing::info!(job = %self.opts.job, node, rank, epoch, pause_us, "rank.resumed");
                }
            }
            AgentToCoordinator::Durable {
                epoch,
                rank,
                written,
            } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    current.apply(EpochEvent::Durable { rank, written }, now);
                }
            }
            AgentToCoordinator::Failed { epoch, reason } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    // A version 4 agent's text does not name its node.
                    let reason = match reason {
                        AbortReason::Text(text) => AbortReason::Text(text).on_node(node),
                        typed => typed,
                    };
                    current.apply(EpochEvent::Failed(reason), now);
                }
            }
            // Its arrival is what counts, on the link's reading thread.
            AgentToCoordinator::Alive => return,
        }
        self.progress();
    }

    /// Moves the epoch forward: commit when every rank is durable, report
    /// when it is over.
    pub(crate) fn progress(&mut self) {
        let Some(mut epoch) = self.epoch.take() else {
            return;
        };
        epoch.tick(Instant::now());
        if epoch.phase == Phase::Committing && self.committing.is_none() {
            self.committing = Some(epoch.epoch);
            self.committer.start(epoch.epoch);
        }
        match &epoch.phase {
            Phase::Committed => {
                let elapsed = epoch.started.elapsed();
                let quiesce = self
                    .last_parked
                    .map(|t| t.saturating_duration_since(epoch.started))
                    .unwrap_or_default();
                let longest_pause = Duration::from_micros(self.max_pause_us);
                // The time went to the quiesce, the copy and the drain: each
                // is said apart. The rate is from the last park to the
                // commit: a pause may hold no copy at all (a clone) or the
                // whole drain (a preemption's), so no rate is over a pause.
                let after_park = elapsed.saturating_sub(quiesce);
                let rate = match epoch.bytes_copied() {
                    0 => "nothing copied".to_owned(),
                    bytes => human::rate(bytes, after_park.as_secs_f64()),
                };
                cryo_core::say!(
                    "cryo: epoch {} committed: {} ranks; quiesced in {:.3} s; {} copied, longest rank pause {:.1} ms; {} written; committed {:.2} s after the park ({}); {:.2} s in all",
                    epoch.epoch,
                    epoch.world_size,
                    quiesce.as_secs_f64(),
                    human::bytes(epoch.bytes_copied()),
                    longest_pause.as_secs_f64() * 1000.0,
                    human::bytes(epoch.bytes_written()),
                    after_park.as_secs_f64(),
                    rate,
                    elapsed.as_secs_f64()
                );
                self.broadcast(&CoordinatorToAgent::Committed { epoch: epoch.epoch });
                let response = JobResponse::Committed {
                    epoch: epoch.epoch,
                    max_pause_us: self.max_pause_us,
                    quiesce_us: self.last_parked.map_or(0, |t| {
                        u64::try_from(t.saturating_duration_since(epoch.started).as_micros())
                            .unwrap_or(u64::MAX)
                    }),
                    bytes: epoch.bytes_copied(),
                    written: epoch.bytes_written(),
                    elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                };
                if self.preempting && !self.stop_after(epoch.epoch, false) {
                    // The job stops now: it leaves the registry before
                    // `cryo preempt` hears, so that a restart right after
                    // waits for this run to exit instead of finding it.
                    crate::registry::Registry::of(&self.job).clear_coordinator();
                    self.preempt_result = Some(true);
                }
                self.answer(&response);
                let (job, keep) = (self.job.clone(), self.opts.keep);
                thread::spawn(move || {
                    if let Err(err) = job.gc(Some(keep)) {
                        tracing::warn!(job = %job.name(), error = %err, "gc.failed");
                    }
                });
            }
            Phase::Aborted(reason) => {
                let reason = reason.clone();
                tracing::info!(job = %self.opts.job, epoch = epoch.epoch, reason = %reason, "epoch.aborted");
                let stands = crate::report::what_stands(self.job.latest_committed());
                cryo_core::say!("cryo: epoch {} aborted: {reason}; {stands}", epoch.epoch);
                self.broadcast(&CoordinatorToAgent::Abort {
                    epoch: epoch.epoch,
                    reason: reason.clone(),
                });
                let _ = self.job.discard_pending(epoch.epoch);
                let response = JobResponse::Aborted {
                    epoch: epoch.epoch,
                    reason,
                };
                if self.preempting && !self.stop_after(epoch.epoch, true) {
                    self.preempt_result = Some(false);
                }
                self.answer(&response);
            }
            _ => self.epoch = Some(epoch),
        }
    }

    /// Whether the job, to stop after `epoch` (over), takes one more
    /// epoch first: `epoch` began before the stop was asked for, so its
    /// ranks computed on after it, and stopping now would lose those steps
    /// and run them (and print their output) again after a restart. The
    /// stop's own epoch, aborted while an agent is away, is taken again
    /// once the agent is back (within `--rejoin-wait`).
    fn stop_after(&mut self, epoch: u64, aborted: bool) -> bool {
        let why = if self.stop_epoch != Some(epoch) {
            "the stop, after the epoch in flight"
        } else if aborted && self.agents.values().any(|a| a.writer.is_none()) {
            "the stop, again"
        } else {
            return false;
        };
        match self.start_stop_checkpoint(why) {
            Ok(_) => true,
            Err(reason) => {
                cryo_core::say!(
                    "cryo: stopping after epoch {epoch}: no further checkpoint: {reason}"
                );
                false
            }
        }
    }

    /// Answers the waiters of an epoch that is over; a `cryo preempt`
    /// waits on while the job's last epoch is under way.
    pub(crate) fn answer(&mut self, response: &JobResponse) {
        let last_to_come = self.epoch.is_some() || self.is_awaiting_agent();
        self.waiters.retain(|waiter| {
            if waiter.preempt && last_to_come {
                return true;
            }
            let _ = waiter.reply.send(response.clone());
            false
        });
    }

    /// The commit thread finished `epoch`.
    pub(crate) fn on_committed(&mut self, epoch: u64, result: crate::commit::CommitResult) {
        if self.committing != Some(epoch) {
            return;
        }
        self.committing = None;
        let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) else {
            return;
        };
        let result = result.map(|warnings| {
            // Said when the checkpoint is taken, not found at restart.
            for warning in warnings {
                tracing::info!(job = %self.opts.job, epoch, warning = %warning, "epoch.not_restorable");
                cryo_core::say!("cryo: epoch {epoch}: {warning}");
            }
        });
        current.committed(result);
        self.progress();
    }

    /// Whether a commit is running (its outcome must be waited for before
    /// the coordinator exits).
    pub(crate) fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            job: self.opts.job.clone(),
            world_size: self.opts.ranks,
            nodes: self
                .agents
                .iter()
                .map(|(node, agent)| NodeStatus {
                    node: node.clone(),
                    ranks: agent.ranks.iter().copied().collect(),
                    connected: agent.writer.is_some(),
                })
                .collect(),
            last_committed: self.job.latest_committed().ok().flatten(),
            in_progress: self.epoch.as_ref().map(|e| EpochProgress {
                epoch: e.epoch,
                phase: match e.phase {
                    Phase::Quiescing => "quiescing and copying".into(),
                    Phase::Draining => "draining to the store".into(),
                    Phase::Committing => "committing".into(),
                    Phase::Committed => "committed".into(),
                    Phase::Aborted(_) => "aborted".into(),
                },
                ranks_copied: u32::try_from(e.copied.len()).unwrap_or(u32::MAX),
                ranks_durable: u32::try_from(e.durable.len()).unwrap_or(u32::MAX),
                bytes_copied: e.bytes_copied(),
                bytes_written: e.bytes_written(),
                elapsed_ms: u64::try_from(e.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            restarted_from: self.opts.restart_from,
        }
    }

    pub(crate) fn on_request(&mut self, request: JobRequest, reply: Sender<JobResponse>) {
        match request {
            JobRequest::Status => {
                let _ = reply.send(JobResponse::Status(self.status()));
            }
            // Not answered: `reply` goes, and the agent's connection closes.
            JobRequest::Warning { from } => self.on_warning(&from),
            JobRequest::Terminated { from } => self.on_terminated(&from),
            JobRequest::Checkpoint | JobRequest::Preempt => {
                let preempt = request == JobRequest::Preempt;
                let why = if preempt {
                    "cryo preempt"
                } else {
                    "cryo checkpoint"
                };
                // Set first: the epoch it starts is the job's last.
                self.preempting |= preempt;
                self.requeue_on_stop |= preempt;
                let started = if preempt {
                    self.start_stop_checkpoint(why)
                } else {
                    self.start_checkpoint(why).map(Some)
                };
                match started {
                    // Not started yet: an agent is away (`preemption`).
                    Ok(_) => self.waiters.push(Waiter { reply, preempt }),
                    Err(reason) if preempt && self.epoch.is_some() => {
                        // Preempt during a checkpoint: one more, parked,
                        // once it is over (`stop_after`).
                        tracing::info!(job = %self.opts.job, reason = %reason, "preempt.after_current_epoch");
                        self.waiters.push(Waiter { reply, preempt });
                    }
                    Err(reason) if preempt => {
                        let what = match self.finishing() {
                            Some(rank) => format!(
                                "rank {rank} has called cryo_finalize: the job is left to end"
                            ),
                            None => "the job is stopped without a new checkpoint".to_owned(),
                        };
                        cryo_core::say!("cryo: preempting without a new checkpoint: {reason}");
                        self.preempt_result = Some(false);
                        let _ = reply.send(JobResponse::Refused {
                            reason: format!("{reason}; {what}"),
                        });
                    }
                    Err(reason) => {
                        let reason = reason.to_string();
                        let _ = reply.send(JobResponse::Refused { reason });
                    }
                }
            }
        }
    }

    /// A warning of the job's end reached a rank rather than `cryo run`
    /// (Slurm's `--signal` without `B:`): it counts as the `SIGUSR1` that
    /// `--signal=B:USR1` would have sent here. A checkpoint or a stop
    /// already under way is the answer to the rest of the burst.
    fn on_warning(&mut self, from: &str) {
        if self.preempting || self.epoch.is_some() {
            tracing::info!(job = %self.opts.job, from, "warning.already_answered");
            return;
        }
        tracing::info!(job = %self.opts.job, from, "warning.received");
        cryo_core::say!(
            "cryo: {from} (Slurm's --signal without B: reaches the ranks, not cryo run): taken as a SIGUSR1 to cryo run"
        );
        crate::signals::GOT_USR1.store(true, std::sync::atomic::Ordering::Release);
    }

    /// A `SIGTERM` reached a rank: Slurm sent it to `cryo run` too (at
    /// `scancel` or a preemption), or someone sent it to that rank alone.
    fn on_terminated(&mut self, from: &str) {
        if self.preempting {
            tracing::info!(job = %self.opts.job, from, "termination.already_answered");
            return;
        }
        tracing::info!(job = %self.opts.job, from, "termination.received");
        cryo_core::say!("cryo: {from}: taken as a SIGTERM to cryo run");
        crate::signals::GOT_TERM.store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn shutdown_agents(&mut self) {
        self.broadcast(&CoordinatorToAgent::Shutdown);
        if let Some(mut step) = self.agent_step.take() {
            // The agents exit on Shutdown, which ends their step.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(step.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(2));
            }
            stop_process_group(&mut step, Duration::from_secs(5));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for agent in self.agents.values_mut() {
            if let Some(child) = agent.child.as_mut() {
                while Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    // Agents exit within milliseconds of Shutdown; this
                    // wait is the last thing between the job and its end.
                    thread::sleep(Duration::from_millis(2));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
