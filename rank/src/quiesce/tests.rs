//! The agreement's schedules, run on simulated ranks (`sim.rs`): one safe
//! point per rank per round, a round being 1 ms of virtual time, so a
//! rank's measured pace is 1 ms per safe point and its slack (unless fixed)
//! is [`JOIN_SLACK`] / 1 ms = 20 safe points.

use std::time::Duration;

use super::agreement::{Decision, InFlight, Refusal, MAX_ATTEMPTS, RING_AFTER};
use super::pace::{GIVE_UP, JOIN_SLACK, MIN_PATIENCE};
use super::sim::{Mode, Sim, ROUND};

/// The safe points of slack at the simulated pace.
const SLACK: u64 = (JOIN_SLACK.as_millis() / ROUND.as_millis()) as u64;

/// The rounds a rank at the target waits in the first attempt.
const PATIENCE_ROUNDS: u64 = (MIN_PATIENCE.as_millis() / ROUND.as_millis()) as u64;
/// Rounds a rank waits for a check that follows an arrive with everyone there.
const GIVE_UP_ROUNDS: u64 = (GIVE_UP.as_millis() / ROUND.as_millis()) as u64;

#[test]
fn ranks_whose_flags_rise_at_different_safe_points_all_park_at_the_last_cap() {
    let mut sim = Sim::new(4, None);
    // The agents raise the flags over 7 ms; each rank joins at the safe
    // point where it sees its own (its count equals the round here).
    for (round, rank) in [(5, 0), (7, 1), (9, 2), (12, 3)] {
        sim.run(round - 1 - sim.round);
        sim.raise(1, &[rank]);
    }
    sim.run_until_decided(200);

    // The target is the largest cap: the last joiner's safe point plus its
    // slack. Every rank parks there.
    let target = 12 + SLACK;
    assert_eq!(
        sim.last_decisions(),
        vec![(target, Decision::Park(1)); 4],
        "every rank parks at the same safe point"
    );
    // One agreement: join (the latest cap), arrive (nobody missing),
    // check (all clear).
    assert_eq!(
        sim.results(),
        vec![
            Some(vec![1, target, !5, 1_000_000]),
            Some(vec![0]),
            Some(vec![0, 0, 0, 0])
        ]
    );
    for r in &sim.ranks {
        assert_eq!(r.q.stats().rings, 0, "the join completed before any ring");
        assert_eq!(r.q.stats().retries, 0);
    }
    sim.assert_quiet();

    // The next epoch: the same again, from wherever the ranks are.
    sim.raise(2, &[0, 1, 2, 3]);
    sim.run_until_decided(200);
    let decisions = sim.last_decisions();
    assert!(decisions
        .iter()
        .all(|decision| *decision == (decisions[0].0, Decision::Park(2))));
    assert!(decisions[0].0 > target);
    assert_eq!(sim.results().len(), 6);
    sim.assert_quiet();
}

#[test]
fn any_interleaving_of_the_ranks_parks_them_at_the_same_safe_point() {
    // Reversed, rotating and interleaved orders of the ranks within a
    // round: who starts each collective last changes, the outcome not.
    let orders: [fn(u64, usize) -> Vec<usize>; 3] = [
        |_, n| (0..n).rev().collect(),
        |round, n| (0..n).map(|i| (i + round as usize) % n).collect(),
        |round, n| {
            let mut order: Vec<usize> = (0..n).filter(|i| i % 2 == 0).collect();
            order.extend((0..n).filter(|i| i % 2 == 1));
            if round % 2 == 0 {
                order.reverse();
            }
            order
        },
    ];
    for order in orders {
        let mut sim = Sim::new(5, None);
        sim.order = Box::new(order);
        sim.run(9);
        sim.raise(1, &[0, 1, 2, 3, 4]);
        sim.run_until_decided(200);
        assert_eq!(
            sim.last_decisions(),
            vec![(10 + SLACK, Decision::Park(1)); 5]
        );
        sim.assert_quiet();
    }
}

