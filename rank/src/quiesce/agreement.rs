//! The agreement as a state machine: what a rank starts at each safe point
//! and what the sums it gets back mean. It calls no MPI: it drives a
//! [`Collectives`], the MPI binding in `mpi.rs` or the simulated ranks of
//! the unit tests.
//!
//! A rank's side of the protocol is a [`Quiesce`]. The driver calls
//! [`Quiesce::safe_point`] at each safe point, and then [`Quiesce::poll`]
//! for as long as the answer is [`Progress::Wait`] (the rank stays inside
//! that safe point); [`Quiesce::leave`] when the rank leaves its loop.
//! Waiting is the driver's: the machine never blocks.

use std::time::{Duration, Instant};

pub(crate) use super::collectives::{CallError, Collectives, InFlight, Reduce};
pub(crate) use super::decision::{Decision, Progress, Refusal};
use super::pace::{
    cap_patience, catch_up_patience, check_patience, patience, Pace, JOIN_SLACK, MAX_SLACK,
    MIN_SLACK,
};

/// Attempts per epoch: after a rank passed the target, the ranks join again
/// with four times the slack; after this many, they refuse the epoch.
pub const MAX_ATTEMPTS: u32 = 3;

/// How long a join may stay incomplete before the rank rings its peers.
/// Agents that are merely slower than the others raise their flags within
/// this time and no message is sent.
pub const RING_AFTER: Duration = Duration::from_millis(50);

/// A cap (and so a target) that no safe point reaches: a rank that has left
/// its loop takes part in an agreement without ever parking in it.
const NEVER: u64 = u64::MAX;

/// What agreements cost this rank, logged when it detaches.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) agreements: u64,
    pub(crate) joined_by_ring: u64,
    pub(crate) rings: u64,
    pub(crate) retries: u64,
    pub(crate) target_waits: u64,
    pub(crate) target_wait: Duration,
    pub(crate) cap_waits: u64,
    pub(crate) cap_wait: Duration,
}

/// Where a rank stands in an agreement.
enum Step<C: Collectives> {
    /// Join started: [epoch, target, !lowest safe point, slowest pace] to
    /// come.
    Joining { join: C::Pending<4>, since: Instant },
    /// The target is known and not reached yet.
    Heading,
    /// Arrive started: [a rank is not at the target] to come.
    Arriving { arrive: C::Pending<1> },
    /// Check started: [in flight, not at the target, rang, leaving].
    /// `everyone_there`: the arrive found every rank at the target, this
    /// one included.
    Checking {
        check: C::Pending<4>,
        in_flight: Option<InFlight>,
        everyone_there: bool,
    },
}

/// One agreement in progress.
struct Agreement<C: Collectives> {
    /// This rank's epoch until the join completes, then the agreed one.
    epoch: u64,
    /// This rank's cap: the target is here or later.
    cap: u64,
    /// Waited at the cap for the join as long as its patience allowed.
    left_cap: bool,
    target: u64,
    /// The lowest safe point any rank was at when it joined, and the
    /// slowest rank's time per safe point then (0: unmeasured): how long
    /// the furthest behind may take to reach the target.
    lowest: u64,
    slowest_ns: u64,
    /// 0 for the first agreement of an epoch.
    attempt: u32,
    /// Waiting at the target (it said so in the arrive step).
    at_target: bool,
    /// When the current wait (at the cap or the target) began.
    waiting_since: Option<Instant>,
    rang: bool,
    step: Step<C>,
}

/// One rank's side of the quiesce protocol.
pub(crate) struct Quiesce<C: Collectives> {
    net: C,
    rank: i32,
    /// Safe points so far.
    counter: u64,
    pace: Pace,
    agreement: Option<Agreement<C>>,
    /// The newest epoch an agreement ended for: a flag still showing it (an
    /// agent's late raise) is not a new request.
    last_decided: u64,
    /// `CRYO_QUIESCE_SLACK`, when set to a number.
    fixed_slack: Option<u64>,
    /// Leaving its loop: no more safe points will come.
    leaving: bool,
    /// An agreement ended with a rank leaving: that rank takes part in no
    /// further agreement, so none is started.
    ended: bool,
    /// Collectives started so far (a new one is a new wait for the driver).
    started: u64,
    stats: Stats,
}

/// How a step completed, or did not, at this call.
enum Settled<const N: usize> {
    Done([u64; N]),
    /// Not yet: compute on.
    Pending,
    /// Not yet: stay in the safe point.
    Wait,
}

