//! The schedules where the ranks' pace matters, on simulated ranks
//! (`sim.rs`): long iterations at any scale, waits at the cap for a join
//! that lags, and ranks that compute apart.

use std::time::Duration;

use super::agreement::Decision;
use super::sim::Sim;

/// `ranks` ranks with 200 ms iterations: the 20 ms join slack is no safe
/// point at all, so the slack is its floor.
fn long_iterations(ranks: usize) -> Sim {
    let mut sim = Sim::new(ranks, None);
    sim.round_time = Duration::from_millis(200);
    sim
}

/// Raises epoch 1 on every rank and returns the safe point they all park
/// at, checking that they park together with nothing left behind.
fn park_all(sim: &mut Sim, limit: u64) -> u64 {
    let ranks = sim.ranks.len();
    sim.raise(1, &(0..ranks).collect::<Vec<_>>());
    sim.run_until_decided(limit);
    let decisions = sim.last_decisions();
    let park_at = decisions[0].0;
    assert_eq!(decisions, vec![(park_at, Decision::Park(1)); ranks]);
    sim.assert_quiet();
    park_at
}

/// A coupled code with long iterations (its own MPI calls drive the
/// progress engine, so a rank sees an allreduce complete at its next
/// test), from 4 to 16,384 ranks: the ranks park at the safe point after
/// the one that saw the request, the first checkpoint included and a
/// request before the first safe point included, with nothing measured
/// beforehand and nothing that grows with the number of ranks.
#[test]
fn a_request_parks_the_ranks_at_the_safe_point_after_the_one_that_saw_it_at_any_scale() {
    for ranks in [4usize, 64, 1024, 4096, 16384] {
        let mut sim = long_iterations(ranks);
        assert_eq!(
            park_all(&mut sim, 20),
            2,
            "{ranks} ranks, before safe point 1"
        );
        let mut sim = long_iterations(ranks);
        sim.run(3);
        let requested_at = sim.round;
        assert_eq!(
            park_all(&mut sim, 20) - requested_at,
            2,
            "{ranks} ranks: safe points from the request to parked"
        );
        assert!(sim.ranks.iter().all(|r| r.q.stats().retries == 0));
    }
}

/// A rank whose MPI progress lags (more ranks than cores, or ranks that
/// compute apart: a join needs several of its tests, here up to two safe
/// points' time of them) does not make a rank pass the target: every rank
/// waits at its cap for the join, and all park there, without a retry, the
/// lagging one after its tests.
#[test]
fn ranks_wait_at_their_cap_for_a_join_that_lags_and_park_there_without_a_retry() {
    for lag in [1u32, 2] {
        let mut sim = long_iterations(64);
        sim.world.borrow_mut().lag[5] = lag;
        sim.run(3);
        let requested_at = sim.round;
        assert_eq!(park_all(&mut sim, 200) - requested_at, 2, "lag {lag}");
        assert!(sim.ranks.iter().all(|r| r.q.stats().retries == 0));
        assert!(sim.ranks[5].q.stats().cap_waits > 0);
    }
}

/// A peer descheduled for longer than a rank's patience: the ranks at their
/// cap leave it, compute on and, once the peer is back, the agreement
/// completes and they park together (after a retry, since some passed the
/// target) or refuse together; none hangs.
#[test]
fn ranks_leave_their_cap_after_their_patience_and_still_end_the_agreement_together() {
    let ranks = 8;
    let mut sim = long_iterations(ranks);
    sim.run(3);
    sim.raise(1, &(0..ranks).collect::<Vec<_>>());
    // Two safe points of a 200 ms pace at the cap; stalled for 3 s.
    sim.stall(3, 15);
    sim.run_until_decided(400);
    let decisions = sim.last_decisions();
    let parked = decisions
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Park(1)))
        .count();
    assert!(
        parked == 0 || decisions.iter().all(|d| *d == decisions[0]),
        "{decisions:?}"
    );
    assert!(sim.ranks[0].q.stats().cap_wait >= 2 * sim.round_time);
    sim.assert_quiet();
}

