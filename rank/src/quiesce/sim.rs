//! N simulated ranks in one thread: an in-memory [`Collectives`] whose
//! allreduces complete once every rank has started them, a virtual clock,
//! and a scheduler that steps the ranks in an order the test chooses. No
//! MPI, no threads, no real time: a schedule runs the same way every time.
//!
//! What MPI would do wrong for a broken protocol, the simulation refuses
//! loudly: ranks starting different collectives at the same position (a
//! mismatch MPI leaves undefined) and a wait for a ring nobody sent (a hang
//! under MPI) both panic.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::agreement::{CallError, Collectives, Decision, InFlight, Progress, Quiesce, Reduce};

/// The virtual time one round of the scheduler takes: each running rank
/// calls one safe point (or polls once while it waits) per round.
pub(crate) const ROUND: Duration = Duration::from_millis(1);

/// One allreduce, as the ranks start it.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) reduce: Reduce,
    /// Each rank's words, once it has started the op.
    pub(crate) words: Vec<Option<Vec<u64>>>,
    /// Ranks that have not started it yet.
    missing: usize,
    /// The result, computed once the last rank starts it (so that a test
    /// costs nothing at thousands of ranks).
    done: Option<Vec<u64>>,
}

impl Op {
    /// The result, once every rank has started it.
    pub(crate) fn result(&self) -> Option<Vec<u64>> {
        self.done.clone()
    }

    fn reduce_all(&self) -> Option<Vec<u64>> {
        let all: Vec<&Vec<u64>> = self
            .words
            .iter()
            .map(Option::as_ref)
            .collect::<Option<_>>()?;
        let len = all[0].len();
        Some(
            (0..len)
                .map(|i| {
                    let column = all.iter().map(|words| words[i]);
                    match self.reduce {
                        Reduce::Max => column.max().unwrap_or(0),
                        Reduce::Sum => column.sum(),
                    }
                })
                .collect(),
        )
    }
}

/// What the ranks share.
#[derive(Debug)]
pub(crate) struct World {
    ranks: usize,
    start: Instant,
    /// Virtual time since `start`.
    elapsed: Duration,
    /// The agreements' allreduces in the order they were started (the same
    /// on every rank).
    pub(crate) ops: Vec<Op>,
    /// Rings sent to each rank and not yet received.
    pub(crate) mailbox: Vec<u64>,
    /// What each rank's probe finds.
    pub(crate) in_flight: Vec<Option<InFlight>>,
    /// Tests a rank needs, after an allreduce completed, to see it complete
    /// (a rank whose MPI progress is slow).
    pub(crate) lag: Vec<u32>,
}

impl World {
    fn now(&self) -> Instant {
        self.start + self.elapsed
    }
}

/// One rank's view of the [`World`].
pub(crate) struct SimNet {
    world: Rc<RefCell<World>>,
    rank: usize,
    /// Agreement allreduces this rank has started.
    started: usize,
    /// The bell took a ring that is not yet collected.
    rung: bool,
}

/// A started allreduce: its position, and the tests still to fail after it
/// completed.
#[derive(Debug)]
pub(crate) struct SimPending {
    index: usize,
    lag: u32,
}

/// Starts this rank's part of the `index`th allreduce of `ops`, checking
/// that every rank starts it alike.
fn start_op(
    ops: &mut Vec<Op>,
    ranks: usize,
    rank: usize,
    index: usize,
    reduce: Reduce,
    words: &[u64],
) {
    if ops.len() == index {
        ops.push(Op {
            reduce,
            words: vec![None; ranks],
            missing: ranks,
            done: None,
        });
    }
    let op = &mut ops[index];
    assert_eq!(
        op.reduce, reduce,
        "rank {rank} started allreduce {index} as {reduce:?}, another rank as {:?}",
        op.reduce
    );
    if let Some(other) = op.words.iter().flatten().next() {
        assert_eq!(
            other.len(),
            words.len(),
            "rank {rank} started allreduce {index} with {} words, another with {}",
            words.len(),
            other.len()
        );
    }
    op.words[rank] = Some(words.to_vec());
    op.missing -= 1;
    if op.missing == 0 {
        op.done = op.reduce_all();
    }
}