impl<C: Collectives> Quiesce<C> {
    /// Rank `rank`, with `CRYO_QUIESCE_SLACK`'s number if set.
    pub(crate) fn new(net: C, rank: i32, fixed_slack: Option<u64>) -> Self {
        let pace = Pace::new(net.now());
        Quiesce {
            net,
            rank,
            counter: 0,
            pace,
            agreement: None,
            last_decided: 0,
            fixed_slack,
            leaving: false,
            ended: false,
            started: 0,
            stats: Stats::default(),
        }
    }

    /// This rank in the communicator.
    pub(crate) fn rank(&self) -> i32 {
        self.rank
    }

    /// Collectives started so far.
    pub(crate) fn started(&self) -> u64 {
        self.started
    }

    /// The binding, e.g. to close it once the rank has left.
    pub(crate) fn net_mut(&mut self) -> &mut C {
        &mut self.net
    }

    /// A safe point. `requested` is the epoch the rank's flag shows (0 for
    /// none). With nothing requested and no ring to look for, this is a
    /// counter increment and two comparisons.
    pub(crate) fn safe_point(&mut self, requested: u64) -> Result<Progress, CallError> {
        self.counter += 1;
        if self.ended {
            return Ok(Progress::Continue);
        }
        if self.agreement.is_none() {
            let epoch = if requested > self.last_decided {
                requested
            } else if self.counter >= self.pace.next_look {
                self.pace.looked(self.counter, self.net.now());
                if !self.net.bell_rang()? {
                    return Ok(Progress::Continue);
                }
                self.stats.joined_by_ring += 1;
                // A ring carries no epoch: the join's MAX brings the ringer's.
                0
            } else {
                return Ok(Progress::Continue);
            };
            self.join(epoch, 0)?;
        }
        self.poll()
    }

    /// Leaves the protocol: finishes the agreement in progress, or starts
    /// one, with a cap no safe point reaches, so that every rank ends with
    /// the same collectives. Poll on while the answer is
    /// [`Progress::Wait`]: the other ranks complete the steps from their
    /// safe points (a ring reaches those whose agent raised nothing) or
    /// their own `leave`.
    pub(crate) fn leave(&mut self) -> Result<Progress, CallError> {
        self.leaving = true;
        if self.ended {
            return self.poll();
        }
        if self.agreement.is_none() {
            self.join(0, 0)?;
        }
        self.poll()
    }

