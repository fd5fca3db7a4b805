//! MPI-aware quiesce: every rank checkpoints at the same safe point, with no
//! message in flight.
//!
//! The agents of different nodes raise their ranks' request flags at
//! slightly different moments, so a rank cannot act on its own flag. Instead
//! the ranks agree, with a non-blocking `MPI_Iallreduce(MAX)` of their flags
//! on a private duplicate of the application's communicator:
//!
//! * safe points are numbered `1, 2, 3, …` on every rank (the application
//!   calls the safe point the same number of times on every rank: an SPMD
//!   loop);
//! * at every round boundary, each rank completes the round started at the
//!   previous boundary (normally it finds it complete; if not, it polls and
//!   yields its core between polls, see [`wait_yielding`]) and then starts
//!   the next round with its current flag;
//! * boundaries are `L` safe points apart. `L` adapts so that a round spans
//!   about [`ROUND_PERIOD`]: each round also carries the rank's time per
//!   safe point (measured up to its arrival at the boundary, not counting
//!   the wait there), and every rank derives the next `L` from the round's MAX,
//!   which is the same number on every rank, so the boundaries stay the same
//!   indices everywhere. `L` is also at least one more than the safe points
//!   the slowest rank needed to see the previous round complete, so that a
//!   boundary normally finds its round done (see [`next_interval`]). Short iterations then pay the round's cost once per
//!   many safe points; long ones get a round at every safe point. A fixed
//!   `L` can be set with `CRYO_QUIESCE_INTERVAL`;
//! * between those indices a safe point calls `MPI_Test` to drive the
//!   round until this rank sees it complete, and then nothing (at 2 ranks a
//!   round completes within about three safe points of fifty);
//! * a round's result is acted on only at the index where it is completed,
//!   which is the same on every rank, so if any rank's flag was raised, every
//!   rank learns it at the same safe-point index. They then enter a barrier
//!   and park.
//!
//! **Why no message is in flight.** All ranks are inside the same safe point
//! (the barrier proves it), and the application promises that its state is
//! consistent there: every message it sent before the safe point was received
//! before it. The runtime checks what it can see: after the barrier each
//! rank probes the application's communicator (`MPI_Iprobe`, any source, any
//! tag); a message waiting there was sent before the safe point and not yet
//! received. The ranks agree on the result (`MPI_Allreduce`), and if any rank
//! saw one, every rank refuses the checkpoint, naming the sender and tag, and
//! carries on. The runtime's own rounds never cross a checkpoint: the round
//! that decided it is complete, and no new round starts until all have
//! resumed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mpi::ffi;
use mpi::topology::Communicator;

use crate::error::{CheckpointError, InitError};
use crate::runtime::{self, InitInfo, SafePoint};

/// Environment variable: safe points between agreement rounds, fixed
/// (default: adaptive, see [`ROUND_PERIOD`]).
pub const ENV_QUIESCE_INTERVAL: &str = "CRYO_QUIESCE_INTERVAL";

/// The time an adaptive round aims to span: it bounds what the agreement
/// adds to the quiesce latency, while its cost is spread over the safe
/// points inside it. A round costs about 20 µs of a rank's time here
/// (MPICH over UCX, 2 ranks), so rounds 50 ms apart cost 0.04%.
pub const ROUND_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest adaptive interval, in safe points.
const MAX_INTERVAL: u64 = 1024;

/// The next adaptive interval, from the slowest rank's time per safe point
/// and the completion floor (every rank computes both from the same
/// allreduced numbers). The floor may stretch a round to at most twice the
/// period: with iterations that long, a wait at the boundary costs little
/// next to them, and the quiesce latency stays bounded.
pub fn next_interval(slowest_ns_per_safe_point: u64, completion_floor: u64) -> u64 {
    let period = u64::try_from(ROUND_PERIOD.as_nanos()).unwrap_or(u64::MAX);
    let per_safe_point = slowest_ns_per_safe_point.max(1);
    let by_time = period / per_safe_point;
    let floor_cap = (period.saturating_mul(2) / per_safe_point).max(1);
    by_time
        .max(completion_floor.min(floor_cap))
        .clamp(1, MAX_INTERVAL)
}

