//! The copy buffer pool's tests.
use super::*;

#[test]
fn slots_are_bounded_and_reused() {
    let pool = BufferPool::new(4 * 4096, 4096, Duration::ZERO).unwrap();
    pool.wait_warm();
    assert_eq!(pool.slots(), 4);
    let mut a = pool.try_take(3).unwrap();
    assert!(pool.try_take(2).is_none());
    a[0].bytes()[0] = 7;
    let b = pool.take_some(10);
    assert_eq!(b.len(), 1);
    let handle = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.take_some(2).len())
    };
    drop(a);
    assert!(handle.join().unwrap() >= 1);
    assert!(BufferPool::new(4096, 4096, Duration::ZERO).is_err());
}

#[test]
fn a_checkpoint_never_waits_for_the_idle_prefault_thread() {
    // 64 slots of 1 MiB, and a pre-fault delay the test never reaches:
    // the first checkpoint, soon after the job's start, warms what it
    // takes itself.
    let delay = Duration::from_secs(3600);
    let pool = BufferPool::new(64 << 20, 1 << 20, delay).unwrap();
    assert_eq!(pool.warm_bytes(), 0);
    let all = pool.try_take(64).expect("the taker warms what it needs");
    assert_eq!(all.len(), 64);
    assert_eq!(pool.warm_bytes(), 64 << 20);
    drop(all);
    let pool = BufferPool::new(64 << 20, 1 << 20, delay).unwrap();
    let mut taken = 0;
    let mut held = Vec::new();
    while taken < 64 {
        let slots = pool.take_some(64 - taken);
        taken += slots.len();
        held.extend(slots);
    }
    assert_eq!(held.len(), 64);
}

#[test]
fn taking_warm_slots_only_never_faults_one_in() {
    let pool = BufferPool::new(8 << 20, 1 << 20, Duration::from_secs(3600)).unwrap();
    assert!(pool.try_take_warm_for(1, 0).is_none());
    assert_eq!(pool.warm_bytes(), 0);
    let warmed = pool.try_take(4).unwrap();
    drop(warmed);
    let held = pool.try_take_warm_for(3, 0).unwrap();
    // One warm slot is left; other ranks' slots in use count for
    // nothing.
    assert!(pool.try_take_warm_for(2, 0).is_none());
    assert_eq!(pool.try_take_warm_for(1, 0).map(|s| s.len()), Some(1));
    assert_eq!(pool.warm_bytes(), 4 << 20);
    drop(held);
}

#[test]
fn takers_racing_on_a_cold_pool_warm_rather_than_wait_for_returns() {
    // Eight ranks' copies take 8 slots each of 64 cold ones at once and
    // hold them (as until their resume): each must get its slots by
    // warming cold ones, never by waiting for another's to come back.
    let delay = Duration::from_secs(3600);
    let pool = BufferPool::new(64 << 20, 1 << 20, delay).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..8 {
        let (pool, barrier, tx) = (pool.clone(), Arc::clone(&barrier), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let slots = pool.try_take(8);
            let got = slots.as_ref().map_or(0, Vec::len);
            tx.send(got).unwrap();
            barrier.wait();
            drop(slots);
        });
    }
    for _ in 0..8 {
        let got = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a taker waited for slots that only a return would free");
        assert_eq!(got, 8);
    }
}

#[test]
fn a_checkpoint_warms_what_it_expects_to_copy_and_no_more() {
    let delay = Duration::from_secs(3600);
    let pool = BufferPool::new(64 << 20, 1 << 20, delay).unwrap();
    pool.warm_up_to((10 << 20) + 1);
    assert_eq!(pool.warm_bytes(), 11 << 20);
    // Already warm enough: nothing more.
    pool.warm_up_to(4 << 20);
    assert_eq!(pool.warm_bytes(), 11 << 20);
    // Never past the budget.
    pool.warm_up_to(1 << 40);
    assert_eq!(pool.warm_bytes(), 64 << 20);
}

#[test]
fn a_rank_gets_back_the_slots_it_had() {
    let pool = BufferPool::new(8 * 4096, 4096, Duration::ZERO).unwrap();
    pool.wait_warm();
    let offsets = |slots: &[Slot]| {
        let mut o: Vec<u64> = slots.iter().map(Slot::offset).collect();
        o.sort_unstable();
        o
    };
    let a = pool.try_take_for(3, 1).unwrap();
    let b = pool.try_take_warm_for(3, 2).unwrap();
    let (had_a, had_b) = (offsets(&a), offsets(&b));
    drop(a);
    drop(b);
    // Rank 2 asks first this time, and still gets its own three.
    let b = pool.try_take_for(3, 2).unwrap();
    let a = pool.try_take_warm_for(3, 1).unwrap();
    assert_eq!(offsets(&b), had_b);
    assert_eq!(offsets(&a), had_a);
    // More than it had: its own, then others.
    drop(a);
    let more = pool.try_take_for(5, 1).unwrap();
    assert!(had_a.iter().all(|o| offsets(&more).contains(o)));
    drop((b, more));
    // What a rank writes in the memfd is what the slot holds.
    let mut slot = pool.try_take(1).unwrap().pop().unwrap();
    let at = slot.offset();
    nix::sys::uio::pwrite(pool.memfd(), b"budget", i64::try_from(at).unwrap()).unwrap();
    assert_eq!(&slot.bytes()[..6], b"budget");
}