#[test]
fn a_rank_that_learns_the_target_late_makes_every_rank_join_again_with_four_times_the_slack() {
    // Slack of 2; rank 2's MPI progress is slow: it sees a completed
    // collective three tests late, so it learns the first target after
    // passing it.
    let mut sim = Sim::new(3, Some(2));
    sim.world.borrow_mut().lag[2] = 3;
    sim.run(9);
    sim.raise(1, &[0, 1, 2]);
    sim.run_until_decided(500);

    let results = sim.results();
    // Attempt 0: all joined at safe point 10, capped at 12.
    assert_eq!(join_words(sim.words(0)), vec![vec![1, 12]; 3]);
    // Rank 2 passed it (it learned the target at 13): one missing at the
    // arrive, so no rank saw everyone there at the check.
    assert_eq!(results[1], Some(vec![1]));
    assert_eq!(results[2], Some(vec![0, 3, 0, 0]));
    // Attempt 1: caps four times the slack past the safe point where each
    // rank saw the check: ranks 0 and 1 were waiting at 12; rank 2, three
    // tests late at each step, saw it at 19.
    let rejoined: Vec<u64> = sim.ranks.iter().map(|r| r.starts[3]).collect();
    assert_eq!(rejoined, vec![12, 12, 19]);
    assert_eq!(
        join_words(sim.words(3)),
        vec![vec![1, 12 + 8], vec![1, 12 + 8], vec![1, 19 + 8]]
    );
    assert_eq!(
        join_words(vec![results[3].clone().unwrap()]),
        vec![vec![1, 27]]
    );
    // Now every rank learns the target in time and all park there.
    assert_eq!(sim.last_decisions(), vec![(27, Decision::Park(1)); 3]);
    for r in &sim.ranks {
        assert_eq!(r.q.stats().retries, 1);
        assert_eq!(r.q.stats().agreements, 2);
    }
    sim.assert_quiet();
}

#[test]
fn ranks_that_keep_passing_the_target_refuse_after_the_last_attempt() {
    // A slack of 2, and rank 2's MPI progress 40 tests behind: it learns
    // each target after passing it, even with 4 × 4 × 2 = 32 safe points
    // of slack in the last attempt.
    let mut sim = Sim::new(3, Some(2));
    sim.world.borrow_mut().lag[2] = 40;
    sim.run(9);
    sim.raise(1, &[0, 1, 2]);
    sim.run_until_decided(2000);

    let decisions = sim.last_decisions();
    let Decision::Refuse(
        1,
        Refusal::Missed {
            missed,
            behind,
            slowest_ns,
        },
    ) = &decisions[0].1
    else {
        panic!("rank 0 decided {decisions:?}");
    };
    assert!(*missed >= 1);
    for (rank, (_, decision)) in decisions.iter().enumerate() {
        assert_eq!(
            *decision,
            Decision::Refuse(
                1,
                Refusal::Missed {
                    missed: *missed,
                    behind: *behind,
                    slowest_ns: *slowest_ns
                }
            ),
            "rank {rank}: every rank read the same sums"
        );
    }
    assert_eq!(
        decisions[0].1.to_string_reason(),
        format!(
            "the ranks did not all stop at the agreed safe point in 3 attempts ({missed} \
             missed the last)"
        )
    );
    // Three agreements of three collectives each, every one complete.
    assert_eq!(sim.results().len(), 3 * MAX_ATTEMPTS as usize);
    for r in &sim.ranks {
        assert_eq!(r.q.stats().agreements, u64::from(MAX_ATTEMPTS));
        assert_eq!(r.q.stats().retries, u64::from(MAX_ATTEMPTS - 1));
    }
    sim.assert_quiet();
    // The refused epoch is over: its flag raises no new agreement.
    sim.raise(1, &[0, 1, 2]);
    sim.run(300);
    assert_eq!(sim.results().len(), 9);
}

#[test]
fn a_rank_whose_agent_never_raises_the_flag_joins_on_a_ring() {
    let mut sim = Sim::new(3, None);
    sim.run(4);
    // Rank 2's agent is stuck: only ranks 0 and 1 see the request.
    sim.raise(1, &[0, 1]);
    sim.run_until_decided(1000);

    // Their join stays incomplete; after RING_AFTER (50 safe points) each
    // rings the others. Rank 2 looks for a ring every BELL_PERIOD (100 of
    // its safe points: at 1, 101, …), finds one at 101 and joins there.
    let ring_after = (RING_AFTER.as_millis() / ROUND.as_millis()) as u64;
    assert!(5 + ring_after < 101);
    let target = 101 + SLACK;
    assert_eq!(sim.last_decisions(), vec![(target, Decision::Park(1)); 3]);
    assert_eq!(
        join_words(sim.words(0))[2],
        vec![0, target],
        "a ring carries no epoch"
    );
    assert_eq!(
        join_words(vec![sim.results()[0].clone().unwrap()]),
        vec![vec![1, target]]
    );
    // The check counted two rings.
    assert_eq!(sim.results()[2], Some(vec![0, 0, 2, 0]));
    let stats: Vec<_> = sim
        .ranks
        .iter()
        .map(|r| (r.q.stats().rings, r.q.stats().joined_by_ring))
        .collect();
    assert_eq!(stats, vec![(1, 0), (1, 0), (0, 1)]);
    // Every ring was received: none is left to start a spurious agreement.
    sim.assert_quiet();
    sim.run(1000);
    assert_eq!(sim.results().len(), 3, "no agreement without a request");

    // The next request reaches every agent: no ring.
    sim.raise(2, &[0, 1, 2]);
    sim.run_until_decided(200);
    assert!(sim
        .last_decisions()
        .iter()
        .all(|(_, decision)| *decision == Decision::Park(2)));
    assert_eq!(sim.results()[5], Some(vec![0, 0, 0, 0]));
    sim.assert_quiet();
}

