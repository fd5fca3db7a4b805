//! A rank's pace and what follows from it: how many safe points of slack a
//! rank promises at its join, how often it looks for a ring, how long it
//! waits at the target. Pure arithmetic over times the caller reads.

use std::time::{Duration, Instant};

/// How far past its join a rank may run before it waits for the target: it
/// covers the spread between the agents raising their flags and the
/// `MPI_Test`s the join needs to complete on every rank, so that ranks with
/// short iterations rarely wait, and it is about what the agreement adds to
/// the quiesce latency.
pub const JOIN_SLACK: Duration = Duration::from_millis(20);

/// The fewest safe points of slack: the target is at least the safe point
/// after the latest join. A rank that reaches its cap before the join has
/// completed waits there for it (the target is there or later), so a join
/// that needs more safe points costs a short wait at the cap, where every
/// rank is heading, never a missed target; and a slack that looked ahead
/// by more safe points would cost whole iterations of every rank.
pub const MIN_SLACK: u64 = 1;

/// The most safe points of slack: a pace measured in a burst of very short
/// iterations must not send every rank far ahead.
pub(crate) const MAX_SLACK: u64 = 1 << 12;

/// The longest a rank waits at the target for a step to complete: well
/// below an agent's park timeout.
pub const GIVE_UP: Duration = Duration::from_secs(5);

/// The least a rank waits for the others to arrive at the target.
pub const MIN_PATIENCE: Duration = Duration::from_millis(250);

/// The least a rank waits at its cap for the join: a peer whose safe
/// points come further apart than this rank's (load imbalance in a code
/// that couples every few iterations) joins at its next one, and a rank
/// that left its cap before then would pass the target and cost a retry.
pub const MIN_CAP_WAIT: Duration = Duration::from_millis(100);

/// How long a rank waits at its cap for the join, given its [`patience`]:
/// two of its safe points, at least [`MIN_CAP_WAIT`]. A join that lags
/// only for MPI progress completes within about one iteration (the code's
/// own collectives take as long). A join that waits for a peer whose flag
/// rose after it passed this rank's cap never completes while this rank
/// waits, if the peer is held on this rank in the code's own collective
/// after that safe point: waiting longer would stall the job, where
/// computing on lets the peer reach its next safe point, see its flag and
/// join.
pub fn cap_patience(per_safe_point_ns: u64, patience: Duration) -> Duration {
    Duration::from_nanos(per_safe_point_ns.saturating_mul(2))
        .max(MIN_CAP_WAIT)
        .min(patience)
}

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

/// The longest a rank waits at the target for ranks that were far behind
/// it when they joined: well below an agent's park timeout.
pub const MAX_CATCH_UP: Duration = GIVE_UP;

/// How long a rank at the target waits for the others to arrive when the
/// furthest behind was `behind` safe points short of it at the join, at
/// `slowest_ns` per safe point: twice the time it needs, at most
/// [`MAX_CATCH_UP`]. In a coupled code the ranks join within a safe point
/// or two of each other and this is below the usual [`patience`]; ranks
/// that compute apart (halves of a job that couple seldom, or at the end
/// only) may join many safe points apart, and leaving before the last
/// arrives would fail every attempt.
pub fn catch_up_patience(behind: u64, slowest_ns: u64) -> Duration {
    Duration::from_nanos(behind.saturating_mul(slowest_ns).saturating_mul(2)).min(MAX_CATCH_UP)
}

/// How long a rank at the target waits for the check, given its
/// [`patience`] for the other steps. When the arrive found every rank at the
/// target, each starts the check as soon as it sees the arrive complete, so
/// only the network delays it (a lost packet costs TCP a retransmission
/// timeout of 200 ms or more, doubling with each loss of the same packet),
/// and leaving then aborts the epoch, since the others park. The one peer
/// that could be blocked on this rank is one that left the target while
/// waiting for the arrive, and its check brings a retry whenever it comes:
/// so the wait is [`GIVE_UP`]. Otherwise the check brings a retry anyway
/// and the usual patience holds.
pub fn check_patience(patience: Duration, everyone_there: bool) -> Duration {
    if everyone_there {
        patience.max(GIVE_UP)
    } else {
        patience
    }
}

