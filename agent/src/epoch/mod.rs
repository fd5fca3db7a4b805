//! One checkpoint epoch on this node: who drives it and what it does.
//!
//! [`run`] is the whole epoch: it opens the epoch in the store, raises every
//! local rank's request flag and runs [`rank::capture_one`] for each rank on
//! its own scoped thread (wait for the park, copy, resume, write, make the
//! part durable). What the epoch tells the world goes through an
//! [`EpochSink`]: standalone mode answers its control client and commits;
//! coordinated mode reports `Copied` and `Durable` per rank. The [`Slot`]
//! says which epoch runs and how to cancel it.
//!
//! The server ([`crate::server`]) and the coordinator link
//! ([`crate::coordinated`]) only decide when an epoch starts and how it
//! ends.

mod error;
mod rank;
mod sink;
mod slot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryo_core::format::manifest::WriteStats;
use cryo_core::locality::Filesystem;
use cryo_core::protocol::{AbortReason, CheckpointReport, RankCaptureReport};
use cryo_core::store::writer::WriterConfig;
use cryo_core::store::JobStore;

pub use error::EpochError;
pub(crate) use sink::{Coordinated, EpochSink, Standalone};
pub(crate) use slot::{Admission, Cancel, Slot};

use crate::capture::{nanos, CopyGate, Parked};
use crate::memory::MemoryView;
use crate::pool::BufferPool;
use crate::procfs::{peak_rss_bytes, ProcessAccess};
use crate::ranks::RankConn;
use crate::self_copy::SelfCopy;
use crate::snapshot::SnapshotPolicy;
use crate::warming::expected_copy;

/// Locks a mutex, carrying on past a panicked holder (the data is plain
/// bookkeeping, consistent at every unlock).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an epoch uses of the agent.
pub(crate) struct Resources<'a> {
    pub(crate) job: &'a JobStore,
    pub(crate) job_name: &'a str,
    pub(crate) node: &'a str,
    pub(crate) writer: WriterConfig,
    pub(crate) access: &'a dyn ProcessAccess,
    pub(crate) pool: &'a BufferPool,
    pub(crate) copy_threads: &'a rayon::ThreadPool,
    pub(crate) store_threads: &'a rayon::ThreadPool,
    pub(crate) gate: &'a CopyGate,
    /// When to capture ranks from snapshots (`--snapshot`).
    pub(crate) snapshot: SnapshotPolicy,
    /// Whether parked ranks copy their own memory (`--self-copy`).
    pub(crate) self_copy: SelfCopy,
    /// The store's filesystem (see `CaptureContext::store_fs`).
    pub(crate) store_fs: Option<Filesystem>,
}

/// One epoch to run.
/// When a captured rank runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// As soon as its memory is copied (or cloned): the pause is the copy.
    AfterCopy,
    /// Never: the checkpoint before the job stops, when what the rank
    /// would compute is lost (and its output printed twice: once before
    /// the stop, again by the restart) and the store wants the cores. The
    /// rank counts as resumed once its part is durable, and stays parked
    /// until the job is stopped (or the epoch aborted, which resumes it).
    WhenDurable,
}

pub(crate) struct EpochRun {
    pub(crate) epoch: u64,
    pub(crate) park_timeout: Duration,
    pub(crate) cancel: Arc<Cancel>,
    /// Ranks already parked for this epoch (early parks).
    pub(crate) early: BTreeMap<u32, Parked>,
    /// Copy every chunk, ignoring write tracking.
    pub(crate) full: bool,
    /// When a captured rank runs again.
    pub(crate) resume: Resume,
    /// Ranks whose part this run wrote.
    written: Mutex<Vec<u32>>,
    /// The first rank failure, which (coordinated) stops the others.
    failed: Mutex<Option<AbortReason>>,
}

impl EpochRun {
    pub(crate) fn new(
        epoch: u64,
        park_timeout: Duration,
        cancel: Arc<Cancel>,
        early: BTreeMap<u32, Parked>,
    ) -> EpochRun {
        EpochRun {
            epoch,
            park_timeout,
            cancel,
            early,
            full: false,
            resume: Resume::AfterCopy,
            written: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
        }
    }

    /// The ranks whose parts this run made durable.
    pub(crate) fn written(&self) -> Vec<u32> {
        lock(&self.written).clone()
    }

    /// The first rank failure of this run.
    pub(crate) fn first_failure(&self) -> Option<AbortReason> {
        lock(&self.failed).clone()
    }

