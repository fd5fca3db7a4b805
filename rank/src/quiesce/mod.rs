//! MPI-aware quiesce: every rank checkpoints at the same safe point, with no
//! message in flight.
//!
//! The agents of different nodes raise their ranks' request flags at
//! slightly different moments, so a rank cannot act on its own flag alone:
//! the ranks must agree on one safe point. They talk only when a checkpoint
//! is requested. Until then a safe point makes no MPI call and never waits
//! for a peer: any periodic agreement would make the ranks wait, round after
//! round, for the last one to be scheduled, which with more ranks than cores
//! costs far more than the messages.
//!
//! Safe points are numbered `1, 2, 3, …` on every rank (the application
//! calls the safe point the same number of times on every rank: an SPMD
//! loop). A checkpoint takes one **agreement** of three non-blocking
//! allreduces on a private duplicate of the application's communicator,
//! which every rank starts exactly once and in the same order:
//!
//! 1. **join** `MAX[epoch, cap]`: a rank joins when its agent raises its
//!    flag. Its cap is its current index plus [`JOIN_SLACK`] worth of safe
//!    points, at least [`MIN_SLACK`] (one). It does not wait: it keeps
//!    computing and drives the join with one `MPI_Test` per safe point.
//!    The result is the epoch and the **target** (the largest cap, which is
//!    the latest joiner's). A rank that reaches its own cap before the join
//!    has completed waits there for it (yielding its core): the target is
//!    that safe point or a later one, and every other rank is heading
//!    there, so a join that needs more safe points than the slack (ranks
//!    that compute apart, more ranks than cores) costs a short wait at the
//!    cap, never a missed target. So a coupled code parks at the safe point
//!    after the latest join, the first checkpoint included, at any number
//!    of ranks, with nothing measured beforehand.
//! 2. **arrive** `MAX[not at the target]`: a rank starts it when it
//!    reaches the target, and then waits there (yielding its core). A rank
//!    that learns the target only after passing it (it left its cap after
//!    its patience, or its slack was fixed) starts it at once, saying so,
//!    and carries on. Completion with a zero proves every rank is at the
//!    target (the barrier).
//! 3. **check** `SUM[ranks with a message in flight, ranks not at the
//!    target, ranks that rang, ranks leaving]`: each rank at the target
//!    probes the application's communicator once first. Its result is the same
//!    everywhere: park (all at the target, nothing in flight); refuse (a
//!    message in flight: the application broke the safe-point contract; the
//!    ranks that saw one refuse, naming it, and the others compute on); or
//!    join again for the same epoch with four times the slack (a rank
//!    passed the target), up to [`MAX_ATTEMPTS`].
//!
//! Waiting is only ever at the cap or the target, and never unbounded. A
//! peer that passed the target is usually blocked in the application's
//! communication with a rank that waits there, so a rank that has waited
//! for a step longer than the others can take to get there (see
//! [`patience`]) leaves the cap or the target, says so, and finishes the
//! agreement from its next safe points; the ranks then retry. A rank that leaves while waiting for the
//! check has already said it was there: if the check finds every rank at
//! the target, the others park and this rank refuses the epoch, which
//! releases them. So once the arrive found every rank there, a rank waits
//! for the check up to [`GIVE_UP`] (see [`check_patience`]): only a slow
//! network or a descheduled peer delays it then, and a lost packet must
//! cost a TCP retransmission, not the epoch.
//!
//! A rank whose agent is slow, stuck or dead would never join. So a rank
//! whose join has not completed within [`RING_AFTER`] **rings** every other
//! rank (an empty message on a second private communicator), and a rank
//! outside an agreement looks for a ring every [`BELL_PERIOD`] (one
//! `MPI_Test` on a receive it keeps posted) and joins on it as on its own
//! flag. Once begun, an agreement completes with no agent's help as long as
//! every rank keeps calling safe points. The check counts the rings, so each
//! rank receives all those meant for it before the next agreement begins.
//!
//! When a rank leaves its loop (`finalize`) it finishes the agreement in
//! progress, or starts one, with a cap no safe point reaches, so that every
//! rank ends with the same collectives.
//!
//! **Why no message is in flight.** All ranks are inside the same safe point
//! (the arrive step proves it), and the application promises that its state
//! is consistent there: every message it sent before the safe point was
//! received before it. The runtime checks what it can see: a message waiting
//! on the application's communicator (`MPI_Iprobe`, any source, any tag) was
//! sent before the safe point and not yet received. If any rank sees one,
//! the checkpoint is refused: the ranks that saw one refuse it, naming the
//! sender and tag (which aborts the epoch), and every rank carries on.
//!
//! MPI does not promise that such a message is visible the moment the
//! arrive step completes (it may travel another path), so a rank that parks
//! goes on looking for [`PROBE_WINDOW`] while its agent copies it
//! (`LateProbe`, driven by `park::await_answer`), gives its verdict in the
//! control page, and refuses after `Parked` if it found one: the agent then
//! fails the epoch instead of making the rank's part durable. When its look
//! is over it starts the **fence**, one more allreduce on the private
//! communicator, and computes on only once its agent resumed it and the
//! fence completed: no rank sends its next iteration's messages while
//! another still looks. A rank that refused because it left the target
//! while the others parked meets them there at its next safe point, so the
//! wait at the fence is bounded (`FENCE_PATIENCE`). The window thus
//! overlaps the copy instead of adding to the pause.
//!
//! ## Files
//!
//! * `agreement.rs`: the agreement as a state machine (`Quiesce`): when to
//!   join, arrive and check, and what the sums decide (park, refuse, join
//!   again, leave the target, finish for a leaving rank). It calls no MPI:
//!   it drives a small `Collectives` trait.
//! * `collectives.rs`: the `Collectives` trait the machine drives (start
//!   and test an allreduce, probe, ring), and the values that cross it.
//! * `decision.rs`: what the machine asks of the driver after each call,
//!   and what an agreement decides (park, refuse and why, compute on).
//! * `pace.rs`: a rank's pace and what follows from it: the slack of a
//!   join, the looks for a ring, the patience at the cap and the target.
//! * `flavour.rs`: which MPI this build speaks (MPICH's `int` handles or
//!   Open MPI's pointers), and the check of a program's handle size.
//! * `mpi.rs`: the MPI binding, `Collectives` over `mpi::ffi`: the private
//!   communicators, the `MPI_Iallreduce`s, the probe, the ring and its bell.
//! * `mod.rs` (this file): the rank's one `Quiesce` behind a lock, the
//!   safe point's driver (it waits at the target while the machine says so),
//!   `init_mpi` and the final agreement of `finalize`.
//! * `sim.rs` and `tests.rs` (tests only): N simulated ranks sharing
//!   in-memory allreduces, stepped in chosen interleavings, and the
//!   agreement's schedules (a rank past the target, a retry, a ring, a
//!   message in flight, a rank leaving the target or its loop).

