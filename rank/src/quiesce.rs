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
//! 1. **join** `MAX[epoch, cap, needed]`: a rank joins when its agent
//!    raises its flag. Its cap is its current index plus [`JOIN_SLACK`]
//!    worth of safe points, at least a floor (see [`slack_floor`]; `needed`
//!    is the safe points it took to see the previous join complete). It
//!    does not wait: it keeps computing and drives the join with one
//!    `MPI_Test` per safe point. The result is the epoch and the
//!    **target**, the largest cap: normally every rank learns it before
//!    reaching it.
//! 2. **arrive** `SUM[ranks not at the target]`: a rank starts it when it
//!    reaches the target, and then waits there (yielding its core). A rank
//!    that learns the target only after passing it starts it at once, saying
//!    so, and carries on. Completion with a zero proves every rank is at the
//!    target (the barrier).
//! 3. **check** `SUM[ranks with a message in flight, ranks not at the
//!    target, ranks that rang, ranks leaving]`: each rank at the target
//!    probes the application's communicator first. Its result is the same
//!    everywhere: park (all at the target, nothing in flight); refuse (a
//!    message in flight: the application broke the safe-point contract; the
//!    ranks that saw one refuse, naming it, and the others compute on); or
//!    join again for the same epoch with four times the slack (a rank
//!    passed the target), up to [`MAX_ATTEMPTS`].
//!
//! Waiting is only ever at the target, and never unbounded. A peer that
//! passed the target is usually blocked in the application's communication
//! with a rank that waits there, so a rank that has waited for a step
//! longer than the others can take to get there (see [`patience`]) leaves
//! the target, says so, and finishes the agreement from its next safe
//! points; the ranks then retry. A rank that leaves while waiting for the
//! check has already said it was there: if the check finds every rank at
//! the target, the others park and this rank refuses the epoch, which
//! releases them.
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
//! every rank refuses the checkpoint, naming the sender and tag, and carries
//! on.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::topology::Communicator;

use crate::error::{CheckpointError, InitError};
use crate::runtime::{self, InitInfo, SafePoint};

/// Environment variable: safe points of slack, fixed (default `auto`: see
/// [`JOIN_SLACK`]). `0` makes every agreement miss and refuse, which is
/// only useful to test that path.
pub use cryo_core::env::ENV_QUIESCE_SLACK;

/// How far past its join a rank may run before the agreement must have
/// told it the target: it covers the spread between the agents raising
/// their flags and the `MPI_Test`s the join needs to complete on every rank,
/// and it is about what the agreement adds to the quiesce latency.
pub const JOIN_SLACK: Duration = Duration::from_millis(20);

/// The fewest safe points of slack. Before its first agreement a rank adds
/// four per doubling of the ranks (see [`first_slack_floor`]). Later the
/// floor follows what the previous agreement needed (see [`slack_floor`]):
/// with the application's own MPI calls driving it, a join is usually seen
/// complete within a safe point or two.
pub const MIN_SLACK: u64 = 2;

/// The slack floor before any agreement: MPICH's `MPI_Iallreduce` takes
/// about `log2(ranks)` steps, each needing an MPI call on every rank, and
/// where the application makes none between safe points (ranks computing
/// apart), with more ranks than cores a step may take a few safe points of
/// each rank. 16 ranks on 2 cores, computing apart, missed with
/// `2 + log2(ranks)`.
pub fn first_slack_floor(ranks: u32) -> u64 {
    MIN_SLACK + 4 * u64::from(ranks.max(1).ilog2())
}

/// The slack floor from the most safe points any rank needed between its
/// join and seeing the join complete in the previous agreement: half as
/// much again, plus one.
pub fn slack_floor(most_needed: u64) -> u64 {
    let needed = most_needed.min(MAX_SLACK);
    (needed + needed / 2 + 1).clamp(MIN_SLACK, MAX_SLACK)
}

/// Attempts per epoch: after a rank passed the target, the ranks join again
/// with four times the slack; after this many, they refuse the epoch.
pub const MAX_ATTEMPTS: u32 = 3;

/// The longest a rank waits at the target for a step to complete: well
/// below an agent's park timeout.
pub const GIVE_UP: Duration = Duration::from_secs(5);

/// The least a rank waits for the others to arrive at the target.
pub const MIN_PATIENCE: Duration = Duration::from_millis(250);

