//! One rank's part of an epoch: wait for it to park, copy it, resume it,
//! write its chunks and make its part durable.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use cryo_core::fault;
use cryo_core::format::manifest::WriteStats;
use cryo_core::protocol::{
    AgentToRank, CheckpointReport, CopyOutcome, CopyPiece, Departure, ProbeVerdict,
    RankCaptureReport, SnapshotOutcome, FILL_VIEW_VERSION, SELF_COPY_VERSION, SNAPSHOT_VERSION,
};
use cryo_core::store::writer::EpochWriter;

use super::{lock, EpochError, EpochRun, EpochSink, Progress, Resources, Resume};
use crate::capture::{
    capture_rank, nanos, CaptureContext, CaptureError, GateHold, Parked, ParkedRank,
};
use crate::ranks::{RankConn, RankEvent, OFFERS_DONE};
use crate::self_copy::{answer_within, slots_to_fill, SelfCopyRefusal};
use crate::snapshot::SnapshotPolicy;
use crate::tracking::Baseline;

/// How often a wait checks whether the epoch was cancelled.
const POLL: Duration = Duration::from_millis(20);

/// How long a parked rank has to answer a request for a snapshot (a clone
/// copies the page tables: milliseconds per GiB).
const SNAPSHOT_ANSWER: Duration = Duration::from_secs(10);

/// How long a parked MPI rank has to give its verdict on messages in
/// flight: its window is milliseconds, but a rank may be descheduled.
const VERDICT_WAIT: Duration = Duration::from_secs(30);

/// How long a verdict that found a message waits for the rank's text.
const REFUSAL_TEXT_WAIT: Duration = Duration::from_secs(1);

/// How often the wait for a verdict reads the control page.
const VERDICT_POLL: Duration = Duration::from_micros(500);

/// How long a rank that took the request after the park deadline has to
/// finish parking.
const LATE_PARK_GRACE: Duration = Duration::from_secs(10);

/// What a rank already said about `epoch` before the epoch's run began:
/// the agent opened the epoch to parks a moment before, and a rank of an
/// MPI job may park (or refuse) as soon as the ranks agree.
pub(super) enum Said {
    Parked(Parked),
    Refused(String),
    Left(Departure),
}

/// Clears what is queued from `conn` before the run: parks left over from
/// an abandoned epoch are answered (so their ranks are not left blocked and
/// cannot satisfy this one), while a park or refusal for `epoch` itself is
/// kept for the run.
pub(super) fn take_queued(conn: &RankConn, epoch: u64) -> Option<Said> {
    let mut said = None;
    while let Ok(event) = lock(&conn.events).try_recv() {
        match event {
            RankEvent::Parked(parked) if parked.epoch == epoch => {
                said = Some(Said::Parked(parked));
            }
            RankEvent::Parked(Parked { epoch: stale, .. }) => {
                conn.abort(stale, &format!("epoch {stale} was abandoned"));
            }
            RankEvent::Refused { epoch: e, reason } if e == epoch => {
                said = Some(Said::Refused(reason));
            }
            RankEvent::Refused { .. } => {}
            RankEvent::Snapshot { .. } | RankEvent::Copied { .. } => answer_stale(conn, event),
            RankEvent::Gone(how) => said = Some(Said::Left(how)),
        }
    }
    said
}