impl Collectives for SimNet {
    type Pending<const N: usize> = SimPending;

    fn start<const N: usize>(
        &mut self,
        reduce: Reduce,
        words: [u64; N],
    ) -> Result<SimPending, CallError> {
        let mut world = self.world.borrow_mut();
        let index = self.started;
        self.started += 1;
        let ranks = world.ranks;
        start_op(&mut world.ops, ranks, self.rank, index, reduce, &words);
        let lag = world.lag[self.rank];
        Ok(SimPending { index, lag })
    }

    fn test<const N: usize>(
        &mut self,
        pending: &mut SimPending,
    ) -> Result<Option<[u64; N]>, CallError> {
        let world = self.world.borrow();
        let ops = &world.ops;
        let Some(result) = ops[pending.index].done.as_ref() else {
            return Ok(None);
        };
        if pending.lag > 0 {
            pending.lag -= 1;
            return Ok(None);
        }
        Ok(Some(result.clone().try_into().unwrap_or_else(|_| {
            panic!("allreduce {} is not of {N} words", pending.index)
        })))
    }

    fn probe(&mut self) -> Result<Option<InFlight>, CallError> {
        Ok(self.world.borrow().in_flight[self.rank])
    }

    fn ring(&mut self) -> Result<(), CallError> {
        let mut world = self.world.borrow_mut();
        for peer in (0..world.ranks).filter(|peer| *peer != self.rank) {
            world.mailbox[peer] += 1;
        }
        Ok(())
    }

    fn bell_rang(&mut self) -> Result<bool, CallError> {
        if self.rung {
            return Ok(false);
        }
        let mut world = self.world.borrow_mut();
        if world.mailbox[self.rank] == 0 {
            return Ok(false);
        }
        world.mailbox[self.rank] -= 1;
        self.rung = true;
        Ok(true)
    }

    fn collect_rings(&mut self, mut rings: u64) -> Result<(), CallError> {
        let mut world = self.world.borrow_mut();
        let rank = self.rank;
        let take = |world: &mut World| {
            assert!(
                world.mailbox[rank] > 0,
                "rank {rank} would wait forever for a ring nobody sent"
            );
            world.mailbox[rank] -= 1;
        };
        if rings > 0 && !self.rung {
            take(&mut world);
            self.rung = true;
        }
        if self.rung {
            rings = rings.saturating_sub(1);
        }
        for _ in 0..rings {
            take(&mut world);
        }
        self.rung = false;
        Ok(())
    }

    fn now(&self) -> Instant {
        self.world.borrow().now()
    }
}

/// Where a simulated rank is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Computing: its next step is a safe point.
    Computing,
    /// Inside a safe point, waiting: its next step is a poll.
    Waiting,
    /// In `finalize`: its steps are the final agreement's polls.
    Leaving,
    /// Out of its loop, the final agreement done.
    Gone,
}

/// What happened to a rank: the decisions it got, each with the safe point
/// it was at.
pub(crate) struct SimRank {
    pub(crate) q: Quiesce<SimNet>,
    pub(crate) mode: Mode,
    /// The epoch its agent's flag shows (0: none).
    pub(crate) flag: u64,
    /// Not scheduled (descheduled, or blocked in the application's
    /// communication) until this round.
    pub(crate) stalled_until: u64,
    pub(crate) decisions: Vec<(u64, Decision)>,
    /// The safe point at which it started each allreduce.
    pub(crate) starts: Vec<u64>,
}

impl SimRank {
    /// Notes the safe point of the agreements' allreduces started since
    /// `before`.
    fn record_starts(&mut self, before: usize) {
        let counter = self.q.counter();
        let now = self.q.net_mut().started;
        self.starts.extend((before..now).map(|_| counter));
    }
}