    /// One rank failed and the epoch is lost on every node: stop waiting
    /// for the others and abort those parked.
    fn fail(&self, reason: AbortReason) {
        lock(&self.failed).get_or_insert(reason);
        self.cancel.close();
    }

    /// Why the epoch stopped early: the cancel's reason, or the failure
    /// that stopped it.
    fn stop_reason(&self) -> AbortReason {
        self.cancel
            .reason()
            .or_else(|| self.first_failure())
            .unwrap_or(AbortReason::Agent {
                detail: "the epoch stopped for no recorded reason".into(),
            })
    }

    /// The error a rank returns when the epoch stopped under it.
    fn cancelled(&self) -> EpochError {
        EpochError::Cancelled {
            epoch: self.epoch,
            reason: self.stop_reason(),
        }
    }
}

/// Progress shared by the per-rank threads.
struct Progress {
    t0: Instant,
    ranks: usize,
    resumed: AtomicUsize,
    resumed_ns: AtomicU64,
    reports: Mutex<Vec<RankCaptureReport>>,
    /// This epoch's snapshot policy (`auto` turned off when memory is
    /// short).
    snapshot: SnapshotPolicy,
    /// Whether this epoch's ranks copy themselves (off when they
    /// outnumber the cores).
    self_copy: SelfCopy,
}