/// Captures one rank for `run`: the body of its thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn capture_one(
    res: &Resources<'_>,
    conn: &RankConn,
    run: &EpochRun,
    writer: &EpochWriter,
    sink: &dyn EpochSink,
    progress: &Progress,
    deadline: Instant,
    queued: Option<Said>,
    unfinished: &dyn Fn(Vec<RankCaptureReport>) -> CheckpointReport,
    hold: GateHold<'_>,
) -> Result<(RankCaptureReport, WriteStats), EpochError> {
    let (epoch, rank) = (run.epoch, conn.rank);
    let (job, node) = (res.job_name, res.node);
    let parked = match (run.early.get(&rank), queued) {
        (Some(parked), _) => parked.clone(),
        (None, Some(Said::Parked(parked))) => parked,
        (None, Some(Said::Refused(detail))) => {
            return Err(EpochError::Refused {
                rank,
                pid: conn.pid,
                detail,
            })
        }
        (None, Some(Said::Left(how))) => {
            return Err(EpochError::Left {
                rank,
                pid: conn.pid,
                how,
            })
        }
        (None, None) => wait_parked(conn, run, deadline)?,
    };
    tracing::info!(job, node, rank, epoch, "rank.quiesced");
    fault::pause_at(fault::Phase::Quiesce, epoch, job);
    let rank_writer = writer.rank(rank);
    let mut did_resume = false;
    // Held until durable: the resume waits for it.
    let mut held = false;
    let send_resume = |report: &RankCaptureReport| {
        fault::pause_at(fault::Phase::Copy, epoch, job);
        if run.cancel.is_set() {
            return Err(run.stop_reason().to_string());
        }
        // A rank held until durable is about to stop: nothing to prepare.
        if conn.version >= FILL_VIEW_VERSION && matches!(run.resume, Resume::AfterCopy) {
            let fill = slots_to_fill(
                res.pool,
                progress.self_copy,
                progress.ranks,
                rank,
                &parked.regions,
            );
            if let Some(ranges) = fill {
                let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                // Lost, the rank only fills them in its next copy.
                match conn.send_with_fd(&AgentToRank::FillView { epoch, ranges }, res.pool.memfd())
                {
                    Ok(()) => tracing::info!(job, node, rank, epoch, bytes, "rank.fill_view"),
                    Err(error) => {
                        tracing::debug!(job, node, rank, epoch, error = %error, "rank.fill_view_unsent")
                    }
                }
            }
        }
        match run.resume {
            Resume::AfterCopy => {
                conn.send(&AgentToRank::Resume { epoch })?;
                conn.page
                    .page()
                    .resumed_epoch
                    .store(epoch, Ordering::Release);
            }
            // The job stops from this checkpoint: a rank that computed on
            // until its launcher stopped it would print (and send) what
            // its restart prints again. Its part is durable; it stays
            // parked, and the coordinator stops the job.
            Resume::WhenDurable => tracing::info!(job, node, rank, epoch, "rank.held_to_the_stop"),
        }
        conn.offered_slots.store(OFFERS_DONE, Ordering::Release);
        tracing::info!(
            job,
            node,
            rank,
            epoch,
            pause_us = report.pause_ns / 1000,
            copy_us = report.copy_ns / 1000,
            bytes = report.bytes,
            streamed = report.streamed,
            "rank.resumed"
        );
        sink.copied(epoch, report);
        lock(&progress.reports).push(report.clone());
        if progress.resumed.fetch_add(1, Ordering::AcqRel) + 1 == progress.ranks {
            let resumed_ns = nanos(progress.t0);
            progress.resumed_ns.store(resumed_ns, Ordering::Release);
            let mut reports = lock(&progress.reports).clone();
            reports.sort_by_key(|r| r.rank);
            sink.all_resumed(CheckpointReport {
                resumed_ns,
                ..unfinished(reports)
            });
        }
        Ok(())
    };
    let resume = |report: &RankCaptureReport| match run.resume {
        Resume::AfterCopy => send_resume(report),
        Resume::WhenDurable => {
            held = true;
            Ok(())
        }
    };
    let ctx = CaptureContext {
        access: res.access,
        pool: res.pool,
        copy_threads: res.copy_threads,
        store_threads: res.store_threads,
        gate: res.gate,
        job,
        node,
        cancelled: run.cancel.flag(),
        // A rank that stays parked has nothing to gain from a clone.
        snapshot: match run.resume {
            Resume::AfterCopy => progress.snapshot,
            Resume::WhenDurable => SnapshotPolicy::Off,
        },
        self_copy: progress.self_copy,
        // The node's ranks copy at once, so each gets its share of the
        // cores the agent would copy with.
        self_copy_threads: u32::try_from(
            (res.copy_threads.current_num_threads() / progress.ranks.max(1)).max(1),
        )
        .unwrap_or(1),
        store_fs: res.store_fs,
    };
    let mut control = Control {
        conn,
        epoch,
        resume,
        resumed: &mut did_resume,
        refused: None,
    };
    // A failed capture loses its write-tracking scan, so the baseline is
    // put back only once this part is durable.
    let baseline = lock(&conn.baseline).take().filter(|_| !run.full);
    let captured = {
        let mut heat = lock(&conn.heat);
        capture_rank(
            &ctx,
            &rank_writer,
            &parked,
            baseline.as_ref(),
            &mut heat,
            &mut control,
            hold,
        )
    };
    let refused = control.refused.take();
    drop(control);
    let (mut report, record, inputs) = match captured {
        Ok(captured) => (captured.report, captured.record, captured.inputs),
        Err(err) => {
            if !did_resume || held {
                tracing::info!(job, node, rank, epoch, "rank.aborted");
                conn.abort(epoch, &err);
            }
            return Err(match err {
                CaptureError::Resume { .. } | CaptureError::Aborted { .. }
                    if run.cancel.is_set() =>
                {
                    run.cancelled()
                }
                err => err.into(),
            });
        }
    };
    let durable = || -> Result<WriteStats, EpochError> {
        fault::pause_at(fault::Phase::Drain, epoch, job);
        if run.cancel.is_set() {
            return Err(run.cancelled());
        }
        // An MPI rank goes on looking for messages in flight while parked:
        // its part is made durable only once it found none.
        await_verdict(conn, run, refused)?;
        let regions = record.regions.clone();
        let stats = rank_writer.finish(record)?;
        *lock(&conn.baseline) = Some(Baseline { regions, inputs });
        lock(&run.written).push(rank);
        tracing::info!(
            job,
            node,
            rank,
            epoch,
            new_chunks = stats.new_chunks,
            "rank.durable"
        );
        Ok(stats)
    };
    let stats = match durable() {
        Ok(stats) => stats,
        Err(err) => {
            // A rank held until now must not stay parked.
            if held {
                tracing::info!(job, node, rank, epoch, "rank.aborted");
                conn.abort(epoch, &err);
            }
            return Err(err);
        }
    };
    if held {
        report.pause_ns = nanos(parked.since);
        if let Err(reason) = send_resume(&report) {
            conn.abort(epoch, &reason);
            return Err(CaptureError::Resume { rank, reason }.into());
        }
    }
    if run.cancel.is_set() {
        return Err(run.cancelled());
    }
    sink.durable(epoch, rank, &stats);
    Ok((report, stats))
}