mod agreement;
mod collectives;
mod decision;
mod flavour;
mod mpi;
mod pace;
#[cfg(test)]
mod pace_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ::mpi::ffi;
use ::mpi::topology::Communicator;

use self::agreement::{CallError, Collectives, Decision, Progress, Quiesce};
use self::decision::Refusal;
use self::mpi::Mpi;
use crate::error::{CheckpointError, InitError};
use crate::park::LookWhileParked;
use crate::runtime::{self, InitInfo, SafePoint};

pub use self::agreement::{MAX_ATTEMPTS, RING_AFTER};
pub use self::flavour::{MpiFlavour, HANDLE_BYTES};
pub use self::mpi::PROBE_WINDOW;
use self::pace::MAX_SLACK;
pub use self::pace::{
    check_patience, patience, BELL_PERIOD, GIVE_UP, JOIN_SLACK, MIN_PATIENCE, MIN_SLACK,
};

/// Environment variable: safe points of slack, fixed (default `auto`: see
/// [`JOIN_SLACK`]). `0` makes every agreement miss and refuse, which is
/// only useful to test that path.
pub use cryo_core::env::ENV_QUIESCE_SLACK;

/// Polls before a waiting rank starts giving its core away: a collective
/// that is about to complete is taken without a system call.
const SPINS_BEFORE_SLEEP: u32 = 64;

