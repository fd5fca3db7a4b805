//! The calibrations: one-word allreduces that every rank starts at the same
//! agreed safe points (the first at safe point 1, followed at once by a
//! second because the ranks' start may slow the first, each next one about
//! [`CALIBRATION_PERIOD`] later, at the MAX of the ranks' proposals). The
//! safe points one takes to complete say how many a join needs with this
//! application's MPI calls driving it, so the slack follows the
//! application's current phase (an uncoupled start, then a coupled loop)
//! instead of a guess from the number of ranks or a stale measurement.
//!
//! They run on a communicator of their own: a rank starts none during an
//! agreement, so calibrations and agreements are not started in the same
//! order on every rank. The count a rank brings to a join is therefore the
//! count it has when that agreement ends. After the final agreement (a rank
//! left its loop) no rank starts one of its own: each starts dummy ones up
//! to the most any rank brought to that join ([`Calibration::close`]), so
//! that every rank has started the same calibrations, whatever safe point
//! it left at, and a leaving rank waits for them before its communicators
//! are freed.

use super::agreement::{CallError, Collectives};
use super::pace::{Pace, CALIBRATION_PERIOD, MAX_CALIBRATION_GAP, MIN_CALIBRATION_GAP};

/// Safe points after a calibration's due one at which it is tested at
/// every safe point; later, at a quarter of the distance so far.
const EVERY_SAFE_POINT: u64 = 8;

/// How many safe points apart a calibration `since` safe points past its
/// due one is tested: a quarter of `since`, rounded down to a power of two.
fn test_spacing(since: u64) -> u64 {
    let below = 1u64 << (63 - since.max(1).leading_zeros());
    (below / 4).max(1)
}

/// One rank's calibrations.
pub(crate) struct Calibration<C: Collectives> {
    /// The one in flight, with the safe point it was due at.
    pending: Option<(C::Pending<1>, u64)>,
    /// The agreed safe point of the next one.
    next_at: u64,
    /// Calibrations started so far.
    started: u64,
    /// Calibrations completed so far.
    done: u64,
    /// After the final agreement: the number every rank starts.
    closing: Option<u64>,
}

impl<C: Collectives> Calibration<C> {
    /// None yet: the first is due at safe point 1.
    pub(crate) fn new() -> Self {
        Calibration {
            pending: None,
            next_at: 1,
            started: 0,
            done: 0,
            closing: None,
        }
    }

    /// Calibrations started so far.
    pub(crate) fn started(&self) -> u64 {
        self.started
    }

    /// Calibrations completed so far.
    pub(crate) fn done(&self) -> u64 {
        self.done
    }

    /// Whether the first is in flight: no floor has been measured yet.
    pub(crate) fn first_pending(&self) -> bool {
        self.done == 0 && self.pending.is_some()
    }

    /// Whether one is due at safe point `counter` (cheap: one comparison).
    pub(crate) fn due(&self, counter: u64) -> bool {
        counter >= self.next_at && self.closing.is_none()
    }

    /// Whether this rank still owes one: one in flight, or, after the
    /// final agreement, one the others started.
    pub(crate) fn owed(&self) -> bool {
        self.pending.is_some() || self.closing.is_some_and(|count| self.started < count)
    }

    /// The final agreement ended: every rank brings its count up to
    /// `count`, and none starts one of its own.
    pub(crate) fn close(&mut self, count: u64) {
        self.closing = Some(count);
    }