/// Runs one epoch over `ranks`. Returns the node's report: committed if
/// the sink commits.
pub(crate) fn run(
    res: &Resources<'_>,
    ranks: &[Arc<RankConn>],
    run: &EpochRun,
    sink: &dyn EpochSink,
) -> Result<CheckpointReport, EpochError> {
    let epoch = run.epoch;
    let t0 = Instant::now();
    let (job, node) = (res.job_name, res.node);
    let registered: Vec<u32> = ranks.iter().map(|r| r.rank).collect();
    let world_size = u32::try_from(ranks.len()).unwrap_or(u32::MAX);
    let report = |ranks: Vec<RankCaptureReport>| CheckpointReport {
        job: job.to_owned(),
        node: node.to_owned(),
        epoch,
        committed: false,
        ranks,
        resumed_ns: 0,
        total_ns: nanos(t0),
        stats: WriteStats::default(),
        peak_rss_bytes: peak_rss_bytes(),
        copy_budget: res.pool.bytes(),
    };
    match sink.expected_ranks(world_size) {
        None if ranks.is_empty() => {
            tracing::warn!(job, node, epoch, "checkpoint.no_local_ranks");
            return Ok(report(Vec::new()));
        }
        None => {}
        Some(_) if ranks.is_empty() => return Err(EpochError::NoRanks),
        Some(expected) if expected != registered => {
            return Err(EpochError::RanksMissing {
                registered,
                expected,
            })
        }
        Some(_) => {}
    }
    tracing::info!(job, node, epoch, ranks = world_size, "checkpoint.requested");
    cryo_core::fault::pause_at(cryo_core::fault::Phase::Open, epoch, job);
    // The flags go up first: the ranks head for their safe point while the
    // store opens the epoch (a directory and its fsync, slow on a parallel
    // filesystem, and each wait for the disk a wait for a core on a busy
    // node). If that fails, the caller's end of the epoch withdraws the
    // flags and answers any park that comes.
    let mut queued: BTreeMap<u32, rank::Said> = BTreeMap::new();
    for conn in ranks {
        if let Some(said) = rank::take_queued(conn, epoch) {
            queued.insert(conn.rank, said);
        }
        // A rank already parked for this epoch (or that refused it) must
        // not find the request again once resumed.
        if !run.early.contains_key(&conn.rank) && !queued.contains_key(&conn.rank) {
            conn.page
                .page()
                .checkpoint_requested
                .store(epoch, Ordering::Release);
        }
    }
    cryo_core::fault::pause_at(cryo_core::fault::Phase::Begin, epoch, job);
    let writer = match res.job.begin_epoch(epoch, res.writer) {
        Ok(writer) => writer,
        Err(source) => {
            let err = EpochError::Begin { epoch, source };
            // Parked ranks must not stay blocked.
            for conn in ranks.iter().filter(|c| {
                run.early.contains_key(&c.rank)
                    || matches!(queued.get(&c.rank), Some(rank::Said::Parked(_)))
            }) {
                conn.abort(epoch, &err);
            }
            return Err(err);
        }
    };
    let expected = expected_copy(ranks);
    let snapshot = res.snapshot.for_epoch(expected, &MemoryView::read());
    if snapshot != res.snapshot {
        tracing::info!(
            job,
            node,
            epoch,
            expected,
            "checkpoint.snapshots_off_memory_short"
        );
    }
    // Without snapshots every private byte is copied parked: warm the
    // budget for it now, while the ranks head for their safe point. With
    // them (`auto`), a rank whose copy finds too few warm slots at its park
    // is cloned instead, and the budget warms once the epoch's copies are
    // done (below): warming here took a core from a rank on its way to the
    // target, and in a coupled code every other rank waited there for it.
    if snapshot == SnapshotPolicy::Off {
        warm_for(res.pool, expected);
    }
    let progress = Progress {
        t0,
        ranks: ranks.len(),
        resumed: AtomicUsize::new(0),
        resumed_ns: AtomicU64::new(0),
        reports: Mutex::new(Vec::new()),
        snapshot,
        self_copy: res.self_copy.for_epoch(ranks.len()),
    };
    let deadline = t0 + run.park_timeout;
    // Every rank is counted by the gate before any is captured, so that no
    // rank's chunks are compressed while another is still on its way.
    let holds: Vec<_> = ranks.iter().map(|_| res.gate.hold()).collect();
    let results: Vec<Result<(RankCaptureReport, WriteStats), EpochError>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .zip(holds)
                .map(|(conn, hold)| {
                    let (writer, progress) = (&writer, &progress);
                    let said = queued.remove(&conn.rank);
                    let body = move || {
                        let result = rank::capture_one(
                            res, conn, run, writer, sink, progress, deadline, said, &report, hold,
                        );
                        // A consequence (a rank held at its safe point by one
                        // that never reached its own) stops nothing: the
                        // rank that holds it times out at the same deadline,
                        // here or on another node, and is the reason to
                        // report (the coordinator waits for it).
                        if let Err(err) = &result {
                            if sink.fail_fast() && !err.is_consequence() && !run.cancel.is_set() {
                                run.fail(err.reason());
                            }
                        }
                        result
                    };
                    (conn.rank, scope.spawn(body))
                })
                .collect();
            handles
                .into_iter()
                .map(|(rank, h)| h.join().unwrap_or(Err(EpochError::Panicked { rank })))
                .collect()
        });
    drop(writer);
    if snapshot == SnapshotPolicy::Auto {
        // For the next checkpoint, out of every pause: it then copies its
        // ranks parked, at memory bandwidth, instead of cloning them again
        // (a clone's copies on write cost a code that rewrites its state
        // more than a memcpy into warm memory).
        warm_for(res.pool, expected);
    }
    let mut stats = WriteStats::default();
    let mut reports = Vec::new();
    let mut first: Option<EpochError> = None;
    for result in results {
        match result {
            Ok((report, rank_stats)) => {
                stats.add(&rank_stats);
                reports.push(report);
            }
            Err(err) => {
                tracing::warn!(job, node, epoch, error = %err, "rank.failed");
                // The cause, not a rank that stopped because of it.
                if first
                    .as_ref()
                    .is_none_or(|f| f.is_consequence() && !err.is_consequence())
                {
                    first = Some(err);
                }
            }
        }
    }
    if let Some(err) = first {
        sink.failed(epoch);
        return Err(err);
    }
    reports.sort_by_key(|r| r.rank);
    let committed = sink.finish(epoch, world_size)?;
    let report = CheckpointReport {
        committed: committed.is_some(),
        resumed_ns: progress.resumed_ns.load(Ordering::Acquire),
        total_ns: nanos(t0),
        stats: committed.unwrap_or(stats),
        ..report(reports)
    };
    if report.committed {
        tracing::info!(
            job,
            node,
            epoch,
            total_ms = report.total_ns / 1_000_000,
            new_chunks = report.stats.new_chunks,
            peak_rss = report.peak_rss_bytes,
            "epoch.committed"
        );
    }
    Ok(report)
}

/// Warms as much of the copy budget as a checkpoint is likely to copy
/// while its ranks are parked, on a thread of its own, at the agent's
/// priority (a checkpoint that comes before the idle-time pre-fault would
/// otherwise fault its copy buffers in while the ranks are parked).
fn warm_for(pool: &BufferPool, bytes: u64) {
    if !pool.short_of(bytes) {
        return;
    }
    let pool = pool.clone();
    // A failed spawn only leaves the copy to warm what it takes.
    let _ = std::thread::Builder::new()
        .name("cryo-warm".into())
        .spawn(move || pool.warm_up_to(bytes));
}
