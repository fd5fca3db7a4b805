//! The control socket: `cryo-agent checkpoint`, `status` and restart
//! arming, and the standalone epochs it asks for.

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;

use cryo_core::protocol::{
    read_message, write_message_as, AbortReason, AgentStatus, BusyPolicy, CheckpointReport,
    Completion, ControlRequest, ControlResponse,
};

use crate::armed::Armed;
use crate::epoch::{self, lock, EpochError, Standalone};
use crate::procfs::peak_rss_bytes;
use crate::server::Shared;

impl Shared {
    /// Serves a control client that speaks protocol `version`.
    pub(crate) fn serve_control(self: &Arc<Self>, sock: UnixStream, version: u16) {
        let welcome = ControlResponse::Welcome {
            node: self.config.node.clone(),
            job: self.config.job.clone(),
        };
        if write_message_as(&mut &sock, &welcome, version).is_err() {
            return;
        }
        loop {
            let request = match read_message::<ControlRequest>(&mut &sock) {
                Ok(r) => r,
                Err(err) if err.is_disconnect() => return,
                Err(err) => {
                    let refused = ControlResponse::Refused {
                        reason: err.to_string(),
                    };
                    let _ = write_message_as(&mut &sock, &refused, version);
                    return;
                }
            };
            let response = match request {
                ControlRequest::Checkpoint {
                    epoch,
                    if_busy,
                    until,
                    full,
                } => self.checkpoint(epoch, if_busy, until, full),
                ControlRequest::ArmRestart { epoch } => self.arm_restart(epoch),
                ControlRequest::Status => ControlResponse::Status(self.status()),
            };
            if write_message_as(&mut &sock, &response, version).is_err() {
                return;
            }
        }
    }

    fn status(&self) -> AgentStatus {
        let busy = lock(&self.slot).busy();
        AgentStatus {
            job: self.config.job.clone(),
            node: self.config.node.clone(),
            store: self.config.store.to_string_lossy().into_owned(),
            ranks: lock(&self.ranks)
                .values()
                .map(|c| (c.rank, c.pid))
                .collect(),
            busy,
            last_committed: self.job.latest_committed().ok().flatten(),
            armed_restart: lock(&self.armed).as_ref().map(|a| a.epoch),
            copy_budget: self.pool.bytes(),
            copy_budget_warm: self.pool.warm_bytes(),
            peak_rss_bytes: peak_rss_bytes(),
        }
    }

    /// Ranks that register from now on restart from `epoch` (default: the
    /// newest committed one).
    pub(crate) fn arm_restart(&self, epoch: Option<u64>) -> ControlResponse {
        let epoch = match epoch {
            Some(e) => e,
            None => match self.job.latest_committed() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    return ControlResponse::Refused {
                        reason: format!(
                            "job {:?} has no committed epoch to restart from",
                            self.config.job
                        ),
                    }
                }
                Err(err) => {
                    return ControlResponse::Refused {
                        reason: err.to_string(),
                    }
                }
            },
        };
        let manifest = match self.job.load_manifest(epoch) {
            Ok(m) => m,
            Err(err) => {
                return ControlResponse::Refused {
                    reason: err.to_string(),
                }
            }
        };
        let armed = Armed::new(epoch, &manifest);
        let ranks = u32::try_from(armed.pending.len()).unwrap_or(u32::MAX);
        *lock(&self.armed) = Some(armed);
        tracing::info!(job = %self.config.job, epoch, ranks, "restart.armed");
        ControlResponse::RestartArmed { epoch, ranks }
    }

    /// A standalone checkpoint: runs the epoch on its own thread and
    /// answers once every rank has resumed or once it is committed
    /// (`until`).
    fn checkpoint(
        self: &Arc<Self>,
        epoch: Option<u64>,
        if_busy: BusyPolicy,
        until: Completion,
        full: bool,
    ) -> ControlResponse {
        let mut run = {
            let mut slot = lock(&self.slot);
            while let Some(busy) = slot.busy() {
                if if_busy == BusyPolicy::Refuse {
                    return ControlResponse::Busy {
                        epoch: busy,
                        reason: format!(
                            "checkpoint of epoch {busy} is still in progress (capturing or draining to the store); retry when it is committed, or ask to wait"
                        ),
                    };
                }
                slot = self.idle.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
            let latest = match self.job.latest_committed() {
                Ok(latest) => latest.unwrap_or(0),
                Err(err) => {
                    return ControlResponse::Failed {
                        epoch: None,
                        reason: AbortReason::Store {
                            detail: err.to_string(),
                        },
                    }
                }
            };
            let epoch = epoch.unwrap_or(latest.max(slot.last_epoch()) + 1);
            self.begin_epoch(&mut slot, epoch, self.config.park_timeout, false)
        };
        run.full = full;
        let run = Arc::new(run);
        let epoch = run.epoch;
        let (tx, rx) = mpsc::channel::<Result<CheckpointReport, EpochError>>();
        let (shared, thread_run) = (Arc::clone(self), Arc::clone(&run));
        let spawned = std::thread::Builder::new()
            .name(format!("cryo-epoch-{epoch}"))
            .spawn(move || {
                let sink = Standalone {
                    job: &shared.job,
                    ranks: shared.config.ranks,
                    chunk_size: shared.config.chunk_size,
                    tx: tx.clone(),
                };
                let result = epoch::run(
                    &shared.resources(),
                    &shared.rank_conns(),
                    &thread_run,
                    &sink,
                );
                shared.end_epoch(&thread_run, None);
                if let Err(err) = &result {
                    tracing::error!(job = %shared.config.job, node = %shared.config.node, epoch, error = %err, "checkpoint.failed");
                }
                let _ = tx.send(result);
            });
        if let Err(err) = spawned {
            self.end_epoch(&run, None);
            return ControlResponse::Failed {
                epoch: Some(epoch),
                reason: EpochError::Spawn(err).reason(),
            };
        }
        // First message: all ranks resumed (Ok, not committed) or the end.
        let mut last = None;
        while let Ok(msg) = rx.recv() {
            let done = match &msg {
                Ok(report) => report.committed || until == Completion::Resumed,
                Err(_) => true,
            };
            last = Some(msg);
            if done {
                break;
            }
        }
        match last {
            Some(Ok(report)) => ControlResponse::Checkpoint(report),
            Some(Err(err)) => ControlResponse::Failed {
                epoch: Some(epoch),
                reason: err.reason(),
            },
            None => ControlResponse::Failed {
                epoch: Some(epoch),
                reason: AbortReason::Agent {
                    detail: "the checkpoint thread vanished".into(),
                },
            },
        }
    }
}