#[test]
fn retired_slots_are_never_handed_out_again() {
    let pool = BufferPool::new(4 * 4096, 4096, Duration::ZERO).unwrap();
    pool.wait_warm();
    let lost = pool.try_take(3).unwrap();
    let lost_at: Vec<u64> = lost.iter().map(Slot::offset).collect();
    pool.retire(lost);
    // One slot is left, and a taker of more does not wait for ever.
    assert!(pool.try_take(2).is_none());
    let last = pool.take_some(4);
    assert_eq!(last.len(), 1);
    assert!(!lost_at.contains(&last[0].offset()));
    assert!(pool.starved());
}

#[test]
fn a_reservation_holds_slots_for_a_rank_and_other_takers_leave_them() {
    let pool = BufferPool::new(8 * 4096, 4096, Duration::ZERO).unwrap();
    pool.wait_warm();
    let offsets = |slots: &[Slot]| {
        let mut o: Vec<u64> = slots.iter().map(Slot::offset).collect();
        o.sort_unstable();
        o
    };
    // Rank 1 copied into two slots; they are still held (being stored)
    // when it resumes, and it is given two more for a copy of four.
    let held = pool.try_take_for(2, 1).unwrap();
    let ranges = pool.reserve_for(4, 1).expect("new slots");
    let reserved: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(reserved, 4 * 4096);
    for had in offsets(&held) {
        assert!(ranges.iter().any(|&(at, len)| had >= at && had < at + len));
    }
    // Adjacent slots come as one range.
    assert!(ranges.len() < 4, "{ranges:?}");
    // Asked again, nothing is new.
    assert_eq!(pool.reserve_for(4, 1), None);
    drop(held);
    // Rank 2 and the agent's own copy take the slots no rank had.
    let other = pool.try_take_for(2, 2).unwrap();
    let agent = pool.try_take(2).unwrap();
    let inside = |o: u64| ranges.iter().any(|&(at, len)| o >= at && o < at + len);
    assert!(offsets(&other)
        .iter()
        .chain(&offsets(&agent))
        .all(|&o| !inside(o)));
    // Rank 1 gets back exactly what was reserved for it.
    let mine = pool.try_take_warm_for(4, 1).unwrap();
    assert!(offsets(&mine).iter().all(|&o| inside(o)));
    drop((other, agent, mine));
    // More than the pool has left unowned: it gets what there is.
    let rest = pool.reserve_for(8, 3).expect("the two no rank had");
    assert_eq!(rest.iter().map(|r| r.1).sum::<u64>(), 2 * 4096);
    assert_eq!(pool.reserve_for(8, 3), None);
}

#[test]
fn a_reservation_in_a_cold_pool_takes_the_slots_warmed_first() {
    // Not warmed in the background during the test.
    let pool = BufferPool::new(8 * 4096, 4096, Duration::from_secs(3600)).unwrap();
    let ranges = pool.reserve_for(3, 1).expect("cold slots");
    assert_eq!(ranges, vec![(0, 3 * 4096)]);
    let next = pool.reserve_for(2, 2).expect("the next cold slots");
    assert_eq!(next, vec![(3 * 4096, 2 * 4096)]);
    // A checkpoint warms in order, and each rank gets its own.
    pool.warm_up_to(5 * 4096);
    let two = pool.try_take_warm_for(2, 2).unwrap();
    let one = pool.try_take_warm_for(3, 1).unwrap();
    let mut at: Vec<u64> = one.iter().map(Slot::offset).collect();
    at.sort_unstable();
    assert_eq!(at, vec![0, 4096, 2 * 4096]);
    assert!(two
        .iter()
        .all(|s| s.offset() >= 3 * 4096 && s.offset() < 5 * 4096));
}

#[test]
fn a_pool_warmed_as_wanted_warms_what_is_wanted_and_no_more() {
    // No delay: the background thread would warm all 32 slots at once if
    // it warmed the budget rather than what is asked for.
    let pool = BufferPool::as_wanted(32 << 20, 1 << 20, Duration::ZERO).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.warm_bytes(), 0, "warmed before anything was wanted");
    pool.want((3 << 20) - 5);
    wait_for_warm(&pool, 3 << 20);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.warm_bytes(), 3 << 20, "warmed past what was wanted");
    // Wanting less takes nothing back; wanting more warms more.
    pool.want(1 << 20);
    assert_eq!(pool.wanted_bytes(), 3 << 20);
    pool.want(6 << 20);
    wait_for_warm(&pool, 6 << 20);
    // A taker still gets slots past what was wanted, warming them itself.
    let taken = pool
        .try_take(10)
        .expect("cold slots are warmed by the taker");
    assert_eq!(taken.len(), 10);
    assert_eq!(pool.warm_bytes(), 10 << 20);
    // Past the budget, the whole budget.
    pool.want(u64::MAX);
    assert_eq!(pool.wanted_bytes(), 32 << 20);
    drop(taken);
    wait_for_warm(&pool, 32 << 20);
}

fn wait_for_warm(pool: &BufferPool, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pool.warm_bytes() < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {bytes} bytes warm",
            pool.warm_bytes()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn warming_starts_before_the_delay_is_out_once_asked() {
    let pool = BufferPool::as_wanted(8 << 20, 1 << 20, Duration::from_secs(3600)).unwrap();
    pool.want(3 << 20);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pool.warming_started());
    assert_eq!(pool.warm_bytes(), 0, "warmed inside the delay");
    pool.start_warming();
    wait_for_warm(&pool, 3 << 20);
    assert!(pool.warming_started());
    // Asked again: nothing changes.
    pool.start_warming();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pool.warm_bytes(), 3 << 20);
}