    /// Starts this rank's part of an agreement: the epoch it knows of and
    /// the safe point it can promise not to pass before learning the target.
    fn join(&mut self, epoch: u64, attempt: u32) -> Result<(), CallError> {
        let now = self.net.now();
        let cap = if self.leaving {
            NEVER
        } else {
            // The pace since the last look: fresh, even if the application
            // has slowed down since it was last measured.
            self.pace.measure(self.counter, now);
            let slack = self
                .fixed_slack
                .unwrap_or_else(|| self.pace.safe_points_in(JOIN_SLACK, MIN_SLACK, MAX_SLACK));
            self.counter.saturating_add(slack << (2 * attempt))
        };
        // MAX of the complement is the complement of the lowest.
        let join = self.net.start(
            Reduce::Max,
            [epoch, cap, !self.counter, self.pace.per_safe_point_ns],
        )?;
        self.started += 1;
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
            cap,
            left_cap: false,
            target: NEVER,
            lowest: 0,
            slowest_ns: 0,
            attempt,
            at_target: false,
            waiting_since: None,
            rang: false,
            step: Step::Joining { join, since: now },
        });
        Ok(())
    }

    /// Takes the agreement as far as it can go at this safe point.
    pub(crate) fn poll(&mut self) -> Result<Progress, CallError> {
        if self.ended {
            return Ok(Progress::Continue);
        }
        loop {
            let Some(agreement) = self.agreement.as_mut() else {
                return Ok(Progress::Continue);
            };
            let step_patience = patience(self.pace.per_safe_point_ns, agreement.attempt);
            let how = Settle {
                leaving: self.leaving,
                patience: match agreement.step {
                    Step::Joining { .. } => {
                        cap_patience(self.pace.per_safe_point_ns, step_patience)
                    }
                    Step::Checking { everyone_there, .. } => {
                        check_patience(step_patience, everyone_there)
                    }
                    // Ranks that compute apart (halves of the job that
                    // couple seldom) may join far apart: the furthest
                    // behind is waited for as long as it needs, within
                    // bounds, in the first attempt. One that did not come
                    // then is held by the ranks waiting for it (ranks that
                    // call the safe point unequally often in a coupled
                    // loop), and waiting as long again would only stall
                    // the job.
                    Step::Arriving { .. } if agreement.attempt == 0 => {
                        step_patience.max(catch_up_patience(
                            agreement.target.saturating_sub(agreement.lowest),
                            agreement.slowest_ns,
                        ))
                    }
                    Step::Arriving { .. } => step_patience,
                    Step::Heading => step_patience,
                },
                rank: self.rank,
                safe_point: self.counter,
            };
            match &mut agreement.step {
                Step::Joining { join, since } => {
                    // At its cap a rank knows the target is this safe point
                    // or a later one: it waits here for the join rather
                    // than pass the target unknowing (which costs a retry
                    // with four times the slack). The others are heading
                    // here, and those waiting drive the join with every
                    // poll. A fixed slack is taken as given.
                    let mut at_cap = self.fixed_slack.is_none()
                        && !agreement.left_cap
                        && self.counter >= agreement.cap;
                    let was_at_cap = at_cap;
                    let settled = settle(
                        &mut self.net,
                        join,
                        Place::Cap,
                        &mut at_cap,
                        &mut agreement.waiting_since,
                        &how,
                        &mut self.stats,
                    )?;
                    let [epoch, target, not_lowest, slowest_ns] = match settled {
                        Settled::Done(words) => words,
                        Settled::Pending | Settled::Wait => {
                            agreement.left_cap |= was_at_cap && !at_cap;
                            let since = *since;
                            if !agreement.rang
                                && self.net.now().saturating_duration_since(since) >= RING_AFTER
                            {
                                self.net.ring()?;
                                agreement.rang = true;
                                self.stats.rings += 1;
                                tracing::debug!(
                                    rank = self.rank,
                                    epoch = agreement.epoch,
                                    safe_point = self.counter,
                                    "quiesce.rang"
                                );
                            }
                            return Ok(match settled {
                                Settled::Wait => Progress::Wait,
                                _ => Progress::Continue,
                            });
                        }
                    };
                    // The target is the latest joiner's cap.
                    agreement.epoch = epoch;
                    agreement.target = target;
                    agreement.lowest = !not_lowest;
                    agreement.slowest_ns = slowest_ns;
                    agreement.step = Step::Heading;
                }
                Step::Heading => {
                    let unreachable = self.leaving || agreement.target == NEVER;
                    if !unreachable && self.counter < agreement.target {
                        return Ok(Progress::Continue);
                    }
                    agreement.at_target = !unreachable && self.counter == agreement.target;
                    if agreement.at_target {
                        self.net.at_target(agreement.epoch);
                    }
                    if !agreement.at_target && !unreachable {
                        tracing::debug!(
                            rank = self.rank,
                            epoch = agreement.epoch,
                            target = agreement.target,
                            safe_point = self.counter,
                            "quiesce.passed_target"
                        );
                    }
                    let arrive = self
                        .net
                        .start(Reduce::Max, [u64::from(!agreement.at_target)])?;
                    self.started += 1;
                    agreement.step = Step::Arriving { arrive };
                }
                Step::Arriving { arrive } => {
                    let [missing] = match settle(
                        &mut self.net,
                        arrive,
                        Place::Target,
                        &mut agreement.at_target,
                        &mut agreement.waiting_since,
                        &how,
                        &mut self.stats,
                    )? {
                        Settled::Done(words) => words,
                        Settled::Pending => return Ok(Progress::Continue),
                        Settled::Wait => return Ok(Progress::Wait),
                    };
                    let everyone_there = missing == 0 && agreement.at_target;
                    let in_flight = if everyone_there {
                        self.net.probe()?
                    } else {
                        None
                    };
                    let check = self.net.start(
                        Reduce::Sum,
                        [
                            u64::from(in_flight.is_some()),
                            u64::from(!everyone_there),
                            u64::from(agreement.rang),
                            u64::from(self.leaving),
                        ],
                    )?;
                    self.started += 1;
                    agreement.step = Step::Checking {
                        check,
                        in_flight,
                        everyone_there,
                    };
                }
                Step::Checking {
                    check, in_flight, ..
                } => {
                    let [in_flight_ranks, missing, rang, leaving] = match settle(
                        &mut self.net,
                        check,
                        Place::Target,
                        &mut agreement.at_target,
                        &mut agreement.waiting_since,
                        &how,
                        &mut self.stats,
                    )? {
                        Settled::Done(words) => words,
                        Settled::Pending => return Ok(Progress::Continue),
                        Settled::Wait => return Ok(Progress::Wait),
                    };
                    let in_flight = in_flight.take();
                    let (epoch, attempt, at_target, own_ring) = (
                        agreement.epoch,
                        agreement.attempt,
                        agreement.at_target,
                        agreement.rang,
                    );
                    let (behind, slowest_ns) = if agreement.target == NEVER {
                        (0, 0)
                    } else {
                        let behind = agreement.target.saturating_sub(agreement.lowest);
                        (behind, agreement.slowest_ns)
                    };
                    self.agreement = None;
                    self.net.collect_rings(rang - u64::from(own_ring))?;
                    self.pace.restart(self.counter, self.net.now());
                    let decision = if leaving > 0 {
                        self.ended = true;
                        Decision::ComputeOn
                    } else if in_flight_ranks > 0 {
                        // Only the ranks that saw a message refuse, naming
                        // it: the first refusal aborts the epoch, so it must
                        // be the one that says what was in flight. The others
                        // compute on and their agents release nothing.
                        match in_flight {
                            Some(message) => Decision::Refuse(
                                epoch,
                                Refusal::InFlight {
                                    rank: self.rank,
                                    message,
                                },
                            ),
                            None => Decision::ComputeOn,
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
                            Refusal::Missed {
                                missed: missing,
                                behind,
                                slowest_ns,
                            },
                        )
                    } else if at_target {
                        Decision::Park(epoch)
                    } else {
                        // This rank left the target after the others were
                        // all there; they park, and this refusal aborts the
                        // epoch so that they are released at once.
                        Decision::Refuse(
                            epoch,
                            Refusal::LeftTarget {
                                rank: self.rank,
                                waited: how.patience,
                            },
                        )
                    };
                    self.last_decided = self.last_decided.max(epoch);
                    return Ok(Progress::Decided(decision));
                }
            }
        }
    }

    /// Logs what agreements cost this rank (`quiesce.summary`).
    pub(crate) fn log_summary(&self) {
        tracing::debug!(
            rank = self.rank,
            safe_points = self.counter,
            agreements = self.stats.agreements,
            joined_by_ring = self.stats.joined_by_ring,
            rings = self.stats.rings,
            retries = self.stats.retries,
            target_waits = self.stats.target_waits,
            target_wait_ms = self.stats.target_wait.as_secs_f64() * 1e3,
            cap_waits = self.stats.cap_waits,
            cap_wait_ms = self.stats.cap_wait.as_secs_f64() * 1e3,
            "quiesce.summary"
        );
    }

    /// What agreements cost this rank so far.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Safe points so far.
    #[cfg(test)]
    pub(crate) fn counter(&self) -> u64 {
        self.counter
    }

    /// The agreed target, once this rank has seen the join complete.
    #[cfg(test)]
    pub(crate) fn target(&self) -> Option<u64> {
        self.agreement
            .as_ref()
            .filter(|agreement| !matches!(agreement.step, Step::Joining { .. }))
            .map(|agreement| agreement.target)
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

/// Where a rank may wait for a step to complete.
#[derive(Clone, Copy)]
enum Place {
    /// Its cap, for the join: the target is there or later.
    Cap,
    /// The target, for the arrive and the check.
    Target,
}

impl Place {
    fn name(self) -> &'static str {
        match self {
            Place::Cap => "cap",
            Place::Target => "target",
        }
    }
}