#[test]
fn a_message_in_flight_at_the_target_refuses_the_checkpoint_naming_it() {
    let mut sim = Sim::new(3, None);
    // Rank 1 will find a message from rank 0, tag 99, still unreceived.
    sim.world.borrow_mut().in_flight[1] = Some(InFlight { source: 0, tag: 99 });
    sim.run(4);
    sim.raise(1, &[0, 1, 2]);
    sim.run_until_decided(200);

    let target = 5 + SLACK;
    let decisions = sim.last_decisions();
    // The rank that saw it refuses, naming it: that refusal aborts the
    // epoch. The others compute on; no rank parks.
    assert_eq!(
        decisions,
        vec![
            (target, Decision::ComputeOn),
            (
                target,
                Decision::Refuse(
                    1,
                    Refusal::InFlight {
                        rank: 1,
                        message: InFlight { source: 0, tag: 99 }
                    }
                )
            ),
            (target, Decision::ComputeOn),
        ]
    );
    assert_eq!(
        decisions[1].1.to_string_reason(),
        "rank 1: a message from rank 0 (tag 99) was still in flight at the safe point; \
         complete all communication before calling the safe point"
    );
    assert_eq!(sim.results()[2], Some(vec![1, 0, 0, 0]));
    // The flags of ranks 0 and 2 still show epoch 1 (their agents abort
    // it): it was decided, so it starts nothing.
    assert_eq!(sim.ranks[0].flag, 1);
    sim.run(300);
    assert_eq!(sim.results().len(), 3);
    sim.assert_quiet();
}

#[test]
fn ranks_left_waiting_at_the_target_leave_it_when_their_patience_runs_out_and_all_retry() {
    let mut sim = Sim::new(3, None);
    sim.run(4);
    sim.raise(1, &[0, 1, 2]);
    let target = 5 + SLACK;
    // Rank 2 learns the target, then is blocked (say in the application's
    // communication) before it gets there.
    sim.run_until(100, |sim| sim.ranks[2].q.target().is_some());
    sim.stall(2, 1000);
    assert_eq!(sim.ranks[2].q.target(), Some(target));
    assert!(sim.ranks[2].q.counter() < target);

    // Ranks 0 and 1 reach it and wait MIN_PATIENCE (ten safe points are
    // less), then leave the target and compute on.
    sim.run_until(100, |sim| sim.ranks[0].mode == Mode::Waiting);
    assert_eq!(sim.round, target);
    sim.run_until(1000, |sim| sim.ranks[0].mode == Mode::Computing);
    assert_eq!(sim.round, target + PATIENCE_ROUNDS);
    assert_eq!(sim.ranks[1].mode, Mode::Computing);
    sim.run(10);
    assert!(sim.ranks[0].q.counter() > target);
    assert!(sim.ranks[0].decisions.is_empty());

    // Rank 2 comes back, reaches the target and arrives: everyone said
    // "there" at the arrive, but the check says two are not: all retry.
    sim.run_until_decided(2000);
    let results = sim.results();
    assert_eq!(results[1], Some(vec![0]));
    assert_eq!(results[2], Some(vec![0, 2, 0, 0]));
    let decisions = sim.last_decisions();
    let park_at = decisions[0].0;
    assert!(park_at > target + PATIENCE_ROUNDS);
    assert_eq!(decisions, vec![(park_at, Decision::Park(1)); 3]);
    for r in &sim.ranks {
        assert_eq!(r.q.stats().retries, 1);
    }
    // The retry's slack is four times the first: ranks 0 and 1, whose pace
    // is still 1 ms, cap 4 × 20 safe points past where they joined again.
    let joins = sim.words(3);
    for rank in [0, 1] {
        assert_eq!(joins[rank][1], sim.ranks[rank].starts[3] + 4 * SLACK);
    }
    assert_eq!(results[3].as_ref().map(|join| join[1]), Some(park_at));
    sim.assert_quiet();
}

