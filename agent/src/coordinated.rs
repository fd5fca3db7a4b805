//! Coordinated mode: what the agent does for its job's coordinator.
//!
//! One thread reads the coordinator's requests ([`Shared::serve_coordinator`])
//! and, when the link is lost, dials again until the agent is back in the
//! job ([`Shared::rejoin`]); each `Checkpoint` runs on a thread of its own;
//! a watchdog gives up on ranks that parked for an epoch the coordinator
//! never asked for; a heartbeat says the agent is alive (`heartbeat`).

use std::fs;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryo_core::liveness;
use cryo_core::protocol::{
    read_message, AbortReason, AgentToCoordinator, ControlResponse, CoordinatorToAgent,
};

use crate::capture::Parked;
use crate::epoch::{self, lock, Admission, Coordinated, EpochError, Resume};
use crate::heartbeat;
use crate::link::LinkError;
use crate::ranks::RankConn;
use crate::server::Shared;

/// The first wait before dialing a lost coordinator again; each failed
/// attempt doubles it.
const REJOIN_INTERVAL_MIN: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
const REJOIN_INTERVAL_MAX: Duration = Duration::from_secs(5);

impl Shared {
    /// Reads the coordinator's requests until it says `Shutdown`. When the
    /// link drops, the agent dials again until it is back or the agent
    /// ends ([`Shared::rejoin`]).
    pub(crate) fn serve_coordinator(self: Arc<Self>, reader: TcpStream) {
        self.start_heartbeat();
        let mut reader = reader;
        loop {
            if !Arc::clone(&self).serve_link(&reader) {
                return;
            }
            match self.rejoin() {
                Some(again) => reader = again,
                None => return,
            }
        }
    }

    /// Says the agent is alive on its link, on a thread of its own
    /// (`heartbeat`), for as long as the agent serves.
    fn start_heartbeat(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let interval = liveness::heartbeat_interval(liveness::link_timeout());
        let spawned = std::thread::Builder::new()
            .name("cryo-heartbeat".into())
            .spawn(move || {
                heartbeat::beat(
                    &weak,
                    |shared: &Shared| shared.link.as_ref(),
                    |shared| shared.shutdown.load(Ordering::Acquire),
                    interval,
                );
            });
        if let Err(err) = spawned {
            // The coordinator will count this agent lost when it is idle.
            tracing::error!(job = %self.config.job, node = %self.config.node, error = %err, "heartbeat.not_started");
        }
    }

    /// Reads one connection's requests: `true` when it was lost, `false`
    /// after `Shutdown`.
    fn serve_link(self: Arc<Self>, reader: &TcpStream) -> bool {
        let Some(link) = self.link.as_ref() else {
            return false;
        };
        let (job, node) = (&self.config.job, &self.config.node);
        loop {
            let msg = match read_message::<CoordinatorToAgent>(&mut &*reader) {
                Ok(msg) => msg,
                Err(err) => {
                    let why = if err.is_disconnect() {
                        "the connection was closed".to_owned()
                    } else {
                        err.to_string()
                    };
                    self.coordinator_lost(&why);
                    return true;
                }
            };
            match msg {
                CoordinatorToAgent::Checkpoint {
                    epoch,
                    park_timeout_ms,
                }
                | CoordinatorToAgent::FinalCheckpoint {
                    epoch,
                    park_timeout_ms,
                } => {
                    let resume = if matches!(msg, CoordinatorToAgent::FinalCheckpoint { .. }) {
                        self.final_epoch.store(epoch, Ordering::Release);
                        Resume::WhenDurable
                    } else {
                        Resume::AfterCopy
                    };
                    let shared = Arc::clone(&self);
                    let park_timeout = Duration::from_millis(park_timeout_ms.max(1));
                    let spawned = std::thread::Builder::new()
                        .name(format!("cryo-epoch-{epoch}"))
                        .spawn(move || shared.coordinated_checkpoint(epoch, park_timeout, resume));
                    if let Err(err) = spawned {
                        link.send(&AgentToCoordinator::Failed {
                            epoch,
                            reason: EpochError::Spawn(err).reason().on_node(node),
                        });
                    }
                }
                CoordinatorToAgent::Abort { epoch, reason } => {
                    self.coordinator_abort(epoch, AbortReason::Coordinator(Box::new(reason)));
                }
                CoordinatorToAgent::Committed { epoch } => {
                    lock(&self.slot).committed(epoch);
                    tracing::info!(job = %job, node = %node, epoch, "epoch.committed");
                    if self.final_epoch.load(Ordering::Acquire) == epoch {
                        self.tell_held(epoch);
                    }
                }
                CoordinatorToAgent::ArmRestart { epoch } => match self.arm_restart(Some(epoch)) {
                    ControlResponse::RestartArmed { .. } => {}
                    ControlResponse::Refused { reason } => {
                        tracing::error!(job = %job, node = %node, epoch, reason = %reason, "restart.refused");
                    }
                    other => {
                        tracing::error!(job = %job, node = %node, epoch, answer = ?other, "restart.refused");
                    }
                },
                CoordinatorToAgent::Shutdown => {
                    self.begin_shutdown();
                    return false;
                }
                other @ (CoordinatorToAgent::Welcome { .. }
                | CoordinatorToAgent::Refused { .. }) => {
                    tracing::warn!(job = %job, node = %node, coordinator = %link.addr(), message = ?other, "coordinator.unexpected");
                }
            }
        }
    }