/// How long a waiting rank sleeps between later polls. It sleeps rather
/// than yields: under the kernel's EEVDF scheduler (Linux 6.6 and later)
/// each `sched_yield` pushes the thread's deadline a slice later, so a rank
/// that had yielded its way through a wait then lost its core, for tens of
/// milliseconds, to every other runnable thread (its agent's compression
/// among them) once it had work again: in a 2-rank job, one safe point in
/// ten that parked lasted 22 ms or more instead of about 3.
pub(crate) const POLL_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);

/// Set once `init_mpi` has attached a communicator.
pub(crate) static MPI_MODE: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<Quiesce<Mpi>>> = Mutex::new(None);

/// Initialises the runtime for an MPI rank whose application owns
/// `MPI_Init`: registers with the agent (see [`runtime::init`]) and attaches
/// the quiesce protocol to duplicates of `comm`.
pub fn init_mpi<C: Communicator>(comm: &C) -> Result<InitInfo, InitError> {
    // SAFETY: `comm` is a live communicator owned by the caller.
    unsafe { init_mpi_raw(comm.as_raw()) }
}

/// [`init_mpi_raw`] from the address of a communicator handle and its size
/// (`sizeof(MPI_Comm)`) in the caller's MPI: a program or binding built
/// for another MPI than this runtime gets [`InitError::WrongMpi`] before
/// its handle is read (the C API, the Python package).
///
/// # Safety
/// `comm` must point to `comm_bytes` readable bytes; when `comm_bytes` is
/// this build's handle size, they must hold a valid communicator of an
/// initialised MPI library, used by this thread.
pub unsafe fn init_mpi_handle(
    comm: *const std::ffi::c_void,
    comm_bytes: usize,
) -> Result<InitInfo, InitError> {
    MpiFlavour::check(comm_bytes)?;
    if comm.is_null() {
        return Err(InitError::Mpi("the communicator's address is NULL".into()));
    }
    // SAFETY: non-null, `comm_bytes` (= the size of a handle) readable bytes
    // per the contract; unaligned because a binding's buffer may be.
    let comm = unsafe { comm.cast::<ffi::MPI_Comm>().read_unaligned() };
    // SAFETY: a valid communicator used by this thread (the contract).
    unsafe { init_mpi_raw(comm) }
}

/// [`init_mpi`] from a raw communicator handle.
///
/// # Safety
/// `comm` must be a valid communicator of an initialised MPI library, used
/// by this thread.
pub unsafe fn init_mpi_raw(comm: ffi::MPI_Comm) -> Result<InitInfo, InitError> {
    require_mpi()?;
    // SAFETY: reading a constant of the initialised MPI library.
    if comm == unsafe { ffi::RSMPI_COMM_NULL } {
        return Err(InitError::NullCommunicator);
    }
    let fixed_slack = fixed_slack()?;
    let mpi_err = |err: CallError| InitError::Mpi(err.to_string());
    // SAFETY: `comm` is valid and used by this thread (the contract); the
    // application keeps it until `MPI_Finalize`, after `finalize` detached.
    let mut binding = unsafe { Mpi::attach(comm) }.map_err(mpi_err)?;
    // On a restart the ranks settle their closed files over the binding.
    let info = runtime::init_with_peers(runtime::Config::from_env()?, &mut binding)?;
    crate::finalize::before_finalize(detach);
    let rank = binding.rank();
    if i64::from(rank) != i64::from(info.rank) {
        // A world of one where the job has more ranks: the launcher of one
        // MPI started a program built with another.
        let alone = if binding.size() == 1 {
            " of size 1: was the program started by the launcher of another MPI than the one \
             it is built with? (cryo run picks the launcher from the program's libraries; \
             check --launcher)"
        } else {
            ""
        };
        return Err(InitError::Mpi(format!(
            "the agent registered this process as rank {}, but it is rank {rank} of the \
             communicator{alone}",
            info.rank
        )));
    }
    binding.listen().map_err(mpi_err)?;
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Quiesce::new(binding, rank, fixed_slack));
    MPI_MODE.store(true, Ordering::Release);
    Ok(info)
}