/// The fewest safe points an interval may have, from the previous floor and
/// the most safe points any rank needed to see the last round complete.
///
/// A round completes only as fast as the ranks drive it, one `MPI_Test` per
/// safe point, and MPICH's `MPI_Iallreduce` takes several such steps (three
/// at 2 ranks here, up to eleven with 8 ranks on 2 cores, where each step
/// also waits for peers to be scheduled). An interval shorter than that makes
/// every boundary wait, so the floor leaves half as much again, and falls by
/// only an eighth per round, since the need varies from round to round.
pub fn next_completion_floor(previous: u64, most_safe_points_needed: u64) -> u64 {
    let needed = most_safe_points_needed.min(MAX_INTERVAL);
    (needed + needed / 2 + 1)
        .max(previous - previous / 8)
        .min(MAX_INTERVAL)
}

/// Set once `init_mpi` has attached a communicator.
pub(crate) static MPI_MODE: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<Quiesce>> = Mutex::new(None);

struct Round {
    request: ffi::MPI_Request,
    // Boxed so their addresses stay fixed while MPI owns them: [requested
    // epoch, ns per safe point over the previous round, safe points the
    // previous round needed to complete on this rank].
    send: Box<[u64; 3]>,
    recv: Box<[u64; 3]>,
    /// Safe points since the round started.
    safe_points: u64,
    /// The safe point at which this rank first saw the round complete.
    completed_at: Option<u64>,
}