#[test]
fn a_check_slower_than_the_usual_patience_still_parks_everyone() {
    let mut sim = Sim::new(3, None);
    sim.run(4);
    sim.raise(1, &[0, 1, 2]);
    let target = 5 + SLACK;
    // Rank 1 arrives at the target (saying it is there), then its check is
    // delayed four times the usual patience (a lost packet, a descheduled
    // process): the others, who saw everyone arrive, wait for it.
    sim.run_until(100, |sim| sim.ranks[1].mode == Mode::Waiting);
    sim.stall(1, 4 * PATIENCE_ROUNDS);
    sim.run_until_decided(GIVE_UP_ROUNDS);
    assert_eq!(sim.last_decisions(), vec![(target, Decision::Park(1)); 3]);
    for r in &sim.ranks {
        assert_eq!(r.q.stats().retries, 0);
    }
    sim.assert_quiet();
}

#[test]
fn a_rank_that_leaves_while_waiting_for_the_check_refuses_and_the_others_park() {
    let mut sim = Sim::new(3, None);
    sim.run(4);
    sim.raise(1, &[0, 1, 2]);
    let target = 5 + SLACK;
    // Rank 1 arrives at the target (saying it is there), then is
    // descheduled before it starts the check, for longer than the others
    // wait for a check.
    sim.run_until(100, |sim| sim.ranks[1].mode == Mode::Waiting);
    sim.stall(1, GIVE_UP_ROUNDS + 1000);
    sim.run_until(GIVE_UP_ROUNDS + 2000, |sim| {
        sim.ranks[0].decisions.len() + sim.ranks[2].decisions.len() == 0
            && sim.ranks[0].mode == Mode::Computing
            && sim.ranks[2].mode == Mode::Computing
    });
    // Ranks 0 and 2 have left the target after waiting for the check.
    assert!(sim.round >= target + GIVE_UP_ROUNDS);
    sim.run_until_decided(2000);

    // The check found everyone there: rank 1 parks, and the ranks that
    // left refuse, which releases it.
    let decisions = sim.last_decisions();
    let waited = GIVE_UP;
    assert_eq!(decisions[1], (target, Decision::Park(1)));
    for (index, rank) in [(0, 0), (2, 2)] {
        assert_eq!(
            decisions[index].1,
            Decision::Refuse(1, Refusal::LeftTarget { rank, waited })
        );
        assert!(decisions[index].0 > target);
    }
    assert_eq!(
        decisions[0].1.to_string_reason(),
        "rank 0 left the agreed safe point after waiting 5000 ms for the others to check it"
    );
    assert_eq!(sim.results()[2], Some(vec![0, 0, 0, 0]));
    sim.assert_quiet();
}

#[test]
fn a_rank_leaving_its_loop_completes_the_agreement_in_progress_and_ends_them() {
    let mut sim = Sim::new(3, None);
    sim.run(4);
    sim.raise(1, &[0, 1]);
    sim.run(3);
    // Rank 2 leaves its loop before its agent's request or a ring reached
    // it: it joins with a cap no safe point reaches.
    sim.finalize(2);
    sim.run_until_decided(200);

    assert!(sim
        .last_decisions()
        .iter()
        .all(|(_, decision)| *decision == Decision::ComputeOn));
    let results = sim.results();
    assert_eq!(
        join_words(vec![results[0].clone().unwrap()]),
        vec![vec![1, u64::MAX]],
        "the target is NEVER"
    );
    assert_eq!(
        results[1],
        Some(vec![1]),
        "nobody is at an unreachable target"
    );
    assert_eq!(results[2], Some(vec![0, 3, 0, 1]), "one rank leaving");
    assert_eq!(sim.ranks[2].mode, Mode::Gone);
    sim.assert_quiet();

    // That rank takes part in nothing more, so no agreement starts: not on
    // a new request, not at the others' `finalize`.
    sim.raise(2, &[0, 1]);
    sim.run(300);
    sim.finalize(0);
    sim.finalize(1);
    assert_eq!(sim.ranks[0].mode, Mode::Gone);
    assert_eq!(sim.ranks[1].mode, Mode::Gone);
    assert_eq!(sim.results().len(), 3);
    sim.assert_quiet();
}