/// [`init_mpi_raw`] from a Fortran communicator handle (an `MPI_Fint`:
/// what `use mpi` gives, and what `type(MPI_Comm)` of `use mpi_f08` holds
/// in `MPI_VAL`).
///
/// The handle is converted with `MPI_Comm_f2c` of the MPI library this
/// runtime is built against, through rsmpi's C shim `RSMPI_Comm_f2c`: the
/// shim is compiled against that library's `mpi.h`, so it expands MPICH's
/// macro (a cast: there the handles are the same integer) and calls Open
/// MPI's function (a table lookup from the integer to the object pointer,
/// which answers `MPI_COMM_NULL` for an index it does not know). The
/// conversion happens here, not in Fortran, because `MPI_Comm_f2c` may be
/// a macro that no Fortran `bind(C)` interface can call.
///
/// # Safety
/// As for [`init_mpi_raw`]: `comm` must be a valid Fortran communicator
/// handle of the initialised MPI library, used by this thread.
pub unsafe fn init_mpi_fortran(comm: ffi::RSMPI_Fint) -> Result<InitInfo, InitError> {
    // MPI_Comm_f2c is only defined once MPI is initialised.
    require_mpi()?;
    // SAFETY: MPI is initialised, and MPI_Comm_f2c accepts any integer
    // (MPICH casts it; Open MPI bounds-checks it against its table).
    let comm = unsafe { ffi::RSMPI_Comm_f2c(comm) };
    // SAFETY: forwarded caller contract; a handle f2c did not know is
    // MPI_COMM_NULL (Open MPI), which init_mpi_raw refuses.
    unsafe { init_mpi_raw(comm) }
}

/// Refuses to go on before `MPI_Init`.
fn require_mpi() -> Result<(), InitError> {
    if mpi::initialized() {
        Ok(())
    } else {
        Err(InitError::Mpi(
            "MPI is not initialised: call MPI_Init before cryo_init_mpi".into(),
        ))
    }
}

/// `CRYO_QUIESCE_SLACK`: a number of safe points, or `auto` (or unset) for
/// none.
fn fixed_slack() -> Result<Option<u64>, InitError> {
    match std::env::var(ENV_QUIESCE_SLACK) {
        Ok(text) if text.trim() == "auto" => Ok(None),
        Ok(text) => Ok(Some(
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_SLACK)
                .ok_or_else(|| InitError::BadEnv {
                    var: ENV_QUIESCE_SLACK,
                    value: text.clone(),
                    why: format!("not a number of safe points from 0 to {MAX_SLACK}, nor `auto`"),
                })?,
        )),
        Err(_) => Ok(None),
    }
}

/// The safe point in MPI mode.
#[cold]
pub(crate) fn mpi_safe_point() -> Result<SafePoint, CheckpointError> {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(q) = guard.as_mut() else {
        return Ok(SafePoint::Continue);
    };
    let rank = u32::try_from(q.rank()).unwrap_or(u32::MAX);
    let requested = runtime::requested_epoch();
    runtime::note_seen(requested);
    // A fence an earlier park left pending is tested once.
    let progress = q
        .net_mut()
        .fence_passed()
        .and_then(|_| q.safe_point(requested))
        .and_then(|progress| wait_out(q, progress))
        .map_err(|err| CheckpointError::Mpi {
            rank,
            detail: err.to_string(),
        })?;
    drop(guard);
    match progress {
        Progress::Continue | Progress::Wait | Progress::Decided(Decision::ComputeOn) => {
            Ok(SafePoint::Continue)
        }
        Progress::Decided(Decision::Park(epoch)) => {
            let mut late = LateProbe {
                until: std::time::Instant::now() + PROBE_WINDOW,
                fenced: false,
            };
            let parked = runtime::park_decided(epoch, Some(&mut late));
            // Whatever the park's end, every rank passes the fence.
            pass_fence(rank, late.fenced)?;
            parked
        }
        Progress::Decided(Decision::Refuse(epoch, refusal)) => {
            let left_target = matches!(refusal, Refusal::LeftTarget { .. });
            let refused = runtime::refuse(epoch, refusal.to_string());
            if left_target {
                // The others parked: meet them at their fence.
                pass_fence(rank, false)?;
            }
            refused
        }
    }
}