/// A coupled code whose last rank's flag rises a whole safe point after the
/// others' (its agent was slow): that rank passes the safe point the others
/// cap at and blocks in the application's collective after it, on them, so
/// the join cannot complete while they wait at their cap. They wait only
/// about two safe points, then compute on; the late rank joins at its next
/// safe point and all park together, with no retry.
#[test]
fn a_coupled_rank_whose_flag_rises_a_safe_point_late_holds_the_others_at_their_cap_briefly() {
    let ranks = 8;
    let mut sim = long_iterations(ranks);
    sim.coupled = true;
    // The late rank reaches each safe point first, before a ring.
    sim.order = Box::new(|_, n| (0..n).rev().collect());
    sim.run(3);
    let requested_at = sim.round;
    sim.raise(1, &(0..ranks - 1).collect::<Vec<_>>());
    sim.run(2);
    sim.raise(1, &[ranks - 1]);
    sim.run_until_decided(200);
    let decisions = sim.last_decisions();
    let park_at = decisions[0].0;
    assert_eq!(decisions, vec![(park_at, Decision::Park(1)); ranks]);
    assert_eq!(park_at - requested_at, 4);
    assert!(sim.ranks.iter().all(|r| r.q.stats().retries == 0));
    let waited = sim.ranks[0].q.stats().cap_wait;
    assert!(
        waited <= 2 * sim.round_time,
        "waited {waited:?} at the cap for a rank blocked on it"
    );
    sim.assert_quiet();
}

/// Ranks whose safe points come at different paces (a code that couples
/// only every few iterations): a peer descheduled for 60 ms, six of the
/// others' safe points, when the request comes joins late, and the others
/// wait for it at their cap rather than pass the target, which is theirs.
#[test]
fn a_peer_whose_next_safe_point_comes_late_is_waited_for_at_the_cap_without_a_retry() {
    let ranks = 8;
    let mut sim = Sim::new(ranks, None);
    sim.round_time = Duration::from_millis(10);
    sim.run(30);
    sim.stall(ranks - 1, 6);
    let requested_at = sim.round;
    park_all(&mut sim, 200);
    assert!(sim.ranks.iter().all(|r| r.q.stats().retries == 0));
    assert!(sim.ranks[0].q.stats().cap_wait >= 3 * sim.round_time);
    assert!(sim.round - requested_at < 20);
}

#[test]
fn ranks_that_compute_apart_are_waited_for_at_the_target_however_far_behind() {
    // Two halves that never couple: the odd ranks take four rounds per
    // safe point, the even ones one, so at the request the odd ones are
    // some 300 safe points behind, far more than the usual patience at
    // the target covers (250 ms, 250 rounds): the even ones wait for them
    // there, as long as the join said the slowest needs.
    let mut sim = Sim::new(4, None);
    let slow = |sim: &mut Sim, rank: usize| {
        if rank % 2 == 1 {
            sim.stall(rank, 3);
        }
    };
    for _ in 0..400 {
        sim.round_with(&mut |sim, rank| slow(sim, rank));
    }
    let behind = sim.ranks[0].q.counter() - sim.ranks[1].q.counter();
    assert!(behind > 250, "odd ranks {behind} safe points behind");
    sim.raise(1, &[0, 1, 2, 3]);
    let before: Vec<usize> = sim.ranks.iter().map(|r| r.decisions.len()).collect();
    for _ in 0..5000 {
        sim.round_with(&mut |sim, rank| slow(sim, rank));
        if sim
            .ranks
            .iter()
            .zip(&before)
            .all(|(r, b)| r.decisions.len() > *b)
        {
            break;
        }
    }
    let decisions = sim.last_decisions();
    let target = decisions[0].0;
    assert_eq!(decisions, vec![(target, Decision::Park(1)); 4]);
    for r in &sim.ranks {
        assert_eq!(r.q.stats().retries, 0);
    }
    sim.assert_quiet();
}