/// How long a rank waits at the target for a step to complete: far more
/// than the spread of ranks that are all heading there (ten of its safe
/// points, at least [`MIN_PATIENCE`]), growing fourfold with each attempt,
/// and at most [`GIVE_UP`]. Leaving too early costs a retry; too late, a
/// stall of the whole job when a peer passed the target.
pub fn patience(per_safe_point_ns: u64, attempt: u32) -> Duration {
    let by_pace = Duration::from_nanos(per_safe_point_ns.saturating_mul(10));
    by_pace
        .max(MIN_PATIENCE)
        .saturating_mul(1 << (2 * attempt.min(8)))
        .min(GIVE_UP)
}

/// How often a rank outside an agreement looks for a peer's ring. It only
/// bounds how late a rank whose agent failed to raise its flag joins. A look
/// is one `MPI_Test`, which runs MPICH's progress engine and costs several
/// µs here (looks every 5 ms cost 0.1–0.17% of 1 ms iterations at 2 ranks);
/// every 100 ms they cost under 0.01%.
pub const BELL_PERIOD: Duration = Duration::from_millis(100);

/// How long a join may stay incomplete before the rank rings its peers.
/// Agents that are merely slower than the others raise their flags within
/// this time and no message is sent.
pub const RING_AFTER: Duration = Duration::from_millis(50);

/// The most safe points a rank lets pass between two looks for a ring.
const MAX_SAFE_POINTS_PER_LOOK: u64 = 1 << 13;

/// The most safe points of slack: a pace measured in a burst of very short
/// iterations must not send every rank far ahead.
const MAX_SLACK: u64 = 1 << 12;

/// The tag of a ring on the bell communicator (the only tag used there).
const TAG_RING: c_int = 7;

/// A cap (and so a target) that no safe point reaches: a rank that has left
/// its loop takes part in an agreement without ever parking in it.
const NEVER: u64 = u64::MAX;

/// Polls before a waiting rank starts giving its core away: a collective
/// that is about to complete is taken without a system call.
const SPINS_BEFORE_YIELD: u32 = 64;

/// Set once `init_mpi` has attached a communicator.
pub(crate) static MPI_MODE: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<Quiesce>> = Mutex::new(None);

struct Quiesce {
    /// Private duplicate for agreements: they never match the
    /// application's messages or collectives.
    agree_comm: ffi::MPI_Comm,
    /// Private duplicate for rings only.
    bell_comm: ffi::MPI_Comm,
    /// The application's communicator, probed for messages in flight.
    app_comm: ffi::MPI_Comm,
    rank: i32,
    size: i32,
    /// Safe points so far.
    counter: u64,
    pace: Pace,
    /// The receive kept posted for a peer's ring.
    bell: Bell,
    agreement: Option<Agreement>,
    /// The newest epoch an agreement ended for: a flag still showing it (an
    /// agent's late raise) is not a new request.
    last_decided: u64,
    /// `CRYO_QUIESCE_SLACK`, when set to a number.
    fixed_slack: Option<u64>,
    /// The fewest safe points of slack (see [`slack_floor`]).
    slack_floor: u64,
    /// Safe points between this rank's join and its seeing the join
    /// complete, in the previous agreement.
    last_needed: u64,
    /// In `finalize`: no more safe points will come.
    leaving: bool,
    /// An agreement ended with a rank leaving: that rank takes part in no
    /// further agreement, so none is started.
    ended: bool,
    stats: Stats,
}

/// The rank's own time per safe point, measured at each look for a ring, so
/// that periods can be turned into numbers of safe points without reading
/// the clock at every safe point.
struct Pace {
    /// The safe point of the next look.
    next_look: u64,
    last_look: Instant,
    last_look_at: u64,
    /// Nanoseconds per safe point, 0 until measured.
    per_safe_point_ns: u64,
}

impl Pace {
    fn new() -> Self {
        Pace {
            next_look: 1,
            last_look: Instant::now(),
            last_look_at: 0,
            per_safe_point_ns: 0,
        }
    }

    /// Safe points in `period` at the measured pace, from `least` (also
    /// before any measurement) to `most`.
    fn safe_points_in(&self, period: Duration, least: u64, most: u64) -> u64 {
        if self.per_safe_point_ns == 0 {
            return least;
        }
        let period = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        (period / self.per_safe_point_ns).clamp(least, most)
    }