impl Round {
    /// Drives the round (one `MPI_Test`) and notes when it completed.
    fn test(&mut self) -> Result<(), String> {
        self.safe_points += 1;
        if self.completed_at.is_some() {
            // Nothing left to drive: MPI would only poll its progress engine.
            return Ok(());
        }
        let mut done = 0;
        // SAFETY: the request is live (owned by this round) and `done` is a
        // valid out-parameter.
        let code = unsafe { ffi::MPI_Test(&mut self.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
        mpi_check(code, "MPI_Test")?;
        if done != 0 && self.completed_at.is_none() {
            self.completed_at = Some(self.safe_points);
        }
        Ok(())
    }
}

struct Quiesce {
    /// Private duplicate: our rounds never match the application's messages.
    comm: ffi::MPI_Comm,
    /// The application's communicator, probed for messages in flight.
    app_comm: ffi::MPI_Comm,
    rank: i32,
    /// Safe points to the next boundary.
    interval: u64,
    /// `CRYO_QUIESCE_INTERVAL` was given: never adapt.
    fixed: bool,
    counter: u64,
    next_boundary: u64,
    /// When the current round started, for the next round's timing.
    round_started: Option<std::time::Instant>,
    /// Safe points the last completed round needed on this rank.
    last_needed: u64,
    /// See [`next_completion_floor`].
    completion_floor: u64,
    stats: RoundStats,
    round: Option<Round>,
}

/// What the rounds cost this rank, logged when it detaches.
#[derive(Debug, Default)]
struct RoundStats {
    rounds: u64,
    /// Boundaries whose round was not complete on arrival.
    boundary_waits: u64,
    boundary_wait: std::time::Duration,
}

// SAFETY: MPI handles are plain integers in MPICH; they are only used by the
// thread that calls the safe point, one call at a time (the Mutex).
unsafe impl Send for Quiesce {}

fn mpi_check(code: std::os::raw::c_int, call: &'static str) -> Result<(), String> {
    if i64::from(code) == i64::from(ffi::MPI_SUCCESS) {
        Ok(())
    } else {
        Err(format!("{call} failed with MPI error {code}"))
    }
}

/// Initialises the runtime for an MPI rank whose application owns
/// `MPI_Init`: registers with the agent (see [`runtime::init`]) and attaches
/// the quiesce protocol to a duplicate of `comm`.
pub fn init_mpi<C: Communicator>(comm: &C) -> Result<InitInfo, InitError> {
    // SAFETY: `comm` is a live communicator owned by the caller.
    unsafe { init_mpi_raw(comm.as_raw()) }
}

/// [`init_mpi`] from a raw communicator handle (the C API).
///
/// # Safety
/// `comm` must be a valid communicator of an initialised MPI library, used
/// by this thread.
pub unsafe fn init_mpi_raw(comm: ffi::MPI_Comm) -> Result<InitInfo, InitError> {
    let mut initialised = 0;
    // SAFETY: MPI_Initialized may be called at any time.
    unsafe { ffi::MPI_Initialized(&mut initialised) };
    if initialised == 0 {
        return Err(InitError::Mpi(
            "MPI is not initialised: call MPI_Init before cryo_init_mpi".into(),
        ));
    }
    let fixed = match std::env::var(ENV_QUIESCE_INTERVAL) {
        Ok(text) if text.trim() == "auto" => None,
        Ok(text) => Some(
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| InitError::BadEnv {
                    var: ENV_QUIESCE_INTERVAL,
                    value: text.clone(),
                    why: "not a positive number of safe points, nor `auto`".into(),
                })?,
        ),
        Err(_) => None,
    };
    let mut dup: ffi::MPI_Comm = comm;
    let mut rank = 0;
    // SAFETY: `comm` is valid per the contract; `dup` and `rank` are
    // out-parameters that live across the calls.
    unsafe {
        mpi_check(ffi::MPI_Comm_dup(comm, &mut dup), "MPI_Comm_dup").map_err(InitError::Mpi)?;
        mpi_check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank").map_err(InitError::Mpi)?;
    }
    let info = runtime::init()?;
    if i64::from(rank) != i64::from(info.rank) {
        return Err(InitError::Mpi(format!(
            "the agent registered this process as rank {}, but it is rank {rank} of the communicator",
            info.rank
        )));
    }
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Quiesce {
        comm: dup,
        app_comm: comm,
        rank,
        interval: fixed.unwrap_or(1),
        fixed: fixed.is_some(),
        counter: 0,
        next_boundary: fixed.unwrap_or(1),
        round_started: None,
        last_needed: 0,
        completion_floor: 1,
        stats: RoundStats::default(),
        round: None,
    });
    MPI_MODE.store(true, Ordering::Release);
    Ok(info)
}

/// The safe point in MPI mode.
#[cold]
pub(crate) fn mpi_safe_point() -> Result<SafePoint, CheckpointError> {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(q) = guard.as_mut() else {
        return Ok(SafePoint::Continue);
    };
    q.counter += 1;
    let rank = u32::try_from(q.rank).unwrap_or(u32::MAX);
    let mpi_err = |detail: String| CheckpointError::Mpi { rank, detail };
    if q.counter != q.next_boundary {
        if let Some(round) = q.round.as_mut() {
            round.test().map_err(mpi_err)?;
        }
        return Ok(SafePoint::Continue);
    }
    // A round boundary: the same index on every rank. The application's own
    // time per safe point ends here, before any wait for peers: counting the
    // wait would shorten the interval when peers lag, which adds rounds and
    // so more waits. It covers the interval that ends here, not the next.
    let arrived = std::time::Instant::now();
    let per_safe_point = q.round_started.map_or(0, |started| {
        u64::try_from(arrived.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX)
            / q.interval.max(1)
    });
    let decided = match q.round.take() {
        Some(mut round) => {
            round.test().map_err(mpi_err)?;
            q.last_needed = match round.completed_at {
                Some(at) => at,
                None => {
                    wait_yielding(&mut round.request).map_err(mpi_err)?;
                    q.stats.boundary_waits += 1;
                    q.stats.boundary_wait += arrived.elapsed();
                    // It needed more than it had.
                    round.safe_points + 1
                }
            };
            // The same MAXima on every rank, so the same next interval.
            if !q.fixed && round.recv[1] > 0 {
                q.completion_floor = next_completion_floor(q.completion_floor, round.recv[2]);
                q.interval = next_interval(round.recv[1], q.completion_floor);
            }
            round.recv[0]
        }
        None => 0,
    };
    q.next_boundary = q.counter + q.interval;
    if decided != 0 {
        let result = checkpoint(q);
        drop(guard);
        return result.and_then(|outcome| match outcome {
            Outcome::Park => runtime::park_decided(decided),
            Outcome::Refused(reason) => runtime::refuse(decided, reason),
        });
    }
    start_round(q, per_safe_point).map_err(mpi_err)?;
    Ok(SafePoint::Continue)
}