/// The parked rank as the capture drives it.
struct Control<'a, F> {
    conn: &'a RankConn,
    epoch: u64,
    resume: F,
    resumed: &'a mut bool,
    /// A refusal the rank sent while the snapshot was awaited (an MPI
    /// rank's look while parked found a message in flight).
    refused: Option<String>,
}

impl<F: FnMut(&RankCaptureReport) -> Result<(), String>> ParkedRank for Control<'_, F> {
    fn snapshot(&mut self) -> Result<u32, String> {
        let (conn, epoch) = (self.conn, self.epoch);
        if conn.version < SNAPSHOT_VERSION {
            return Err(format!(
                "the rank's runtime speaks protocol version {}; snapshots need {SNAPSHOT_VERSION}",
                conn.version
            ));
        }
        conn.send(&AgentToRank::Snapshot { epoch })?;
        let events = lock(&conn.events);
        let deadline = Instant::now() + SNAPSHOT_ANSWER;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(RankEvent::Snapshot { epoch: e, outcome }) if e == epoch => {
                    return match outcome {
                        SnapshotOutcome::Taken { pid } => Ok(pid),
                        SnapshotOutcome::Failed { reason } => Err(reason),
                    }
                }
                Ok(RankEvent::Refused { epoch: e, reason }) if e == epoch => {
                    self.refused = Some(reason);
                }
                Ok(event) => answer_stale(conn, event),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer within {SNAPSHOT_ANSWER:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("the rank left".into()),
            }
        }
    }

    fn copy_into(
        &mut self,
        pool: std::os::fd::BorrowedFd<'_>,
        pieces: Vec<CopyPiece>,
        threads: u32,
    ) -> Result<(), SelfCopyRefusal> {
        let (conn, epoch) = (self.conn, self.epoch);
        if conn.version < SELF_COPY_VERSION {
            return Err(SelfCopyRefusal::Declined(format!(
                "the rank's runtime speaks protocol version {}; copying its own memory needs {SELF_COPY_VERSION}",
                conn.version
            )));
        }
        let bytes = pieces.iter().map(|p| p.len).sum();
        let ask = AgentToRank::CopyInto {
            epoch,
            pieces,
            threads,
        };
        // Not sent: nothing was written, so the agent may still copy.
        conn.send_with_fd(&ask, pool)
            .map_err(SelfCopyRefusal::Declined)?;
        let events = lock(&conn.events);
        let deadline = Instant::now() + answer_within(bytes);
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(RankEvent::Copied { epoch: e, outcome }) if e == epoch => {
                    return match outcome {
                        CopyOutcome::Copied => Ok(()),
                        CopyOutcome::Failed { reason } => Err(SelfCopyRefusal::Declined(reason)),
                    }
                }
                Ok(RankEvent::Refused { epoch: e, reason }) if e == epoch => {
                    self.refused = Some(reason);
                }
                Ok(event) => answer_stale(conn, event),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SelfCopyRefusal::NoAnswer(format!(
                        "no answer within {:?}",
                        answer_within(bytes)
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SelfCopyRefusal::NoAnswer("the rank left".into()))
                }
            }
        }
    }

    fn resume(&mut self, report: &RankCaptureReport) -> Result<(), String> {
        (self.resume)(report)?;
        *self.resumed = true;
        Ok(())
    }
}