    /// The checkpoint before the stop is committed: tells each rank held
    /// parked for it, so that a `SIGTERM` may end it (it had taken one as
    /// a request for this checkpoint).
    fn tell_held(&self, epoch: u64) {
        for conn in self.rank_conns() {
            if let Err(err) = conn.tell_held(epoch) {
                tracing::debug!(job = %self.config.job, node = %self.config.node, rank = conn.rank, epoch, error = %err, "rank.held_unsent");
            }
        }
    }

    /// Runs `Checkpoint { epoch }` (or `FinalCheckpoint`, with `resume`
    /// saying so) from the coordinator: capture every local rank and make
    /// its part durable, reporting per rank; no commit.
    fn coordinated_checkpoint(self: Arc<Self>, epoch: u64, park_timeout: Duration, resume: Resume) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let (job, node) = (&self.config.job, &self.config.node);
        let fail = |reason: AbortReason| {
            tracing::error!(job = %job, node = %node, epoch, reason = %reason, "checkpoint.failed");
            link.send(&AgentToCoordinator::Failed {
                epoch,
                reason: reason.on_node(node),
            });
        };
        let run = {
            let mut slot = lock(&self.slot);
            // An epoch still draining (say, one just aborted) gets the park
            // timeout to finish.
            let give_up = Instant::now() + park_timeout.max(Duration::from_secs(1));
            loop {
                if !link.is_connected() || self.shutdown.load(Ordering::Acquire) {
                    tracing::warn!(job = %job, node = %node, epoch, "checkpoint.skipped_unlinked");
                    return;
                }
                match slot.admit(epoch) {
                    Admission::Go => break,
                    Admission::Duplicate => {
                        tracing::warn!(job = %job, node = %node, epoch, "checkpoint.duplicate");
                        return;
                    }
                    Admission::Aborted => {
                        tracing::info!(job = %job, node = %node, epoch, "checkpoint.skipped_aborted");
                        return;
                    }
                    Admission::NotNewer { newest } => {
                        drop(slot);
                        return fail(AbortReason::NotNewer { epoch, newest });
                    }
                    Admission::Busy(busy) => {
                        let now = Instant::now();
                        if now >= give_up {
                            drop(slot);
                            return fail(AbortReason::Busy { busy });
                        }
                        slot = self
                            .idle
                            .wait_timeout(slot, give_up - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
            let mut run = self.begin_epoch(&mut slot, epoch, park_timeout, true);
            run.resume = resume;
            run
        };
        let sink = Coordinated { link };
        let result = epoch::run(&self.resources(), &self.rank_conns(), &run, &sink);
        let written = run.written();
        let cancelled = self.end_epoch(&run, result.is_ok().then(|| written.clone()));
        match (result, cancelled) {
            (_, Some(reason)) => {
                self.remove_parts(epoch, &written);
                tracing::warn!(job = %job, node = %node, epoch, reason = %reason, "checkpoint.aborted");
            }
            (Ok(report), None) => {
                tracing::info!(
                    job = %job, node = %node, epoch, ranks = report.ranks.len(),
                    "epoch.durable"
                );
            }
            (Err(err), None) => {
                self.remove_parts(epoch, &written);
                // The first rank's failure, not the ones it stopped.
                fail(run.first_failure().unwrap_or_else(|| err.reason()));
            }
        }
    }

    /// `Abort { epoch }` from the coordinator.
    fn coordinator_abort(&self, epoch: u64, reason: AbortReason) {
        let (victims, parts) = {
            let mut slot = lock(&self.slot);
            let parts = slot.abort(epoch, &reason);
            (self.take_early(|e| e <= epoch), parts)
        };
        self.abort_early(victims, &reason);
        self.remove_parts(epoch, &parts);
        tracing::warn!(job = %self.config.job, node = %self.config.node, epoch, reason = %reason, "checkpoint.abort_requested");
    }

    fn abort_early(&self, victims: Vec<(Arc<RankConn>, Parked)>, reason: &AbortReason) {
        for (conn, parked) in victims {
            tracing::info!(
                job = %self.config.job, node = %self.config.node, rank = conn.rank,
                epoch = parked.epoch, reason = %reason, "rank.aborted"
            );
            conn.abort(parked.epoch, reason);
        }
    }

    /// Aborts the coordinated epoch in progress and every early park.
    fn abort_coordinated(&self, reason: &AbortReason) {
        let victims = {
            let mut slot = lock(&self.slot);
            slot.abandon_coordinated(reason);
            self.take_early(|_| true)
        };
        self.abort_early(victims, reason);
    }

    /// The coordinator went away: abort what it asked for, keep serving the
    /// ranks (the job computes on; only the control socket can checkpoint).
    fn coordinator_lost(&self, why: &str) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        link.lost();
        if self.shutdown.load(Ordering::Acquire) {
            return;
        }
        tracing::error!(
            job = %self.config.job,
            node = %self.config.node,
            coordinator = %link.addr(),
            error = %why,
            "coordinator.lost"
        );
        self.abort_coordinated(&AbortReason::CoordinatorLost {
            addr: link.addr().to_string(),
            detail: why.to_owned(),
        });
        // No checkpoint can answer a SIGTERM now.
        for conn in self.rank_conns() {
            conn.tell_unanswered();
        }
        self.early_cv.notify_all();
        self.end_if_orphaned();
    }

    /// Dials the coordinator again after a lost link, at growing intervals
    /// (up to [`REJOIN_INTERVAL_MAX`]), until it answers or the agent ends
    /// (its last rank left, or `Shutdown`). A partition longer than the
    /// link timeout then costs the checkpoints taken during it, not every
    /// later one. Returns the new link's reading half; `None` when the
    /// agent ends or the coordinator turns it away.
    fn rejoin(&self) -> Option<TcpStream> {
        let link = self.link.as_ref()?;
        let (job, node) = (&self.config.job, &self.config.node);
        let lost_at = Instant::now();
        let mut interval = REJOIN_INTERVAL_MIN;
        loop {
            let next = Instant::now() + interval;
            while Instant::now() < next {
                if self.shutdown.load(Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            match link.rejoin() {
                Ok(reader) => {
                    tracing::info!(job = %job, node = %node, coordinator = %link.addr(), after_ms = lost_at.elapsed().as_millis(), "coordinator.rejoined");
                    return Some(reader);
                }
                Err(
                    err @ (LinkError::Refused { .. }
                    | LinkError::WrongJob { .. }
                    | LinkError::Unexpected { .. }),
                ) => {
                    tracing::error!(job = %job, node = %node, coordinator = %link.addr(), error = %err, "coordinator.rejoin_refused");
                    return None;
                }
                Err(err) => {
                    tracing::debug!(job = %job, node = %node, coordinator = %link.addr(), error = %err, "coordinator.rejoin_failed");
                    interval = (interval * 2).min(REJOIN_INTERVAL_MAX);
                }
            }
        }
    }

    /// Ends the agent once it has neither a coordinator nor a rank: nothing
    /// can reach it for a checkpoint any more, and left running it would
    /// keep its launcher step (and the job's allocation) from ending.
    pub(crate) fn end_if_orphaned(&self) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        if link.is_connected()
            || self.shutdown.load(Ordering::Acquire)
            || !lock(&self.ranks).is_empty()
        {
            return;
        }
        tracing::warn!(
            job = %self.config.job,
            node = %self.config.node,
            coordinator = %link.addr(),
            "agent.orphaned"
        );
        self.begin_shutdown();
    }

    /// `Shutdown` from the coordinator: abort, stop accepting, let `serve`
    /// return.
    fn begin_shutdown(&self) {
        tracing::info!(job = %self.config.job, node = %self.config.node, "agent.shutdown_requested");
        self.shutdown.store(true, Ordering::Release);
        self.abort_coordinated(&AbortReason::ShuttingDown);
        self.early_cv.notify_all();
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.config.socket);
    }

    /// Gives up on early parks whose `Checkpoint` never came.
    pub(crate) fn watch_early_parks(self: Arc<Self>) {
        let timeout = self.config.park_timeout;
        let mut slot = lock(&self.slot);
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            let Some(newest) = slot.expire_early(now) else {
                let wait = slot.next_give_up().map_or(Duration::from_secs(1), |at| {
                    at.saturating_duration_since(now)
                });
                slot = self
                    .early_cv
                    .wait_timeout(slot, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            };
            let victims = self.take_early(|e| e <= newest);
            drop(slot);
            for (conn, parked) in victims {
                let reason = AbortReason::Unsolicited {
                    epoch: parked.epoch,
                    waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                }
                .on_node(&self.config.node);
                tracing::warn!(
                    job = %self.config.job, node = %self.config.node, rank = conn.rank,
                    epoch = parked.epoch, "checkpoint.unsolicited_timeout"
                );
                conn.abort(parked.epoch, &reason);
            }
            slot = lock(&self.slot);
        }
    }

    /// Removes this agent's parts of `epoch` (never other nodes' parts).
    pub(crate) fn remove_parts(&self, epoch: u64, ranks: &[u32]) {
        for &rank in ranks {
            let path = self.job.part_path(epoch, rank);
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(job = %self.config.job, node = %self.config.node, rank, epoch, path = %path.display(), "part.discarded")
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(job = %self.config.job, node = %self.config.node, rank, epoch, path = %path.display(), error = %err, "part.discard_failed")
                }
            }
        }
    }
}