    /// Measures the pace over the safe points since the last measurement
    /// (none passed: the pace stands).
    fn measure(&mut self, counter: u64) {
        let passed = counter.saturating_sub(self.last_look_at);
        if passed == 0 {
            return;
        }
        let now = Instant::now();
        let ns = u64::try_from(now.saturating_duration_since(self.last_look).as_nanos())
            .unwrap_or(u64::MAX);
        self.per_safe_point_ns = (ns / passed).max(1);
        self.last_look = now;
        self.last_look_at = counter;
    }

    /// Measures the pace at a look and schedules the next one.
    fn looked(&mut self, counter: u64) {
        self.measure(counter);
        self.next_look =
            counter.saturating_add(self.safe_points_in(BELL_PERIOD, 1, MAX_SAFE_POINTS_PER_LOOK));
    }

    /// After an agreement: measure afresh, its waits are not the
    /// application's pace.
    fn restart(&mut self, counter: u64) {
        self.last_look = Instant::now();
        self.last_look_at = counter;
        self.next_look = counter.saturating_add(1);
    }
}

/// The receive a rank keeps posted for an empty ring message.
struct Bell {
    request: ffi::MPI_Request,
    /// The posted receive matched a ring (consumed; reposted after the
    /// agreement's check).
    rung: bool,
}

impl Bell {
    fn post(&mut self, comm: ffi::MPI_Comm) -> Result<(), String> {
        self.rung = false;
        // SAFETY: an empty receive: MPI never touches the (dangling, non-null)
        // buffer; `request` is a valid out-parameter.
        let code = unsafe {
            ffi::MPI_Irecv(
                std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                0,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_ANY_SOURCE,
                TAG_RING,
                comm,
                &mut self.request,
            )
        };
        mpi_check(code, "MPI_Irecv")
    }