/// How often a rank outside an agreement looks for a peer's ring. It only
/// bounds how late a rank whose agent failed to raise its flag joins. A look
/// is one `MPI_Test`, which runs MPICH's progress engine and costs several
/// µs here (looks every 5 ms cost 0.1–0.17% of 1 ms iterations at 2 ranks);
/// every 100 ms they cost under 0.01%.
pub const BELL_PERIOD: Duration = Duration::from_millis(100);

/// The most safe points a rank lets pass between two looks for a ring.
const MAX_SAFE_POINTS_PER_LOOK: u64 = 1 << 13;

/// The rank's own time per safe point, measured at each look for a ring, so
/// that periods can be turned into numbers of safe points without reading
/// the clock at every safe point.
#[derive(Debug)]
pub(crate) struct Pace {
    /// The safe point of the next look.
    pub(crate) next_look: u64,
    last_look: Instant,
    last_look_at: u64,
    /// Nanoseconds per safe point, 0 until measured.
    pub(crate) per_safe_point_ns: u64,
}

impl Pace {
    /// A pace not yet measured, counted from `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Pace {
            next_look: 1,
            last_look: now,
            last_look_at: 0,
            per_safe_point_ns: 0,
        }
    }

    /// Safe points in `period` at the measured pace, from `least` (also
    /// before any measurement) to `most`.
    pub(crate) fn safe_points_in(&self, period: Duration, least: u64, most: u64) -> u64 {
        if self.per_safe_point_ns == 0 {
            return least;
        }
        let period = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        (period / self.per_safe_point_ns).clamp(least, most)
    }

    /// Measures the pace over the safe points since the last measurement,
    /// at `counter` safe points and time `now` (none passed: the pace
    /// stands).
    pub(crate) fn measure(&mut self, counter: u64, now: Instant) {
        let passed = counter.saturating_sub(self.last_look_at);
        if passed == 0 {
            return;
        }
        let ns = u64::try_from(now.saturating_duration_since(self.last_look).as_nanos())
            .unwrap_or(u64::MAX);
        self.per_safe_point_ns = (ns / passed).max(1);
        self.last_look = now;
        self.last_look_at = counter;
    }

    /// Measures the pace at a look and schedules the next one.
    pub(crate) fn looked(&mut self, counter: u64, now: Instant) {
        self.measure(counter, now);
        self.next_look =
            counter.saturating_add(self.safe_points_in(BELL_PERIOD, 1, MAX_SAFE_POINTS_PER_LOOK));
    }

    /// After an agreement: measure afresh, its waits are not the
    /// application's pace.
    pub(crate) fn restart(&mut self, counter: u64, now: Instant) {
        self.last_look = now;
        self.last_look_at = counter;
        self.next_look = counter.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_become_safe_points_at_the_measured_pace() {
        let mut pace = Pace::new(Instant::now());
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
    fn the_check_waits_out_the_network_only_when_everyone_arrived() {
        let usual = patience(1_000_000, 0);
        assert_eq!(check_patience(usual, false), usual);
        assert_eq!(check_patience(usual, true), GIVE_UP);
        assert_eq!(check_patience(GIVE_UP * 2, true), GIVE_UP * 2);
    }

    #[test]
    fn the_furthest_behind_is_given_twice_its_time_within_bounds() {
        // A coupled loop: a safe point or two apart, less than the usual
        // patience.
        assert!(catch_up_patience(2, 10_000_000) < patience(10_000_000, 0));
        // 300 safe points of 40 ms behind: 24 s needed twice over, capped.
        assert_eq!(catch_up_patience(300, 40_000_000), MAX_CATCH_UP);
        assert_eq!(
            catch_up_patience(30, 40_000_000),
            Duration::from_millis(2400)
        );
        // An unmeasured pace (0) or nobody behind adds nothing.
        assert_eq!(catch_up_patience(30, 0), Duration::ZERO);
        assert_eq!(catch_up_patience(u64::MAX, u64::MAX), MAX_CATCH_UP);
    }

    #[test]
    fn a_look_measures_the_pace_and_schedules_the_next() {
        let start = Instant::now();
        let mut pace = Pace::new(start);
        // Ten safe points in 10 ms: 1 ms each, the next look a hundred on.
        pace.looked(10, start + Duration::from_millis(10));
        assert_eq!(pace.per_safe_point_ns, 1_000_000);
        assert_eq!(pace.next_look, 110);
        // No safe point since: the pace stands, whatever the clock says.
        pace.measure(10, start + Duration::from_secs(1));
        assert_eq!(pace.per_safe_point_ns, 1_000_000);
    }
}