/// The ranks and their world.
pub(crate) struct Sim {
    pub(crate) world: Rc<RefCell<World>>,
    pub(crate) ranks: Vec<SimRank>,
    /// Rounds so far.
    pub(crate) round: u64,
    /// The order ranks are stepped in, per round (default: 0, 1, 2, …).
    pub(crate) order: Box<dyn FnMut(u64, usize) -> Vec<usize>>,
    /// The virtual time a round takes (default [`ROUND`]): the ranks' pace.
    pub(crate) round_time: Duration,
    /// A coupled code (default false): the application's own collective
    /// after each safe point holds a rank until every rank has left that
    /// safe point, so a rank waiting inside one holds all the others. (A
    /// rank that left its loop would hold them for good: not for schedules
    /// that finalize ranks.)
    pub(crate) coupled: bool,
}

impl Sim {
    /// `ranks` ranks, with `CRYO_QUIESCE_SLACK` set to `fixed_slack`.
    pub(crate) fn new(ranks: usize, fixed_slack: Option<u64>) -> Sim {
        let world = Rc::new(RefCell::new(World {
            ranks,
            start: Instant::now(),
            elapsed: Duration::ZERO,
            ops: Vec::new(),
            mailbox: vec![0; ranks],
            in_flight: vec![None; ranks],
            lag: vec![0; ranks],
        }));
        let ranks = (0..ranks)
            .map(|rank| SimRank {
                q: Quiesce::new(
                    SimNet {
                        world: Rc::clone(&world),
                        rank,
                        started: 0,
                        rung: false,
                    },
                    i32::try_from(rank).unwrap_or(i32::MAX),
                    fixed_slack,
                ),
                mode: Mode::Computing,
                flag: 0,
                stalled_until: 0,
                decisions: Vec::new(),
                starts: Vec::new(),
            })
            .collect();
        Sim {
            world,
            ranks,
            round: 0,
            order: Box::new(|_, n| (0..n).collect()),
            round_time: ROUND,
            coupled: false,
        }
    }

    /// One step of `rank`: a safe point, or a poll if it waits inside one.
    pub(crate) fn step(&mut self, rank: usize) {
        let r = &mut self.ranks[rank];
        let started = r.q.net_mut().started;
        let progress = match r.mode {
            Mode::Computing => r.q.safe_point(r.flag),
            Mode::Waiting => r.q.poll(),
            Mode::Leaving => r.q.poll(),
            Mode::Gone => return,
        }
        .unwrap_or_else(|err| panic!("rank {rank}: {err}"));
        r.record_starts(started);
        let leaving = r.mode == Mode::Leaving;
        r.mode = match (&progress, leaving) {
            (Progress::Wait, true) => Mode::Leaving,
            (_, true) => Mode::Gone,
            (Progress::Wait, false) => Mode::Waiting,
            _ => Mode::Computing,
        };
        if let Progress::Decided(decision) = progress {
            // The agent's flag is taken down once the rank parks or
            // refuses (as `park_decided` and `refuse` do).
            if let Decision::Park(epoch) | Decision::Refuse(epoch, _) = decision {
                if r.flag == epoch {
                    r.flag = 0;
                }
            }
            r.decisions.push((r.q.counter(), decision));
        }
    }

    /// `rank` leaves its loop: `finalize` starts (or finishes) its final
    /// agreement; it is then polled each round until that is done.
    pub(crate) fn finalize(&mut self, rank: usize) {
        let r = &mut self.ranks[rank];
        assert_eq!(
            r.mode,
            Mode::Computing,
            "rank {rank} finalizes from a safe point"
        );
        let started = r.q.net_mut().started;
        let progress =
            r.q.leave()
                .unwrap_or_else(|err| panic!("rank {rank}: {err}"));
        r.record_starts(started);
        r.mode = if progress == Progress::Wait {
            Mode::Leaving
        } else {
            Mode::Gone
        };
        if let Progress::Decided(decision) = progress {
            r.decisions.push((r.q.counter(), decision));
        }
    }