/// Polls before a waiting rank starts giving its core away: a round that
/// is about to complete is taken without a system call.
const SPINS_BEFORE_YIELD: u32 = 64;

/// Completes a round. A round still incomplete at its boundary means that
/// some peer has not reached the boundary yet, and with more ranks than
/// cores that peer may be waiting for this very core: so after a short spin
/// the rank yields between polls instead of spinning in `MPI_Wait`, which
/// would hold the core until the scheduler took it away.
fn wait_yielding(request: &mut ffi::MPI_Request) -> Result<(), String> {
    let mut polls: u32 = 0;
    loop {
        let mut done = 0;
        // SAFETY: the request is live or already MPI_REQUEST_NULL (then
        // MPI_Test reports it complete); `done` is a valid out-parameter.
        let code = unsafe { ffi::MPI_Test(request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
        mpi_check(code, "MPI_Test")?;
        if done != 0 {
            return Ok(());
        }
        polls = polls.saturating_add(1);
        if polls > SPINS_BEFORE_YIELD {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Starts a round carrying this rank's flag, its time per safe point over
/// the interval that just ended (0 for the first round: nothing measured
/// yet) and the safe points its previous round needed.
fn start_round(q: &mut Quiesce, per_safe_point: u64) -> Result<(), String> {
    q.round_started = Some(std::time::Instant::now());
    q.stats.rounds += 1;
    let mut round = Round {
        // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial value.
        request: unsafe { ffi::RSMPI_REQUEST_NULL },
        send: Box::new([runtime::requested_epoch(), per_safe_point, q.last_needed]),
        recv: Box::new([0, 0, 0]),
        safe_points: 0,
        completed_at: None,
    };
    // SAFETY: the buffers are boxed and owned by the round, which outlives
    // the request (it is waited on before being dropped); the communicator
    // is our private duplicate.
    let code = unsafe {
        ffi::MPI_Iallreduce(
            round.send.as_ptr().cast(),
            round.recv.as_mut_ptr().cast(),
            3,
            ffi::RSMPI_UINT64_T,
            ffi::RSMPI_MAX,
            q.comm,
            &mut round.request,
        )
    };
    mpi_check(code, "MPI_Iallreduce")?;
    q.round = Some(round);
    Ok(())
}

enum Outcome {
    Park,
    Refused(String),
}

/// All ranks are at the same safe point and have decided to checkpoint:
/// barrier, then check for messages in flight.
fn checkpoint(q: &mut Quiesce) -> Result<Outcome, CheckpointError> {
    let rank = u32::try_from(q.rank).unwrap_or(u32::MAX);
    let mpi_err = |detail: String| CheckpointError::Mpi { rank, detail };
    // SAFETY: our private communicator; no buffers.
    mpi_check(unsafe { ffi::MPI_Barrier(q.comm) }, "MPI_Barrier").map_err(mpi_err)?;
    let mut pending = 0;
    // SAFETY: a zeroed MPI_Status is a valid out-parameter.
    let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
    // SAFETY: the application's communicator is live; out-parameters valid.
    let code = unsafe {
        ffi::MPI_Iprobe(
            ffi::RSMPI_ANY_SOURCE,
            ffi::RSMPI_ANY_TAG,
            q.app_comm,
            &mut pending,
            &mut status,
        )
    };
    mpi_check(code, "MPI_Iprobe").map_err(mpi_err)?;
    let local: u64 = u64::from(pending != 0);
    let mut any: u64 = 0;
    // SAFETY: stack buffers that live across the blocking call.
    let code = unsafe {
        ffi::MPI_Allreduce(
            (&local as *const u64).cast(),
            (&mut any as *mut u64).cast(),
            1,
            ffi::RSMPI_UINT64_T,
            ffi::RSMPI_MAX,
            q.comm,
        )
    };
    mpi_check(code, "MPI_Allreduce").map_err(mpi_err)?;
    if any == 0 {
        return Ok(Outcome::Park);
    }
    Ok(Outcome::Refused(if pending != 0 {
        format!(
            "rank {rank}: a message from rank {} (tag {}) was still in flight at the safe point; \
             complete all communication before calling the safe point",
            status.MPI_SOURCE, status.MPI_TAG
        )
    } else {
        "another rank had a message in flight at the safe point".to_owned()
    }))
}

/// Completes an outstanding round and frees the private communicator. Call
/// before `MPI_Finalize` (every rank has the same round outstanding).
pub(crate) fn detach() {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut q) = guard.take() {
        tracing::debug!(
            rank = q.rank,
            safe_points = q.counter,
            rounds = q.stats.rounds,
            interval = q.interval,
            boundary_waits = q.stats.boundary_waits,
            boundary_wait_ms = q.stats.boundary_wait.as_secs_f64() * 1e3,
            "quiesce.summary"
        );
        MPI_MODE.store(false, Ordering::Release);
        let mut finalized = 0;
        // SAFETY: may be called at any time.
        unsafe { ffi::MPI_Finalized(&mut finalized) };
        if finalized != 0 {
            return;
        }
        if let Some(mut round) = q.round.take() {
            // SAFETY: live request with boxed buffers still owned here.
            unsafe { ffi::MPI_Wait(&mut round.request, ffi::RSMPI_STATUS_IGNORE) };
        }
        // SAFETY: our own duplicate, no longer used.
        unsafe { ffi::MPI_Comm_free(&mut q.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_spans_about_one_round_period() {
        // 1 ms iterations: a round every 50 safe points.
        assert_eq!(next_interval(1_000_000, 1), 50);
        // Iterations longer than the period: a round at every safe point.
        assert_eq!(next_interval(100_000_000, 0), 1);
        // Very short ones are capped, and nothing divides by zero.
        assert_eq!(next_interval(1_000, 1), MAX_INTERVAL);
        assert_eq!(next_interval(0, 0), MAX_INTERVAL);
    }

    #[test]
    fn the_interval_leaves_a_round_the_safe_points_it_needs() {
        // 10 ms iterations (5 per period), but the slowest rank saw the last
        // round complete only at its fourth safe point: half as much again,
        // plus one.
        let floor = next_completion_floor(1, 4);
        assert_eq!(floor, 7);
        assert_eq!(next_interval(10_000_000, floor), 7);
        // Not past twice the period, however long the iterations.
        assert_eq!(next_interval(40_000_000, floor), 2);
        assert_eq!(next_interval(100_000_000, floor), 1);
        // Short iterations already leave more than enough.
        assert_eq!(next_interval(1_000_000, floor), 50);
        // The floor falls slowly when rounds need less.
        assert_eq!(next_completion_floor(16, 1), 14);
        assert_eq!(next_completion_floor(14, 1), 13);
        // A round that never completes cannot stretch it without bound.
        assert_eq!(next_completion_floor(1, u64::MAX), MAX_INTERVAL);
        assert_eq!(next_interval(1_000, MAX_INTERVAL), MAX_INTERVAL);
    }
}