/// Completes a step: a rank at `place` waits (see [`patience`]), a leaving
/// rank waits as long as it takes, any other rank tests once and goes on. A
/// rank that has waited long enough leaves `place` (`waiting` becomes
/// false: a peer may be blocked on it) and computes on.
fn settle<C: Collectives, const N: usize>(
    net: &mut C,
    collective: &mut C::Pending<N>,
    place: Place,
    waiting: &mut bool,
    waiting_since: &mut Option<Instant>,
    how: &Settle,
    stats: &mut Stats,
) -> Result<Settled<N>, CallError> {
    if how.leaving {
        return Ok(match net.test(collective)? {
            Some(words) => Settled::Done(words),
            None => Settled::Wait,
        });
    }
    if !*waiting {
        return Ok(match net.test(collective)? {
            Some(words) => Settled::Done(words),
            None => Settled::Pending,
        });
    }
    let started = *waiting_since.get_or_insert_with(|| net.now());
    let done = net.test(collective)?;
    let waited = net.now().saturating_duration_since(started);
    if done.is_none() && waited < how.patience {
        return Ok(Settled::Wait);
    }
    *waiting_since = None;
    match place {
        Place::Cap => {
            stats.cap_waits += 1;
            stats.cap_wait += waited;
        }
        Place::Target => {
            stats.target_waits += 1;
            stats.target_wait += waited;
        }
    }
    match done {
        Some(words) => Ok(Settled::Done(words)),
        None => {
            *waiting = false;
            tracing::info!(
                rank = how.rank,
                safe_point = how.safe_point,
                place = place.name(),
                waited_ms = waited.as_millis(),
                "quiesce.left_waiting"
            );
            Ok(Settled::Pending)
        }
    }
}