/// Answers an event about another epoch that reached a capture: a park is
/// aborted, a snapshot killed.
fn answer_stale(conn: &RankConn, event: RankEvent) {
    match event {
        RankEvent::Parked(Parked { epoch: stale, .. }) => {
            conn.abort(stale, &"stale epoch");
        }
        RankEvent::Snapshot {
            outcome: SnapshotOutcome::Taken { pid },
            ..
        } => crate::snapshot::discard(pid),
        RankEvent::Snapshot { .. }
        | RankEvent::Copied { .. }
        | RankEvent::Refused { .. }
        | RankEvent::Gone(_) => {}
    }
}

/// Waits for a parked MPI rank's verdict on messages in flight for `run`'s
/// epoch, if it said one follows (`ControlPage::begin_probe`). Its window is
/// milliseconds and overlaps the copy, so the verdict is usually there.
/// `refused`: the rank's refusal, if a wait during the capture took it.
fn await_verdict(
    conn: &RankConn,
    run: &EpochRun,
    refused: Option<String>,
) -> Result<(), EpochError> {
    let (epoch, rank, pid) = (run.epoch, conn.rank, conn.pid);
    let page = conn.page.page();
    if !page.probe_pending(epoch) {
        return Ok(());
    }
    if let Some(detail) = refused {
        return Err(EpochError::Refused { rank, pid, detail });
    }
    let events = lock(&conn.events);
    let started = Instant::now();
    let mut found_at = None;
    loop {
        match page.probe_verdict(epoch) {
            Some(ProbeVerdict::Clear) => return Ok(()),
            Some(ProbeVerdict::InFlight) => {
                // The rank sent `Refused` before it wrote the verdict; its
                // text names the message. A reader that lost it (a
                // snapshot's wait skips refusals) gets a plain one.
                let since = *found_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= REFUSAL_TEXT_WAIT {
                    return Err(EpochError::Refused {
                        rank,
                        pid,
                        detail: format!(
                            "rank {rank}: a message was still in flight at the safe point"
                        ),
                    });
                }
            }
            None if started.elapsed() >= VERDICT_WAIT => {
                return Err(EpochError::Refused {
                    rank,
                    pid,
                    detail: format!(
                        "rank {rank} did not finish looking for messages in flight within {} s",
                        VERDICT_WAIT.as_secs()
                    ),
                })
            }
            None => {}
        }
        if run.cancel.is_set() {
            return Err(run.cancelled());
        }
        match events.recv_timeout(VERDICT_POLL) {
            Ok(RankEvent::Refused { epoch: e, reason }) if e == epoch => {
                return Err(EpochError::Refused {
                    rank,
                    pid,
                    detail: reason,
                })
            }
            Ok(RankEvent::Gone(how)) => return Err(EpochError::Left { rank, pid, how }),
            Ok(event) => answer_stale(conn, event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(EpochError::Left {
                    rank,
                    pid,
                    how: Departure::Vanished,
                })
            }
        }
    }
}