    /// One `MPI_Test` of the posted receive: whether a ring came.
    fn look(&mut self) -> Result<bool, String> {
        if self.rung {
            return Ok(false);
        }
        let mut done = 0;
        // SAFETY: the request is live; `done` is a valid out-parameter.
        let code = unsafe { ffi::MPI_Test(&mut self.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
        mpi_check(code, "MPI_Test")?;
        self.rung = done != 0;
        Ok(self.rung)
    }
}

/// The reductions the agreement uses.
#[derive(Clone, Copy)]
enum Reduce {
    Max,
    Sum,
}

/// One non-blocking allreduce of `N` words.
struct Collective<const N: usize> {
    request: ffi::MPI_Request,
    // Boxed so their addresses stay fixed while MPI owns them.
    send: Box<[u64; N]>,
    recv: Box<[u64; N]>,
    done: bool,
}

impl<const N: usize> Collective<N> {
    fn start(comm: ffi::MPI_Comm, words: [u64; N], reduce: Reduce) -> Result<Self, String> {
        let mut collective = Collective {
            // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial
            // value.
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            send: Box::new(words),
            recv: Box::new([0; N]),
            done: false,
        };
        let count = c_int::try_from(N).unwrap_or(c_int::MAX);
        // SAFETY: the buffers are boxed and owned by the collective, which
        // is completed before it is dropped (every agreement runs to its
        // end, in `finalize` at the latest); the communicator is private.
        let code = unsafe {
            ffi::MPI_Iallreduce(
                collective.send.as_ptr().cast(),
                collective.recv.as_mut_ptr().cast(),
                count,
                ffi::RSMPI_UINT64_T,
                match reduce {
                    Reduce::Max => ffi::RSMPI_MAX,
                    Reduce::Sum => ffi::RSMPI_SUM,
                },
                comm,
                &mut collective.request,
            )
        };
        mpi_check(code, "MPI_Iallreduce")?;
        Ok(collective)
    }

    /// One `MPI_Test`: whether it has completed.
    fn test(&mut self) -> Result<bool, String> {
        if !self.done {
            let mut done = 0;
            // SAFETY: the request is live (owned here); `done` is a valid
            // out-parameter.
            let code =
                unsafe { ffi::MPI_Test(&mut self.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            mpi_check(code, "MPI_Test")?;
            self.done = done != 0;
        }
        Ok(self.done)
    }

    /// Waits for completion, yielding the core between polls (the peer it
    /// waits for may need it), for at most `limit`: whether it completed.
    fn wait(&mut self, limit: Option<Duration>) -> Result<bool, String> {
        let started = Instant::now();
        let mut polls: u32 = 0;
        while !self.test()? {
            if limit.is_some_and(|limit| started.elapsed() >= limit) {
                return Ok(false);
            }
            polls = polls.saturating_add(1);
            if polls > SPINS_BEFORE_YIELD {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(true)
    }
}

/// Where a rank stands in an agreement.
enum Step {
    /// Join started: [epoch, target, most safe points the previous
    /// agreement's join needed] to come.
    Joining { join: Collective<3>, since: Instant },
    /// The target is known and not reached yet.
    Heading,
    /// Arrive started: [ranks not at the target].
    Arriving { arrive: Collective<1> },
    /// Check started: [in flight, not at the target, rang, leaving].
    Checking {
        check: Collective<4>,
        in_flight: Option<String>,
    },
}

struct Agreement {
    /// This rank's epoch until the join completes, then the agreed one.
    epoch: u64,
    /// The safe point where this rank joined.
    joined_at: u64,
    target: u64,
    /// 0 for the first agreement of an epoch.
    attempt: u32,
    /// Waiting at the target (it said so in the arrive step).
    at_target: bool,
    rang: bool,
    step: Step,
}

/// What an agreement decided for this rank.
enum Decision {
    Park(u64),
    Refuse(u64, String),
    /// Compute on: a rank is leaving, or another rank refuses the epoch.
    None,
}

/// What agreements cost this rank, logged when it detaches.
#[derive(Debug, Default)]
struct Stats {
    agreements: u64,
    joined_by_ring: u64,
    rings: u64,
    retries: u64,
    target_waits: u64,
    target_wait: Duration,
}

// SAFETY: MPI handles are plain integers in MPICH; they are only used by the
// thread that calls the safe point, one call at a time (the Mutex).
unsafe impl Send for Quiesce {}

fn mpi_check(code: c_int, call: &'static str) -> Result<(), String> {
    if i64::from(code) == i64::from(ffi::MPI_SUCCESS) {
        Ok(())
    } else {
        Err(format!("{call} failed with MPI error {code}"))
    }
}

/// Initialises the runtime for an MPI rank whose application owns
/// `MPI_Init`: registers with the agent (see [`runtime::init`]) and attaches
/// the quiesce protocol to duplicates of `comm`.
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
    let fixed_slack = match std::env::var(ENV_QUIESCE_SLACK) {
        Ok(text) if text.trim() == "auto" => None,
        Ok(text) => Some(
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_SLACK)
                .ok_or_else(|| InitError::BadEnv {
                    var: ENV_QUIESCE_SLACK,
                    value: text.clone(),
                    why: format!("not a number of safe points from 0 to {MAX_SLACK}, nor `auto`"),
                })?,
        ),
        Err(_) => None,
    };
    let mut agree_comm: ffi::MPI_Comm = comm;
    let mut bell_comm: ffi::MPI_Comm = comm;
    let mut rank = 0;
    let mut size = 0;
    // SAFETY: `comm` is valid per the contract; the handles and integers are
    // out-parameters that live across the calls.
    unsafe {
        mpi_check(ffi::MPI_Comm_dup(comm, &mut agree_comm), "MPI_Comm_dup")
            .map_err(InitError::Mpi)?;
        mpi_check(ffi::MPI_Comm_dup(comm, &mut bell_comm), "MPI_Comm_dup")
            .map_err(InitError::Mpi)?;
        mpi_check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank").map_err(InitError::Mpi)?;
        mpi_check(ffi::MPI_Comm_size(comm, &mut size), "MPI_Comm_size").map_err(InitError::Mpi)?;
    }
    let info = runtime::init()?;
    runtime::before_finalize(detach);
    if i64::from(rank) != i64::from(info.rank) {
        return Err(InitError::Mpi(format!(
            "the agent registered this process as rank {}, but it is rank {rank} of the communicator",
            info.rank
        )));
    }
    let mut bell = Bell {
        // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial value.
        request: unsafe { ffi::RSMPI_REQUEST_NULL },
        rung: false,
    };
    bell.post(bell_comm).map_err(InitError::Mpi)?;
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Quiesce {
        agree_comm,
        bell_comm,
        app_comm: comm,
        rank,
        size,
        counter: 0,
        pace: Pace::new(),
        bell,
        agreement: None,
        last_decided: 0,
        fixed_slack,
        slack_floor: first_slack_floor(size.unsigned_abs()),
        last_needed: 0,
        leaving: false,
        ended: false,
        stats: Stats::default(),
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
    if q.ended {
        return Ok(SafePoint::Continue);
    }
    if q.agreement.is_none() {
        let requested = runtime::requested_epoch();
        let epoch = if requested > q.last_decided {
            requested
        } else if q.counter >= q.pace.next_look {
            q.pace.looked(q.counter);
            if !q.bell.look().map_err(mpi_err)? {
                return Ok(SafePoint::Continue);
            }
            q.stats.joined_by_ring += 1;
            // A ring carries no epoch: the join's MAX brings the ringer's.
            0
        } else {
            return Ok(SafePoint::Continue);
        };
        q.join(epoch, 0).map_err(mpi_err)?;
    }
    let decision = q.advance().map_err(mpi_err)?;
    drop(guard);
    match decision {
        None | Some(Decision::None) => Ok(SafePoint::Continue),
        Some(Decision::Park(epoch)) => runtime::park_decided(epoch),
        Some(Decision::Refuse(epoch, reason)) => runtime::refuse(epoch, reason),
    }
}

impl Quiesce {
    /// Starts this rank's part of an agreement: the epoch it knows of and
    /// the safe point it can promise not to pass before learning the target.
    fn join(&mut self, epoch: u64, attempt: u32) -> Result<(), String> {
        let cap = if self.leaving {
            NEVER
        } else {
            // The pace since the last look: fresh, even if the application
            // has slowed down since it was last measured.
            self.pace.measure(self.counter);
            let slack = self.fixed_slack.unwrap_or_else(|| {
                self.pace
                    .safe_points_in(JOIN_SLACK, self.slack_floor, MAX_SLACK)
            });
            self.counter.saturating_add(slack << (2 * attempt))
        };
        let join = Collective::start(self.agree_comm, [epoch, cap, self.last_needed], Reduce::Max)?;
        self.stats.agreements += 1;
        tracing::debug!(
            rank = self.rank,
            epoch,
            safe_point = self.counter,
            cap,
            attempt,
            "quiesce.joined"
        );
        self.agreement = Some(Agreement {
            epoch,
            joined_at: self.counter,
            target: NEVER,
            attempt,
            at_target: false,
            rang: false,
            step: Step::Joining {
                join,
                since: Instant::now(),
            },
        });
        Ok(())
    }

    /// Takes the agreement as far as it can go at this safe point: `None`
    /// while it is still under way.
    fn advance(&mut self) -> Result<Option<Decision>, String> {
        loop {
            let Some(agreement) = self.agreement.as_mut() else {
                return Ok(None);
            };
            let how = Settle {
                leaving: self.leaving,
                patience: patience(self.pace.per_safe_point_ns, agreement.attempt),
                rank: self.rank,
                safe_point: self.counter,
            };
            match &mut agreement.step {
                Step::Joining { join, since } => {
                    if !join.test()? {
                        if !agreement.rang && since.elapsed() >= RING_AFTER {
                            ring(self.bell_comm, self.rank, self.size)?;
                            agreement.rang = true;
                            self.stats.rings += 1;
                            tracing::debug!(
                                rank = self.rank,
                                epoch = agreement.epoch,
                                safe_point = self.counter,
                                "quiesce.rang"
                            );
                        }
                        return Ok(None);
                    }
                    agreement.epoch = join.recv[0];
                    agreement.target = join.recv[1];
                    // The same MAX on every rank, so the same floor.
                    if join.recv[2] > 0 {
                        self.slack_floor = slack_floor(join.recv[2]);
                    }
                    self.last_needed = (self.counter - agreement.joined_at).max(1);
                    agreement.step = Step::Heading;
                }
                Step::Heading => {
                    let unreachable = self.leaving || agreement.target == NEVER;
                    if !unreachable && self.counter < agreement.target {
                        return Ok(None);
                    }
                    agreement.at_target = !unreachable && self.counter == agreement.target;
                    if !agreement.at_target && !unreachable {
                        tracing::debug!(
                            rank = self.rank,
                            epoch = agreement.epoch,
                            target = agreement.target,
                            safe_point = self.counter,
                            "quiesce.passed_target"
                        );
                    }
                    let arrive = Collective::start(
                        self.agree_comm,
                        [u64::from(!agreement.at_target)],
                        Reduce::Sum,
                    )?;
                    agreement.step = Step::Arriving { arrive };
                }
                Step::Arriving { arrive } => {
                    if !settle(arrive, &mut agreement.at_target, &how, &mut self.stats)? {
                        return Ok(None);
                    }
                    let everyone_there = arrive.recv[0] == 0 && agreement.at_target;
                    let in_flight = if everyone_there {
                        probe(self.app_comm, self.rank)?
                    } else {
                        None
                    };
                    let check = Collective::start(
                        self.agree_comm,
                        [
                            u64::from(in_flight.is_some()),
                            u64::from(!everyone_there),
                            u64::from(agreement.rang),
                            u64::from(self.leaving),
                        ],
                        Reduce::Sum,
                    )?;
                    agreement.step = Step::Checking { check, in_flight };
                }
                Step::Checking { check, in_flight } => {
                    if !settle(check, &mut agreement.at_target, &how, &mut self.stats)? {
                        return Ok(None);
                    }
                    let [in_flight_ranks, missing, rang, leaving] = *check.recv;
                    let in_flight = in_flight.take();
                    let (epoch, attempt, at_target, own_ring) = (
                        agreement.epoch,
                        agreement.attempt,
                        agreement.at_target,
                        agreement.rang,
                    );
                    self.agreement = None;
                    self.collect_rings(rang - u64::from(own_ring))?;
                    self.pace.restart(self.counter);
                    let decision = if leaving > 0 {
                        self.ended = true;
                        Decision::None
                    } else if in_flight_ranks > 0 {
                        // Only the ranks that saw a message refuse, naming
                        // it: the first refusal aborts the epoch, so it must
                        // be the one that says what was in flight. The others
                        // compute on and their agents release nothing.
                        match in_flight {
                            Some(reason) => Decision::Refuse(epoch, reason),
                            None => Decision::None,
                        }
                    } else if missing > 0 {
                        if attempt + 1 < MAX_ATTEMPTS {
                            // Every rank read the same sums: all join again.
                            self.stats.retries += 1;
                            self.join(epoch, attempt + 1)?;
                            continue;
                        }
                        Decision::Refuse(
                            epoch,
                            format!(
                                "the ranks did not all stop at the agreed safe point in \
                                 {MAX_ATTEMPTS} attempts ({missing} missed the last)"
                            ),
                        )
                    } else if at_target {
                        Decision::Park(epoch)
                    } else {
                        // This rank left the target after the others were
                        // all there; they park, and this refusal aborts the
                        // epoch so that they are released at once.
                        Decision::Refuse(
                            epoch,
                            format!(
                                "rank {} left the agreed safe point after waiting {} ms for \
                                 the others to check it",
                                self.rank,
                                patience(self.pace.per_safe_point_ns, attempt).as_millis()
                            ),
                        )
                    };
                    self.last_decided = self.last_decided.max(epoch);
                    return Ok(Some(decision));
                }
            }
        }
    }

    /// Receives the rings sent to this rank in the agreement that just
    /// ended (every rank that rang sent one to each of the others), then
    /// posts the bell again.
    fn collect_rings(&mut self, mut rings: u64) -> Result<(), String> {
        if rings > 0 && !self.bell.rung {
            // SAFETY: the posted receive is live; it matches a ring.
            let code = unsafe { ffi::MPI_Wait(&mut self.bell.request, ffi::RSMPI_STATUS_IGNORE) };
            mpi_check(code, "MPI_Wait")?;
            self.bell.rung = true;
        }
        if self.bell.rung {
            rings = rings.saturating_sub(1);
        }
        for _ in 0..rings {
            // SAFETY: an empty receive of a ring that was sent before its
            // sender started the check.
            let code = unsafe {
                ffi::MPI_Recv(
                    std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                    0,
                    ffi::RSMPI_UINT64_T,
                    ffi::RSMPI_ANY_SOURCE,
                    TAG_RING,
                    self.bell_comm,
                    ffi::RSMPI_STATUS_IGNORE,
                )
            };
            mpi_check(code, "MPI_Recv")?;
        }
        if self.bell.rung {
            self.bell.post(self.bell_comm)?;
        }
        Ok(())
    }
}

/// How a rank completes a step at this safe point.
struct Settle {
    /// No safe point will come again: wait as long as it takes.
    leaving: bool,
    /// How long a rank at the target waits.
    patience: Duration,
    rank: i32,
    safe_point: u64,
}

/// Completes a step: a rank at the target waits (see [`patience`]), a
/// leaving rank waits as long as it takes, any other rank tests once and
/// goes on. A rank that has waited long enough at the target leaves it (a
/// peer that passed the target may be blocked on it) and computes on.
fn settle<const N: usize>(
    collective: &mut Collective<N>,
    at_target: &mut bool,
    how: &Settle,
    stats: &mut Stats,
) -> Result<bool, String> {
    if how.leaving {
        return collective.wait(None);
    }
    if !*at_target {
        return collective.test();
    }
    let started = Instant::now();
    let done = collective.wait(Some(how.patience))?;
    stats.target_waits += 1;
    stats.target_wait += started.elapsed();
    if !done {
        *at_target = false;
        tracing::info!(
            rank = how.rank,
            safe_point = how.safe_point,
            waited_ms = how.patience.as_millis(),
            "quiesce.left_target"
        );
    }
    Ok(done)
}

/// How long a rank at the target keeps looking for a message in flight.
/// MPI does not promise that a message sent before the sender's arrival is
/// visible to the receiver's `MPI_Iprobe` when the arrive step completes (it
/// may travel another path); a short window catches those that were sent,
/// at the cost of this much quiesce latency.
pub const PROBE_WINDOW: Duration = Duration::from_millis(2);

/// Looks for a message waiting on the application's communicator: one sent
/// before the safe point and not received.
fn probe(app_comm: ffi::MPI_Comm, rank: i32) -> Result<Option<String>, String> {
    let started = Instant::now();
    loop {
        let mut pending = 0;
        // SAFETY: a zeroed MPI_Status is a valid out-parameter.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: the application's communicator is live; out-parameters
        // valid.
        let code = unsafe {
            ffi::MPI_Iprobe(
                ffi::RSMPI_ANY_SOURCE,
                ffi::RSMPI_ANY_TAG,
                app_comm,
                &mut pending,
                &mut status,
            )
        };
        mpi_check(code, "MPI_Iprobe")?;
        if pending != 0 {
            return Ok(Some(format!(
                "rank {rank}: a message from rank {} (tag {}) was still in flight at the safe point; \
                 complete all communication before calling the safe point",
                status.MPI_SOURCE, status.MPI_TAG
            )));
        }
        if started.elapsed() >= PROBE_WINDOW {
            return Ok(None);
        }
        std::thread::yield_now();
    }
}

/// Sends an empty ring to every other rank. The sends are freed at once: an
/// empty message owns no buffer, and its receipt is counted by the check.
fn ring(comm: ffi::MPI_Comm, rank: i32, size: i32) -> Result<(), String> {
    for peer in (0..size).filter(|peer| *peer != rank) {
        // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial value.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: an empty send: MPI never touches the (dangling, non-null)
        // buffer; freeing the request lets the send complete on its own.
        unsafe {
            mpi_check(
                ffi::MPI_Isend(
                    std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                    0,
                    ffi::RSMPI_UINT64_T,
                    peer,
                    TAG_RING,
                    comm,
                    &mut request,
                ),
                "MPI_Isend",
            )?;
            mpi_check(ffi::MPI_Request_free(&mut request), "MPI_Request_free")?;
        }
    }
    Ok(())
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
    let mut finalized = 0;
    // SAFETY: may be called at any time.
    unsafe { ffi::MPI_Finalized(&mut finalized) };
    if finalized == 0 {
        if let Err(err) = q.leave() {
            eprintln!("cryo: rank {}: leaving the quiesce protocol: {err}", q.rank);
        }
    }
    tracing::debug!(
        rank = q.rank,
        safe_points = q.counter,
        agreements = q.stats.agreements,
        joined_by_ring = q.stats.joined_by_ring,
        rings = q.stats.rings,
        retries = q.stats.retries,
        target_waits = q.stats.target_waits,
        target_wait_ms = q.stats.target_wait.as_secs_f64() * 1e3,
        "quiesce.summary"
    );
}

impl Quiesce {
    fn leave(&mut self) -> Result<(), String> {
        self.leaving = true;
        if !self.ended {
            if self.agreement.is_none() {
                self.join(0, 0)?;
            }
            // Every step but the join now waits to completion; the other
            // ranks complete them from their safe points (a ring reaches
            // those whose agent raised nothing) or their own `finalize`.
            while self.advance()?.is_none() {
                std::thread::yield_now();
            }
        }
        // SAFETY: the posted receive is live; cancelling and then completing
        // it is how a receive that no message will match is retired.
        unsafe {
            ffi::MPI_Cancel(&mut self.bell.request);
            ffi::MPI_Wait(&mut self.bell.request, ffi::RSMPI_STATUS_IGNORE);
        }
        // SAFETY: our own duplicates, no longer used.
        unsafe {
            ffi::MPI_Comm_free(&mut self.agree_comm);
            ffi::MPI_Comm_free(&mut self.bell_comm);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_become_safe_points_at_the_measured_pace() {
        let mut pace = Pace::new();
        // Unmeasured: the floor, never a guess.
        assert_eq!(
            pace.safe_points_in(JOIN_SLACK, MIN_SLACK, MAX_SLACK),
            MIN_SLACK
        );
        // 1 ms iterations: 20 ms is twenty safe points.
        pace.per_safe_point_ns = 1_000_000;
        assert_eq!(pace.safe_points_in(JOIN_SLACK, MIN_SLACK, MAX_SLACK), 20);
        // Long iterations: the floor.
        pace.per_safe_point_ns = 50_000_000;
        assert_eq!(
            pace.safe_points_in(JOIN_SLACK, MIN_SLACK, MAX_SLACK),
            MIN_SLACK
        );
        assert_eq!(
            pace.safe_points_in(BELL_PERIOD, 1, MAX_SAFE_POINTS_PER_LOOK),
            2
        );
        // Very short ones are capped.
        pace.per_safe_point_ns = 10;
        assert_eq!(
            pace.safe_points_in(JOIN_SLACK, MIN_SLACK, MAX_SLACK),
            MAX_SLACK
        );
        assert_eq!(
            pace.safe_points_in(BELL_PERIOD, 1, MAX_SAFE_POINTS_PER_LOOK),
            MAX_SAFE_POINTS_PER_LOOK
        );
    }

    #[test]
    fn patience_grows_with_the_pace_and_the_attempt() {
        // 1 ms iterations: the floor.
        assert_eq!(patience(1_000_000, 0), MIN_PATIENCE);
        // 100 ms iterations: ten of them.
        assert_eq!(patience(100_000_000, 0), Duration::from_secs(1));
        // Fourfold per attempt, never past GIVE_UP.
        assert_eq!(patience(1_000_000, 1), MIN_PATIENCE * 4);
        assert_eq!(patience(1_000_000, 2), Duration::from_secs(4));
        assert_eq!(patience(100_000_000, 2), GIVE_UP);
        assert_eq!(patience(u64::MAX, 30), GIVE_UP);
    }

    #[test]
    fn the_first_slack_floor_grows_with_the_ranks() {
        assert_eq!(first_slack_floor(1), MIN_SLACK);
        assert_eq!(first_slack_floor(2), 6);
        assert_eq!(first_slack_floor(16), 18);
        assert_eq!(first_slack_floor(0), MIN_SLACK);
    }

    #[test]
    fn the_slack_floor_follows_what_the_last_join_needed() {
        // Joins seen complete one safe point after joining: the minimum.
        assert_eq!(slack_floor(1), MIN_SLACK);
        // Seven safe points: half as much again, plus one.
        assert_eq!(slack_floor(7), 11);
        // Never without bound.
        assert_eq!(slack_floor(u64::MAX / 2), MAX_SLACK);
    }

    #[test]
    fn a_look_measures_the_pace_and_schedules_the_next() {
        let mut pace = Pace::new();
        pace.last_look = Instant::now() - Duration::from_millis(10);
        pace.last_look_at = 0;
        pace.looked(10);
        // About 1 ms per safe point (the clock only adds): the next look
        // within a hundred.
        assert!(
            pace.per_safe_point_ns >= 1_000_000,
            "{}",
            pace.per_safe_point_ns
        );
        assert!((11..=110).contains(&pace.next_look), "{}", pace.next_look);
    }
}