/// The rest of the window for messages in flight, looked at while the rank
/// is parked and the agent copies it: a message found there refuses the
/// epoch as one found before the check would. No rank computes on before
/// every rank's window is over (the fence), so what it finds was sent
/// before the safe point.
struct LateProbe {
    until: std::time::Instant,
    /// Whether the fence was started when the look was over.
    fenced: bool,
}

impl LookWhileParked for LateProbe {
    fn until(&self) -> std::time::Instant {
        self.until
    }

    fn look(&mut self) -> Result<Option<String>, String> {
        // Every MPI call of the runtime is made under the quiesce's lock.
        let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let Some(q) = guard.as_mut() else {
            return Ok(None);
        };
        let rank = q.rank();
        match q.net_mut().probe() {
            Ok(None) => Ok(None),
            Ok(Some(message)) => Ok(Some(Refusal::InFlight { rank, message }.to_string())),
            Err(err) => Err(format!(
                "rank {rank}: looking for messages in flight while parked: {err}"
            )),
        }
    }

    fn over(&mut self) {
        let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = guard.as_mut() {
            // A failure is tried again, and reported, in `pass_fence`.
            self.fenced = q.net_mut().start_fence().is_ok();
        }
    }
}

/// How long a rank waits at the fence after a park. Every rank normally
/// starts it within its window and a round of the scheduler. A rank that
/// left the target while waiting for the check starts it only at its next
/// safe point, and in a coupled code that comes only once the parked ranks
/// compute on: so a rank stops waiting after this long and computes on,
/// leaving the fence pending (tested at its next safe points). The price is
/// a possible false refusal by a peer still looking, never a missed message.
const FENCE_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Starts the park's fence unless the late look did (`started`), and waits
/// until every rank of the agreement has started it (at most
/// [`FENCE_PATIENCE`]), sleeping briefly between tests (see
/// [`Mpi::start_fence`]).
fn pass_fence(rank: u32, started: bool) -> Result<(), CheckpointError> {
    let mpi_err = |err: CallError| CheckpointError::Mpi {
        rank,
        detail: format!("the fence after a park: {err}"),
    };
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(q) = guard.as_mut() else {
        return Ok(());
    };
    if !started {
        q.net_mut().start_fence().map_err(mpi_err)?;
    }
    let since = std::time::Instant::now();
    let mut polls: u32 = 0;
    while !q.net_mut().fence_passed().map_err(mpi_err)? {
        if since.elapsed() >= FENCE_PATIENCE {
            tracing::debug!(rank, "quiesce.fence_left_pending");
            break;
        }
        between_polls(&mut polls);
    }
    Ok(())
}

/// Between two polls of a wait: a few spins, then short sleeps (the peer
/// waited for may need the core; see [`POLL_SLEEP`] for why not yields).
pub(crate) fn between_polls(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls > SPINS_BEFORE_SLEEP {
        std::thread::sleep(POLL_SLEEP);
    } else {
        std::hint::spin_loop();
    }
}

/// Polls `q` for as long as it keeps the rank inside the safe point,
/// spinning for a few polls of each step and then sleeping briefly between
/// polls (the peer it waits for may need it).
fn wait_out<C: Collectives>(
    q: &mut Quiesce<C>,
    mut progress: Progress,
) -> Result<Progress, CallError> {
    let mut step = q.started();
    let mut polls: u32 = 0;
    while progress == Progress::Wait {
        if q.started() != step {
            step = q.started();
            polls = 0;
        }
        between_polls(&mut polls);
        progress = q.poll()?;
    }
    Ok(progress)
}

/// Leaves the protocol before `MPI_Finalize`: takes part in the agreement in
/// progress (or starts one) with a cap no safe point reaches, so that every
/// rank ends with the same collectives, and frees the private communicators.
pub(crate) fn detach() {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut q) = guard.take() else {
        return;
    };
    MPI_MODE.store(false, Ordering::Release);
    if !mpi::finalized() {
        match q.leave().and_then(|progress| wait_out(&mut q, progress)) {
            Ok(_) => q.net_mut().close(),
            Err(err) => cryo_core::say!(
                "cryo: rank {}: leaving the quiesce protocol: {err}",
                q.rank()
            ),
        }
    }
    q.log_summary();
}