/// Waits for `conn` to park for `run`'s epoch, until `deadline`.
fn wait_parked(conn: &RankConn, run: &EpochRun, deadline: Instant) -> Result<Parked, EpochError> {
    let (epoch, rank, pid) = (run.epoch, conn.rank, conn.pid);
    let events = lock(&conn.events);
    let mut deadline = deadline;
    let mut withdrawn = false;
    loop {
        if run.cancel.is_set() {
            // Withdraw the request; a rank that took it parks and gets
            // Abort at once (the epoch is closed to parks).
            conn.withdraw_request(epoch);
            return Err(run.cancelled());
        }
        let wait = deadline.saturating_duration_since(Instant::now()).min(POLL);
        match events.recv_timeout(wait) {
            Ok(RankEvent::Parked(parked)) if parked.epoch == epoch => {
                // With MPI a rank may park for the agreed epoch before its
                // own request was raised: clear the request so that it does
                // not park again for this epoch once resumed.
                conn.withdraw_request(epoch);
                // Parked, possibly just after the deadline: capture it.
                return Ok(parked);
            }
            Ok(RankEvent::Parked(Parked { epoch: stale, .. })) => {
                conn.abort(stale, &"stale epoch");
            }
            Ok(RankEvent::Gone(how)) => return Err(EpochError::Left { rank, pid, how }),
            Ok(RankEvent::Refused { epoch: e, reason }) if e == epoch => {
                return Err(EpochError::Refused {
                    rank,
                    pid,
                    detail: reason,
                })
            }
            Ok(
                event @ (RankEvent::Refused { .. }
                | RankEvent::Snapshot { .. }
                | RankEvent::Copied { .. }),
            ) => answer_stale(conn, event),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(EpochError::Left {
                    rank,
                    pid,
                    how: Departure::Vanished,
                })
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) if withdrawn => {
                return Err(EpochError::NeverParked { rank, pid });
            }
            Err(RecvTimeoutError::Timeout) => {
                // Withdraw the request. If the rank already took it, it is
                // parking right now: wait for it, then abort it.
                let taken = conn
                    .page
                    .page()
                    .checkpoint_requested
                    .swap(0, Ordering::AcqRel)
                    != epoch;
                if !taken {
                    let page = conn.page.page();
                    if page.seen_epoch.load(Ordering::Acquire) == epoch {
                        // At a safe point, held there by a rank that is not.
                        return Err(EpochError::WaitedForOthers {
                            rank,
                            pid,
                            waited: run.park_timeout,
                        });
                    }
                    return Err(EpochError::ParkTimeout {
                        rank,
                        pid,
                        waited: run.park_timeout,
                    });
                }
                withdrawn = true;
                deadline = Instant::now() + LATE_PARK_GRACE;
            }
        }
    }
}