#[test]
fn a_rank_leaving_with_no_agreement_under_way_starts_one_and_rings_the_others_into_it() {
    let mut sim = Sim::new(3, None);
    sim.run(9);
    sim.finalize(0);
    assert_eq!(sim.ranks[0].mode, Mode::Leaving);
    sim.run_until_decided(500);

    // Nobody else had a request: rank 0 rang, the others joined on the
    // ring at their next look (safe point 101) and the agreement ended.
    let ring_after = (RING_AFTER.as_millis() / ROUND.as_millis()) as u64;
    assert!(9 + ring_after < 101);
    assert_eq!(join_words(sim.words(0))[1], vec![0, 101 + SLACK]);
    assert_eq!(sim.results()[2], Some(vec![0, 3, 1, 1]));
    let stats: Vec<_> = sim
        .ranks
        .iter()
        .map(|r| (r.q.stats().rings, r.q.stats().joined_by_ring))
        .collect();
    assert_eq!(stats, vec![(1, 0), (0, 1), (0, 1)]);
    assert_eq!(sim.ranks[0].mode, Mode::Gone);
    sim.finalize(1);
    sim.finalize(2);
    assert_eq!(
        sim.results().len(),
        3,
        "every rank ends with the same collectives"
    );
    sim.assert_quiet();
}

/// A small deterministic generator for the schedules below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn under_any_schedule_the_ranks_that_park_park_together_and_otherwise_one_refuses() {
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let n = 2 + rng.below(4) as usize;
        let fixed_slack = match rng.below(3) {
            0 => Some(rng.below(5)),
            _ => None,
        };
        let mut sim = Sim::new(n, fixed_slack);
        for rank in 0..n {
            sim.world.borrow_mut().lag[rank] = rng.below(4) as u32;
        }
        let in_flight = rng.below(5) == 0;
        if in_flight {
            let rank = rng.below(n as u64) as usize;
            sim.world.borrow_mut().in_flight[rank] = Some(InFlight { source: 0, tag: 1 });
        }
        let order_seed = rng.next();
        sim.order = Box::new(move |round, n| {
            let mut rng = Rng(order_seed ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            order
        });
        // Flags rise over 40 ms; one agent in four never raises its own.
        let mut raises: Vec<(u64, usize)> = Vec::new();
        for rank in 0..n {
            if rng.below(4) != 0 {
                raises.push((1 + rng.below(40), rank));
            }
        }
        if raises.is_empty() {
            raises.push((1, 0));
        }
        raises.sort_unstable();
        let stall = (rng.below(n as u64) as usize, rng.below(80), rng.below(600));
        for round in 1..=80 {
            for &(_, rank) in raises.iter().filter(|(at, _)| *at == round) {
                sim.raise(1, &[rank]);
            }
            if round == stall.1 {
                sim.stall(stall.0, stall.2);
            }
            sim.run(1);
            if sim.ranks.iter().all(|r| !r.decisions.is_empty()) {
                break;
            }
        }
        if !sim.ranks.iter().all(|r| !r.decisions.is_empty()) {
            sim.run_until(50_000, |sim| {
                sim.ranks.iter().all(|r| !r.decisions.is_empty())
            });
        }

        let decisions = sim.last_decisions();
        let parked: Vec<u64> = decisions
            .iter()
            .filter(|(_, decision)| matches!(decision, Decision::Park(_)))
            .map(|(at, _)| *at)
            .collect();
        let refused = decisions
            .iter()
            .filter(|(_, decision)| matches!(decision, Decision::Refuse(..)))
            .count();
        let context = format!("seed {seed}: {n} ranks, slack {fixed_slack:?}: {decisions:?}");
        assert!(
            parked.windows(2).all(|pair| pair[0] == pair[1]),
            "{context}"
        );
        assert!(parked.len() == n || refused > 0, "{context}");
        if in_flight {
            assert!(parked.len() < n, "{context}");
        }
        for (_, decision) in &decisions {
            if let Decision::Park(epoch) | Decision::Refuse(epoch, _) = decision {
                assert_eq!(*epoch, 1, "{context}");
            }
        }
        sim.assert_quiet();
        for rank in 0..n {
            sim.ranks[rank].stalled_until = 0;
            sim.finalize(rank);
        }
        sim.run_until(10_000, |sim| sim.ranks.iter().all(|r| r.mode == Mode::Gone));
        sim.assert_quiet();
    }
}

impl Decision {
    /// The reason a refusal sends the agent.
    fn to_string_reason(&self) -> String {
        match self {
            Decision::Refuse(_, refusal) => refusal.to_string(),
            other => panic!("not a refusal: {other:?}"),
        }
    }
}

#[test]
fn patience_and_ring_constants_fit_the_simulated_pace() {
    // The schedules above count rounds from these.
    assert_eq!(SLACK, 20);
    assert_eq!(PATIENCE_ROUNDS, 250);
    assert_eq!(ROUND, Duration::from_millis(1));
}

/// A join's epoch and cap (or the agreed epoch and target), without the
/// lowest safe point and the slowest pace.
fn join_words(words: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    words.into_iter().map(|w| w[..2].to_vec()).collect()
}
