//! The checkpoint path of a rank: taking a pending request at a safe point,
//! gathering what the rank holds beyond its regions, parking until the
//! agent has copied it, and what happens when the agent is lost meanwhile.
//! Only a safe point with a checkpoint pending comes here.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::MutexGuard;
use std::time::Instant;

use cryo_core::dirty::WriteTracker;
use cryo_core::format::manifest::RegionKind;
use cryo_core::format::process_state::PROCESS_STATE_REGION;
use cryo_core::protocol::{
    recv_message_with_fd, write_message_as, AgentToRank, ControlPage, FrameError, ProbeVerdict,
    RankToAgent, RegionInfo,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::CheckpointError;
use crate::held;
use crate::runtime::{lock, Connection, Runtime, SafePoint, FLAG, IDLE, SEEN};

/// The safe point's slow path: a checkpoint is pending.
#[cold]
#[inline(never)]
pub(crate) fn park(requested: u64) -> Result<SafePoint, CheckpointError> {
    if FLAG.load(Ordering::Acquire) == first_ptr() {
        name_unclaimed_regions();
    }
    let requested = past_first_safe_point(requested);
    if requested == 0 {
        return Ok(SafePoint::Continue);
    }
    let guard = lock();
    let Some(runtime) = guard.as_ref() else {
        return Ok(SafePoint::Continue);
    };
    let Some(conn) = runtime.conn.as_ref() else {
        return Ok(SafePoint::Continue);
    };
    let page = conn.page();
    // Clear the request first so that the next safe point does not park
    // again for the same epoch; a newer request overwrites it later.
    let epoch = match page.checkpoint_requested.compare_exchange(
        requested,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(epoch) => epoch,
        Err(0) => return Ok(SafePoint::Continue),
        Err(newer) => {
            page.checkpoint_requested.store(0, Ordering::Release);
            newer
        }
    };
    let result = park_epoch(runtime, conn, epoch, None);
    detach_on_agent_loss(guard, result)
}

/// At a restarted rank's first safe point, where a program has registered
/// its regions, names on stderr each saved one it has not: a region
/// registered only on a fresh start, or later than the checkpoint's, would
/// otherwise leave the program computing on memory that was never filled.
fn name_unclaimed_regions() {
    let guard = lock();
    let Some(runtime) = guard.as_ref() else {
        return;
    };
    for line in runtime.unclaimed_regions() {
        tracing::warn!(job = %runtime.job, rank = runtime.config.rank, region_warning = %line, "restart.region_unclaimed");
        cryo_core::say!(
            "cryo: rank {}: WARNING: at its first safe point, {line} (a later registration restores them then)",
            runtime.config.rank
        );
    }
}

/// How long a rank whose agent closed while it was parked stays parked
/// before it carries on: a job stopped after its checkpoint (a preemption,
/// whose ranks stay parked until they are stopped) is stopped within it,
/// its agent having closed first, and then computes and prints nothing
/// more; a rank whose agent died waits this long once.
const AGENT_LOSS_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A rank whose agent vanished while it was parked carries on without
/// checkpoints rather than failing the application: the epoch is lost (the
/// coordinator aborts it), the job is not.
fn detach_on_agent_loss(
    mut guard: MutexGuard<'_, Option<Runtime>>,
    result: Result<SafePoint, CheckpointError>,
) -> Result<SafePoint, CheckpointError> {
    match result {
        Err(CheckpointError::Agent {
            rank,
            epoch,
            source,
        }) => {
            std::thread::sleep(AGENT_LOSS_GRACE);
            cryo_core::say!(
                "cryo: rank {rank}: lost the node agent during the checkpoint of epoch {epoch} \
                 ({source}), and the job was not stopped; the epoch is abandoned and this rank \
                 continues without checkpoints"
            );
            FLAG.store(
                &IDLE as *const AtomicU64 as *mut AtomicU64,
                Ordering::Release,
            );
            if let Some(runtime) = guard.as_mut() {
                // The control page stays mapped (see `finalize`).
                runtime.conn = None;
            }
            Ok(SafePoint::Aborted(epoch))
        }
        other => other,
    }
}

/// The epoch this rank's agent has requested (0 for none).
pub(crate) fn requested_epoch() -> u64 {
    let flag = FLAG.load(Ordering::Acquire);
    if flag == first_ptr() {
        return first_safe_point();
    }
    // SAFETY: FLAG always points at a live AtomicU64 (see checkpoint_point).
    unsafe { &*flag }.load(Ordering::Acquire)
}

/// What [`FLAG`] points at from `cryo_init` to the rank's first safe
/// point: a word that is never zero, so that the first safe point takes
/// the slow path once, marks the control page's `computing` word (the
/// agent then warms its budget: the rank's start is over) and points the
/// flag at the page's request word, where the fast path finds it from then
/// on. A request made meanwhile waits in that word and is taken at once.
pub(crate) static FIRST: AtomicU64 = AtomicU64::new(u64::MAX);
/// The control page, for the first safe point; set before FLAG points at
/// [`FIRST`].
static PAGE: AtomicPtr<ControlPage> = AtomicPtr::new(std::ptr::null_mut());

fn first_ptr() -> *mut AtomicU64 {
    &FIRST as *const AtomicU64 as *mut AtomicU64
}

/// At `cryo_init`, with the agent's control page mapped (it is never
/// unmapped, so the page stays valid after `page`'s borrow).
pub(crate) fn arm_first_safe_point(page: &ControlPage) {
    PAGE.store(
        page as *const ControlPage as *mut ControlPage,
        Ordering::Release,
    );
    FLAG.store(first_ptr(), Ordering::Release);
}

/// `read` as the safe point read it, unless this is the rank's first safe
/// point, which marks the control page and returns the real request.
fn past_first_safe_point(read: u64) -> u64 {
    if FLAG.load(Ordering::Acquire) == first_ptr() {
        first_safe_point()
    } else {
        read
    }
}

/// Marks the control page and points FLAG at its request word; returns
/// the request.
fn first_safe_point() -> u64 {
    let page = PAGE.load(Ordering::Acquire);
    let next = if page.is_null() {
        &IDLE as *const AtomicU64 as *mut AtomicU64
    } else {
        // SAFETY: set by `arm_first_safe_point` to the control page, which
        // is never unmapped.
        let page = unsafe { &*page };
        page.computing.store(1, Ordering::Release);
        &page.checkpoint_requested as *const AtomicU64 as *mut AtomicU64
    };
    // Not over a finalize or an agent's loss, which point it at IDLE.
    let _ = FLAG.compare_exchange(first_ptr(), next, Ordering::AcqRel, Ordering::Acquire);
    let flag = FLAG.load(Ordering::Acquire);
    // SAFETY: FLAG always points at a live AtomicU64 (see checkpoint_point).
    unsafe { &*flag }.load(Ordering::Acquire)
}

/// Tells the agent that this rank reached a safe point with `epoch`
/// requested, so that a rank held there by another is not blamed for it.
pub(crate) fn note_seen(epoch: u64) {
    let seen = SEEN.load(Ordering::Relaxed);
    // SAFETY: SEEN always points at a live AtomicU64: a static, or the
    // control page's word (the page is never unmapped).
    let seen = unsafe { &*seen };
    if epoch != 0 && seen.load(Ordering::Relaxed) != epoch {
        seen.store(epoch, Ordering::Release);
    }
}

/// Looks for messages in flight while the rank is parked (MPI mode): the
/// rest of the window the agreement began, so that it overlaps the agent's
/// copy instead of lengthening the pause.
pub(crate) trait LookWhileParked {
    /// When the window ends.
    fn until(&self) -> Instant;
    /// Looks once: why the epoch must be refused, if a message is waiting
    /// (`Err`: the look itself failed, which refuses it too).
    fn look(&mut self) -> Result<Option<String>, String>;
    /// The look is over (called once, as soon as it is).
    fn over(&mut self);
}

/// Parks for `epoch`, which all ranks agreed on (MPI mode). The local
/// request may not have been raised yet, or already withdrawn: the rank
/// parks all the same, and its agent answers `Resume` or `Abort`. `late`
/// goes on looking for messages in flight meanwhile.
pub(crate) fn park_decided(
    epoch: u64,
    late: Option<&mut dyn LookWhileParked>,
) -> Result<SafePoint, CheckpointError> {
    let guard = lock();
    let Some((runtime, conn)) = guard
        .as_ref()
        .and_then(|runtime| runtime.conn.as_ref().map(|conn| (runtime, conn)))
    else {
        return Ok(SafePoint::Continue);
    };
    let _ = conn.page().checkpoint_requested.compare_exchange(
        epoch,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    let result = park_epoch(runtime, conn, epoch, late);
    detach_on_agent_loss(guard, result)
}

/// Tells the agent that this rank refuses `epoch` and why (MPI mode: a
/// message was in flight at the agreed safe point).
pub(crate) fn refuse(epoch: u64, reason: String) -> Result<SafePoint, CheckpointError> {
    let guard = lock();
    let Some((runtime, conn)) = guard
        .as_ref()
        .and_then(|runtime| runtime.conn.as_ref().map(|conn| (runtime, conn)))
    else {
        return Ok(SafePoint::Aborted(epoch));
    };
    let rank = runtime.config.rank;
    let _ = conn.page().checkpoint_requested.compare_exchange(
        epoch,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    tracing::warn!(job = %runtime.job, rank, epoch, reason = %reason, "rank.quiesce_refused");
    conn.send(&RankToAgent::Refused { epoch, reason })
        .map_err(|source| CheckpointError::Agent {
            rank,
            epoch,
            source,
        })?;
    Ok(SafePoint::Aborted(epoch))
}

/// Writes out what the application buffers: its `cryo_at_checkpoint`
/// hooks (once per epoch), then stdio's streams and gfortran's units.
pub(crate) fn flush_output(rank: u32, epoch: u64) {
    crate::flush_hooks::run(rank, epoch);
    held::flush_streams();
}

fn park_epoch(
    runtime: &Runtime,
    conn: &Connection,
    epoch: u64,
    late: Option<&mut dyn LookWhileParked>,
) -> Result<SafePoint, CheckpointError> {
    crate::termination::set_parked(true);
    let result = parked_for(runtime, conn, epoch, late);
    crate::termination::set_parked(false);
    result
}

fn parked_for(
    runtime: &Runtime,
    conn: &Connection,
    epoch: u64,
    late: Option<&mut dyn LookWhileParked>,
) -> Result<SafePoint, CheckpointError> {
    let rank = runtime.config.rank;
    let page = conn.page();
    let agent = |source| CheckpointError::Agent {
        rank,
        epoch,
        source,
    };
    // Flushed at the target already (MPI mode); what stdio or Fortran
    // took since, from a hook or another thread, is flushed now (the hooks
    // do not run twice).
    flush_output(rank, epoch);
    let runtime_fds: Vec<RawFd> = [conn.sock.as_raw_fd(), conn.memfd.as_raw_fd()]
        .into_iter()
        .chain(runtime.tracker.as_ref().map(WriteTracker::raw_fd))
        .chain(runtime.placeholders.iter().map(AsRawFd::as_raw_fd))
        .chain(crate::store_fds::open_now())
        .collect();
    let reservation = (runtime.config.region_base, runtime.config.region_reserve);
    // Kept until the agent has copied what it maps.
    let open = held::open_fds();
    let library_fds = runtime.baseline.library_fds(&runtime_fds, &open);
    let caps = held::Caps {
        unlinked: runtime.config.unlinked_cap,
        writable: runtime.config.writable_cap,
    };
    let mut held = match held::gather(
        rank,
        &runtime.baseline,
        [&open, &runtime_fds, &library_fds],
        reservation,
        caps,
        held::store_filesystem(),
    ) {
        Ok(held) => held,
        Err(reason) => {
            tracing::warn!(job = %runtime.job, rank, epoch, reason = %reason, "rank.checkpoint_refused");
            conn.send(&RankToAgent::Refused { epoch, reason })
                .map_err(agent)?;
            return Ok(SafePoint::Aborted(epoch));
        }
    };
    held.warnings.extend(
        (runtime.unclaimed_regions().into_iter())
            .map(|line| format!("{line}, nor in this checkpoint")),
    );
    let (process, lost) = crate::process_state::changes(&runtime.process_base);
    held.warnings.extend(lost);
    if !process.is_empty() {
        match process.encode() {
            Ok(bytes) => held.push_encoded(PROCESS_STATE_REGION, RegionKind::ProcessState, bytes),
            Err(err) => held.warnings.push(format!(
                "what it changed of its process after cryo_init could not be recorded ({err}):                  a restart does not set it again"
            )),
        }
    }
    for warning in &held.warnings {
        tracing::warn!(job = %runtime.job, rank, epoch, warning = %warning, "rank.not_restorable");
    }
    if late.is_some() {
        page.begin_probe(epoch);
    }
    page.parked_epoch.store(epoch, Ordering::Release);
    let regions: Vec<RegionInfo> = runtime
        .regions
        .iter()
        .map(|r| r.info.clone())
        .chain(held.regions.iter().cloned())
        .collect();
    let parked = RankToAgent::Parked {
        epoch,
        regions: regions.clone(),
        library_fds,
        runtime_fds,
        warnings: held.warnings.clone(),
    };
    tracing::debug!(job = %runtime.job, rank, epoch, "rank.parked");
    conn.send(&parked).map_err(agent)?;
    let ids = Ids {
        job: &runtime.job,
        rank,
        epoch,
    };
    let agent_speaks = conn.agent_version;
    await_answer(&conn.sock, agent_speaks, page, ids, &regions, late).map_err(agent)?
}

/// Who is parked, for the log and the errors.
#[derive(Clone, Copy)]
struct Ids<'a> {
    job: &'a str,
    rank: u32,
    epoch: u64,
}

/// Waits, parked, for the agent's answer to `Parked`, taking a snapshot if
/// it asks for one. With `late`, it also looks for messages in flight until
/// the window ends, and stays parked until then even once resumed: a
/// message found refuses the epoch (`Refused` after `Parked`, and the
/// verdict in the control page, which the agent waits for before the
/// rank's part is made durable).
fn await_answer(
    sock: &UnixStream,
    version: u16,
    page: &ControlPage,
    ids: Ids<'_>,
    regions: &[RegionInfo],
    mut late: Option<&mut dyn LookWhileParked>,
) -> Result<Result<SafePoint, CheckpointError>, FrameError> {
    let Ids { job, rank, epoch } = ids;
    let mut answer: Option<SafePoint> = None;
    let mut refused = false;
    loop {
        if let Some(look) = late.as_deref_mut() {
            let found = match look.look() {
                Ok(None) if Instant::now() < look.until() => None,
                Ok(None) => Some(None),
                Ok(Some(reason)) | Err(reason) => Some(Some(reason)),
            };
            match found {
                None => {}
                Some(None) => {
                    page.end_probe(epoch, ProbeVerdict::Clear);
                    look.over();
                    late = None;
                }
                Some(Some(reason)) => {
                    tracing::warn!(job, rank, epoch, reason = %reason, "rank.quiesce_refused");
                    let sent = write_message_as(
                        &mut &*sock,
                        &RankToAgent::Refused { epoch, reason },
                        version,
                    );
                    page.end_probe(epoch, ProbeVerdict::InFlight);
                    look.over();
                    sent?;
                    refused = true;
                    late = None;
                }
            }
        }
        if late.is_none() {
            if let Some(answer) = answer.take() {
                return Ok(Ok(if refused {
                    SafePoint::Aborted(epoch)
                } else {
                    answer
                }));
            }
        } else if answer.is_some() || !readable(sock)? {
            // Still looking: the agent's answer is read between looks,
            // with a sleep, not a yield, between them (see
            // `quiesce::POLL_SLEEP`).
            std::thread::sleep(crate::quiesce::POLL_SLEEP);
            continue;
        }
        // A request to copy comes with the budget's memfd.
        let (message, fd) = recv_message_with_fd::<AgentToRank>(sock)?;
        match message {
            AgentToRank::Resume { epoch: resumed } if resumed == epoch => {
                page.resumed_epoch.store(epoch, Ordering::Release);
                tracing::debug!(job, rank, epoch, "rank.resumed");
                answer = Some(SafePoint::Checkpointed(epoch));
            }
            AgentToRank::Abort {
                epoch: aborted,
                reason,
            } if aborted == epoch => {
                tracing::warn!(job, rank, epoch, reason = %reason, "rank.checkpoint_aborted");
                if let Some(look) = late.take() {
                    // Nothing is left to refuse.
                    page.end_probe(epoch, ProbeVerdict::Clear);
                    look.over();
                }
                answer = Some(SafePoint::Aborted(epoch));
            }
            AgentToRank::Snapshot { epoch: asked } if asked == epoch => {
                let outcome = crate::snapshot::take(sock);
                tracing::debug!(job, rank, epoch, outcome = ?outcome, "rank.snapshot");
                write_message_as(
                    &mut &*sock,
                    &RankToAgent::Snapshot { epoch, outcome },
                    version,
                )?;
            }
            AgentToRank::CopyInto {
                epoch: asked,
                pieces,
                threads,
            } if asked == epoch => {
                let outcome = crate::self_copy::copy(fd, &pieces, threads, regions);
                tracing::debug!(job, rank, epoch, outcome = ?outcome, "rank.self_copy");
                write_message_as(
                    &mut &*sock,
                    &RankToAgent::Copied { epoch, outcome },
                    version,
                )?;
            }
            // Epoch 0: sent while the rank ran, before its first parked
            // copy, and not read by then (see `crate::offers`).
            AgentToRank::FillView { epoch: e, ranges } if e == epoch || e == 0 => {
                tracing::debug!(job, rank, epoch, ranges = ranges.len(), "rank.fill_view");
                crate::self_copy::fill_later(fd, ranges);
            }
            // Held to the stop with a durable part: a SIGTERM may end it.
            AgentToRank::Held { epoch: e } if e == epoch => {
                tracing::debug!(job, rank, epoch, "rank.held_to_the_stop");
                crate::termination::held();
            }
            // The coordinator is out of reach: a SIGTERM ends the rank.
            AgentToRank::Held { epoch: 0 } => crate::termination::unanswered(),
            // An answer about an older epoch, left in the socket: skip it.
            AgentToRank::Resume { epoch: old } | AgentToRank::Abort { epoch: old, .. }
                if old < epoch =>
            {
                tracing::debug!(job, rank, epoch, stale = old, "rank.stale_answer");
            }
            other => {
                return Ok(Err(CheckpointError::Unexpected {
                    rank,
                    epoch,
                    what: format!("{other:?}"),
                }))
            }
        }
    }
}

/// Whether a message waits on `sock`, without blocking.
pub(crate) fn readable(sock: &UnixStream) -> Result<bool, FrameError> {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(errno) => Err(FrameError::Io {
            step: "poll",
            source: std::io::Error::from(errno),
        }),
    }
}

#[cfg(test)]
#[path = "park_tests.rs"]
mod tests;