    /// At safe point `counter`: tests the one in flight once, and starts the
    /// next one if it is due (and `may_start`: no agreement is under way
    /// and the rank is not leaving) or owed after the final agreement. A
    /// `leaving` rank waits for it, so it tests at every call.
    /// Returns the safe points a completed one took from the safe point it
    /// was due at.
    pub(crate) fn drive(
        &mut self,
        net: &mut C,
        counter: u64,
        pace: &mut Pace,
        may_start: bool,
        leaving: bool,
    ) -> Result<Option<u64>, CallError> {
        let mut measured = None;
        if let Some((pending, due_at)) = self.pending.as_mut() {
            // A test costs several µs of MPI progress, and with more ranks
            // than cores it may give the core away. Where the application's
            // own MPI calls drive the allreduce it completes within a few
            // safe points, all tested; past those (ranks that compute
            // apart) it is tested every quarter of the safe points so far,
            // which bounds the tests of one calibration by a logarithm and
            // overstates what it took by at most a quarter. A rank that is
            // leaving, or owes it after the final agreement, tests always.
            let since = counter.saturating_sub(*due_at);
            let look = since < EVERY_SAFE_POINT || since % test_spacing(since) == 0;
            if !look && !leaving && self.closing.is_none() {
                return Ok(None);
            }
            let Some([next_at]) = net.test(pending)? else {
                return Ok(None);
            };
            let due_at = *due_at;
            self.pending = None;
            self.done += 1;
            if self.closing.is_none() {
                self.next_at = next_at;
                measured = Some(counter.saturating_sub(due_at).max(1));
            }
        }
        match self.closing {
            Some(count) if self.started < count => {
                self.pending = Some((net.start_calibration([0])?, counter));
                self.started += 1;
            }
            None if may_start && counter >= self.next_at => {
                pace.measure(counter, net.now());
                let gap = pace.safe_points_in(
                    CALIBRATION_PERIOD,
                    MIN_CALIBRATION_GAP,
                    MAX_CALIBRATION_GAP,
                );
                // Each rank proposes the next one's safe point; the MAX is
                // the one all of them use. The first is followed at once:
                // the ranks' start may slow it, and it only bounds the
                // floor.
                let gap = if self.started == 0 { 1 } else { gap };
                let proposal = counter.saturating_add(gap);
                self.pending = Some((net.start_calibration([proposal])?, self.next_at));
                self.started += 1;
            }
            _ => {}
        }
        Ok(measured)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::agreement::Decision;
    use super::super::sim::{Mode, Sim};

    /// Ranks that run 200 ms per safe point: the time-based join slack is
    /// no safe point at all, so the floor is all the slack there is.
    fn long_iterations(ranks: usize) -> Sim {
        let mut sim = Sim::new(ranks, None);
        sim.round_time = Duration::from_millis(200);
        sim
    }

    /// Every calibration every rank started has completed, and every rank
    /// started the same number.
    fn assert_calibrations_complete(sim: &Sim) {
        let world = sim.world.borrow();
        for (index, op) in world.calibrations.iter().enumerate() {
            assert!(
                op.result().is_some(),
                "calibration {index} incomplete: {op:?}"
            );
        }
    }

    /// Raises `epoch` on every rank's flag: each sees it at its next safe
    /// point, and all park two safe points after the latest of those.
    fn assert_the_next_request_parks_two_after_the_latest_join(sim: &mut Sim, epoch: u64) {
        let ranks: Vec<usize> = (0..sim.ranks.len()).collect();
        let latest_join = sim.ranks.iter().map(|r| r.q.counter()).max().unwrap() + 1;
        sim.raise(epoch, &ranks);
        sim.run_until_decided(100);
        assert_eq!(
            sim.last_decisions(),
            vec![(latest_join + 2, Decision::Park(epoch)); ranks.len()]
        );
        sim.assert_quiet();
    }

    #[test]
    fn a_slow_calibration_is_tested_at_a_quarter_of_its_age() {
        use super::{test_spacing, EVERY_SAFE_POINT};
        let tested: Vec<u64> = (0..64)
            .filter(|since| *since < EVERY_SAFE_POINT || since % test_spacing(*since) == 0)
            .collect();
        assert_eq!(
            tested,
            [
                (0..8).collect::<Vec<u64>>(),
                vec![8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56]
            ]
            .concat()
        );
    }

    #[test]
    fn flags_raised_at_different_safe_points_do_not_widen_the_next_slack() {
        let mut sim = long_iterations(4);
        sim.run(3);
        // The agents raise their flags over three safe points: rank 0's
        // at safe point 4, rank 1's at 5, the others' later. Rank 0's join,
        // still incomplete at its next safe point (200 ms on, past
        // RING_AFTER), rings: ranks 2 and 3 join on the ring at 5.
        sim.raise(1, &[0]);
        sim.run(1);
        sim.raise(1, &[1]);
        sim.run(1);
        sim.raise(1, &[2, 3]);
        let latest_join = sim.round;
        sim.run_until_decided(100);
        assert_eq!(
            sim.last_decisions(),
            vec![(latest_join + 2, Decision::Park(1)); 4]
        );
        for r in &sim.ranks {
            assert_eq!(r.q.stats().joined_by_ring, u64::from(r.q.rank() >= 2));
        }
        // Rank 0 joined a safe point before the latest join and saw the
        // join complete two after its own, but what the slack had to cover
        // is one safe point from the latest join.
        for r in &sim.ranks {
            assert_eq!(r.q.slack_floor(), 2);
        }
        // The next request, seen by each rank at its next safe point, parks
        // them two safe points after the latest of those.
        assert_the_next_request_parks_two_after_the_latest_join(&mut sim, 2);
    }

    #[test]
    fn the_slack_follows_the_application_when_its_progress_changes() {
        // At first a rank's MPI progress lags (an uncoupled start: its
        // collectives only move at its own tests): the first calibration
        // takes long, and so does its floor.
        let mut sim = long_iterations(8);
        sim.world.borrow_mut().lag[3] = 6;
        sim.run(9);
        assert!(sim.ranks[3].q.slack_floor() > 2, "lagging at first");
        // Then the application's own MPI calls drive every collective: the
        // next calibrations (8 safe points apart at this pace, once the
        // lagging rank has seen the first complete) say so.
        sim.world.borrow_mut().lag[3] = 0;
        sim.run(40);
        let world_calibrations = sim.world.borrow().calibrations.len();
        assert!(world_calibrations >= 3, "{world_calibrations} calibrations");
        for r in &sim.ranks {
            assert_eq!(r.q.slack_floor(), 2, "rank {}", r.q.rank());
        }
        assert_the_next_request_parks_two_after_the_latest_join(&mut sim, 1);
    }

    #[test]
    fn ranks_leaving_at_different_safe_points_start_the_same_calibrations() {
        // Calibrations fall due at safe points 1 and 2 (the first is
        // followed at once), then 10, 18, 26, … here. Rank 0 leaves at 25;
        // the others pass 26 (and start a calibration there) before they
        // learn of its final agreement, and leave much later.
        let mut sim = long_iterations(3);
        sim.run(25);
        assert_eq!(sim.world.borrow().calibrations.len(), 4);
        sim.finalize(0);
        sim.run(1);
        let started = sim.world.borrow().calibrations.len();
        assert_eq!(started, 5, "the others started the one due at 26");
        sim.run(30);
        sim.finalize(1);
        sim.run(5);
        sim.finalize(2);
        sim.run_until(1000, |sim| sim.ranks.iter().all(|r| r.mode == Mode::Gone));
        // Rank 0 started the fifth as it left; none started a sixth,
        // though the others passed safe points 34, 42 and 50.
        assert_eq!(sim.world.borrow().calibrations.len(), 5);
        assert_calibrations_complete(&sim);
        sim.assert_quiet();
    }
}