    /// One round: every rank that is not stalled takes one step, in the
    /// chosen order; then the clock moves on by `round_time`. `after` runs
    /// after each step, so that a test can act between two ranks' steps.
    pub(crate) fn round_with(&mut self, after: &mut dyn FnMut(&mut Sim, usize)) {
        self.round += 1;
        self.world.borrow_mut().elapsed += self.round_time;
        let order = (self.order)(self.round, self.ranks.len());
        for rank in order {
            if self.ranks[rank].stalled_until <= self.round && !self.held(rank) {
                self.step(rank);
                after(self, rank);
            }
        }
    }

    /// Whether a coupled code's collective holds `rank` after its safe
    /// point: a peer has not reached that safe point, or waits inside it.
    fn held(&self, rank: usize) -> bool {
        let r = &self.ranks[rank];
        if !self.coupled || r.mode != Mode::Computing {
            return false;
        }
        let at = r.q.counter();
        self.ranks.iter().any(|peer| {
            let peer_at = peer.q.counter();
            peer_at < at || (peer_at == at && peer.mode == Mode::Waiting)
        })
    }

    /// `rounds` rounds.
    pub(crate) fn run(&mut self, rounds: u64) {
        for _ in 0..rounds {
            self.round_with(&mut |_, _| {});
        }
    }

    /// Rounds until `done` holds, checked after every step (the round in
    /// which it first holds is finished); panics after `limit` rounds.
    pub(crate) fn run_until(&mut self, limit: u64, mut done: impl FnMut(&Sim) -> bool) {
        let mut reached = false;
        for _ in 0..limit {
            self.round_with(&mut |sim, _| reached = reached || done(sim));
            if reached {
                return;
            }
        }
        panic!("not reached within {limit} rounds");
    }

    /// Rounds until every rank has got a decision since `before` each
    /// (its number of decisions then).
    pub(crate) fn run_until_decided(&mut self, limit: u64) {
        let before: Vec<usize> = self.ranks.iter().map(|r| r.decisions.len()).collect();
        self.run_until(limit, |sim| {
            sim.ranks
                .iter()
                .zip(&before)
                .all(|(r, before)| r.decisions.len() > *before)
        });
    }

    /// Raises `epoch` on the flags of `ranks` (their agents' requests).
    pub(crate) fn raise(&mut self, epoch: u64, ranks: &[usize]) {
        for &rank in ranks {
            self.ranks[rank].flag = epoch;
        }
    }

    /// Keeps `rank` from running for `rounds` rounds from now.
    pub(crate) fn stall(&mut self, rank: usize, rounds: u64) {
        self.ranks[rank].stalled_until = self.round + rounds + 1;
    }

    /// Each rank's last decision.
    pub(crate) fn last_decisions(&self) -> Vec<(u64, Decision)> {
        self.ranks
            .iter()
            .enumerate()
            .map(|(rank, r)| {
                r.decisions
                    .last()
                    .cloned()
                    .unwrap_or_else(|| panic!("rank {rank} decided nothing"))
            })
            .collect()
    }

    /// The result of every allreduce so far, in order.
    pub(crate) fn results(&self) -> Vec<Option<Vec<u64>>> {
        self.world.borrow().ops.iter().map(Op::result).collect()
    }

    /// What each rank contributed to allreduce `index`.
    pub(crate) fn words(&self, index: usize) -> Vec<Vec<u64>> {
        let world = self.world.borrow();
        world.ops[index]
            .words
            .iter()
            .map(|words| words.clone().unwrap_or_default())
            .collect()
    }

    /// Every ring sent has been received, and every allreduce started has
    /// completed (nothing is left behind for the next agreement).
    pub(crate) fn assert_quiet(&self) {
        let world = self.world.borrow();
        assert!(
            world.mailbox.iter().all(|rings| *rings == 0),
            "rings left unreceived: {:?}",
            world.mailbox
        );
        for (index, op) in world.ops.iter().enumerate() {
            assert!(
                op.result().is_some(),
                "allreduce {index} incomplete: {op:?}"
            );
        }
    }
}
