//! How much of the copy budget the agent keeps warm.
//!
//! The budget ([`crate::config`]) is a cap: an eighth of the node's RAM by
//! default, far more than most jobs' state. A page of it once faulted in
//! stays the agent's for the job's life, so warming all of it took memory
//! the application may need (gigabytes for a job of a few hundred MiB per
//! node) and idle-priority CPU and memory bandwidth while the ranks run.
//! The agent instead keeps warm what its ranks are expected to copy, with
//! a margin, and follows that as their state grows; a checkpoint that needs
//! more warms the rest itself while its ranks head for their safe point
//! (`epoch::warm_for`).
//!
//! Once the budget is warm for them, each rank that copies itself is also
//! told, while it runs, which slots its first parked copy will take
//! (`FillView` with epoch 0), so that it fills its view of them before that
//! copy rather than in its pause: 30 ms of a first pause of 52 ms for a
//! rank of 256 MiB. Each resume tells it the next copy's (`epoch::rank`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cryo_core::protocol::{AgentToRank, EARLY_FILL_VERSION};

use crate::epoch::lock;
use crate::pool::BufferPool;
use crate::procfs::resident_anon_bytes;
use crate::ranks::{RankConn, OFFERS_DONE};
use crate::self_copy::{SelfCopy, SELF_COPY_MIN_BYTES};
use crate::server::Shared;

/// How often the expected copy is looked at again.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Slots kept warm past the expected copy: room for a region that grows
/// between two looks, and for a rank's odd pieces.
const SPARE_SLOTS: u64 = 4;

/// What a checkpoint of `ranks` is likely to copy (see [`expected_of`]).
pub(crate) fn expected_copy(ranks: &[Arc<RankConn>]) -> u64 {
    ranks.iter().map(|conn| expected_of(conn)).sum()
}

/// What a checkpoint of one rank is likely to copy: what its last capture
/// stored; before any, the bytes of the regions and protected buffers it
/// registered so far (a runtime of protocol version 11 says so in the
/// control page), or else its resident anonymous memory (those and
/// whatever else it allocated: for a Python rank with a 16 MiB region,
/// about 50 MiB).
fn expected_of(conn: &RankConn) -> u64 {
    let stored = lock(&conn.baseline)
        .as_ref()
        .map(|baseline| baseline.regions.iter().map(|r| r.len).sum::<u64>());
    let registered = conn.page.page().region_bytes.load(Ordering::Acquire);
    stored
        .or((registered > 0).then_some(registered))
        .or_else(|| resident_anon_bytes(conn.pid))
        .unwrap_or(0)
}

/// How much to keep warm for an expected copy of `bytes`: an eighth more
/// and a few slots.
pub(crate) fn to_keep_warm(bytes: u64, slot_size: u64) -> u64 {
    bytes
        .saturating_add(bytes / 8)
        .saturating_add(SPARE_SLOTS.saturating_mul(slot_size))
}

/// Whether the start of the node's `ranks` is over: each has passed a safe
/// point since `cryo_init` (a runtime of protocol version 12 says so in
/// the control page). Their launcher, `MPI_Init` and first allocations are
/// behind them, so warming the budget no longer slows the job's start; an
/// older runtime never says so, and the pre-fault delay decides.
fn start_is_over(ranks: &[Arc<RankConn>]) -> bool {
    !ranks.is_empty()
        && ranks
            .iter()
            .all(|conn| conn.page.page().computing.load(Ordering::Acquire) != 0)
}

/// Tells the pool, once a second, what the node's ranks need warm (and to
/// start warming it once their start is over, if the pre-fault delay is
/// not out yet), and each rank, once that is warm, where its first parked
/// copy goes; until the agent is gone or shut down.
pub(crate) fn keep_warm(shared: Weak<Shared>) {
    loop {
        let Some(agent) = shared.upgrade() else {
            return;
        };
        if agent.shutdown.load(Ordering::Acquire) {
            return;
        }
        let ranks: Vec<Arc<RankConn>> = lock(&agent.ranks).values().cloned().collect();
        if !ranks.is_empty() {
            let expected: Vec<u64> = ranks.iter().map(|conn| expected_of(conn)).collect();
            let total: u64 = expected.iter().sum();
            let slot = agent.pool.slot_size() as u64;
            agent.pool.want(to_keep_warm(total, slot));
            if agent.config.prefault_early && start_is_over(&ranks) {
                agent.pool.start_warming();
            }
            let self_copy = agent.config.self_copy.for_epoch(ranks.len());
            // Not before the pool's own warm-up may start: the fill is
            // the rank's own page faults, on its cores.
            if agent.pool.warming_started()
                && self_copy == SelfCopy::On
                && agent.pool.warm_bytes() >= total
            {
                for (conn, &bytes) in ranks.iter().zip(&expected) {
                    offer_first_slots(&agent.pool, conn, bytes, ranks.len());
                }
            }
        }
        drop(agent);
        std::thread::sleep(LOOK_EVERY);
    }
}

/// Tells `conn`'s rank, while it runs, which slots its first parked copy
/// of about `bytes` will take (at most its share of the budget among the
/// node's `local_ranks`), if it has not been through a checkpoint yet and
/// its runtime reads such offers. Again as its state grows. A send that
/// fails costs only the early fill: the copy fills what it must.
fn offer_first_slots(pool: &BufferPool, conn: &RankConn, bytes: u64, local_ranks: usize) {
    let offered = conn.offered_slots.load(Ordering::Acquire);
    if conn.version < EARLY_FILL_VERSION || offered == OFFERS_DONE || bytes < SELF_COPY_MIN_BYTES {
        return;
    }
    let share = pool.slots() / local_ranks.max(1);
    let slots = usize::try_from(bytes.div_ceil(pool.slot_size() as u64))
        .unwrap_or(usize::MAX)
        .min(share);
    if slots <= offered {
        return;
    }
    // Not over a checkpoint's resume that came meanwhile.
    if conn
        .offered_slots
        .compare_exchange(offered, slots, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let Some(ranges) = pool.reserve_for(slots, conn.rank) else {
        return;
    };
    let filled: u64 = ranges.iter().map(|r| r.1).sum();
    let offer = AgentToRank::FillView { epoch: 0, ranges };
    match conn.send_with_fd(&offer, pool.memfd()) {
        Ok(()) => tracing::info!(rank = conn.rank, bytes = filled, "rank.fill_view_early"),
        Err(error) => {
            tracing::debug!(rank = conn.rank, error = %error, "rank.fill_view_early_unsent")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use cryo_core::protocol::{
        recv_message_with_fd, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC, PROTOCOL_VERSION,
    };
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    use crate::capture::RegionHeat;
    use crate::ranks::PageMap;

    /// A registered rank of `version` (this process stands in for it),
    /// and the rank's end of its socket.
    fn registered(version: u16) -> (RankConn, UnixStream) {
        let memfd = memfd_create(
            c"warming-test-page",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&memfd, i64::try_from(CONTROL_PAGE_LEN).unwrap()).unwrap();
        fcntl(
            memfd.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK),
        )
        .unwrap();
        nix::unistd::write(&memfd, &CONTROL_PAGE_MAGIC.to_ne_bytes()).unwrap();
        let (agent, rank) = UnixStream::pair().unwrap();
        let (_tx, rx) = std::sync::mpsc::channel();
        let conn = RankConn {
            rank: 3,
            pid: std::process::id(),
            version,
            writer: Mutex::new(agent),
            page: PageMap::map(&memfd).unwrap(),
            events: Mutex::new(rx),
            alive: AtomicBool::new(true),
            early: Mutex::new(None),
            baseline: Mutex::new(None),
            heat: Mutex::new(RegionHeat::new()),
            offered_slots: std::sync::atomic::AtomicUsize::new(0),
        };
        (conn, rank)
    }

    #[test]
    fn the_margin_is_an_eighth_and_four_slots() {
        assert_eq!(to_keep_warm(0, 1 << 20), 4 << 20);
        assert_eq!(to_keep_warm(512 << 20, 1 << 20), (576 + 4) << 20);
        assert_eq!(to_keep_warm(u64::MAX, 1 << 20), u64::MAX);
    }

    #[test]
    fn before_a_capture_the_registered_regions_count_not_all_anonymous_memory() {
        let (conn, _rank) = registered(PROTOCOL_VERSION);
        // An older runtime says nothing: the process's resident memory.
        assert!(expected_of(&conn) > 0);
        conn.page
            .page()
            .region_bytes
            .store(12_345, Ordering::Release);
        assert_eq!(expected_of(&conn), 12_345);
    }

    #[test]
    fn the_start_is_over_once_every_rank_has_passed_a_safe_point() {
        assert!(!start_is_over(&[]), "no rank yet");
        let (first, _r1) = registered(PROTOCOL_VERSION);
        let (second, _r2) = registered(PROTOCOL_VERSION);
        let ranks = [Arc::new(first), Arc::new(second)];
        assert!(!start_is_over(&ranks));
        ranks[0].page.page().computing.store(1, Ordering::Release);
        assert!(!start_is_over(&ranks), "one rank still starting");
        ranks[1].page.page().computing.store(1, Ordering::Release);
        assert!(start_is_over(&ranks));
    }

    #[test]
    fn a_running_rank_is_offered_its_first_slots_once_and_again_as_it_grows() {
        let pool = BufferPool::as_wanted(64 << 20, 1 << 20, Duration::ZERO).unwrap();
        pool.warm_up_to(64 << 20);
        let (conn, rank) = registered(PROTOCOL_VERSION);
        rank.set_nonblocking(true).unwrap();
        let offered = |rank: &UnixStream| -> Option<u64> {
            match recv_message_with_fd::<AgentToRank>(rank) {
                Ok((AgentToRank::FillView { epoch: 0, ranges }, Some(_fd))) => {
                    Some(ranges.iter().map(|r| r.1).sum())
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => None,
            }
        };
        offer_first_slots(&pool, &conn, 8 << 20, 2);
        assert_eq!(offered(&rank), Some(8 << 20));
        // The same again: nothing new to tell.
        offer_first_slots(&pool, &conn, 8 << 20, 2);
        assert_eq!(offered(&rank), None);
        // Grown: all of its slots, at most its share of the budget.
        offer_first_slots(&pool, &conn, 48 << 20, 2);
        assert_eq!(offered(&rank), Some(32 << 20));
        // Too small to copy itself, or through a checkpoint: none.
        let (small, small_rank) = registered(PROTOCOL_VERSION);
        small_rank.set_nonblocking(true).unwrap();
        offer_first_slots(&pool, &small, SELF_COPY_MIN_BYTES - 1, 2);
        assert_eq!(offered(&small_rank), None);
        small.offered_slots.store(OFFERS_DONE, Ordering::Release);
        offer_first_slots(&pool, &small, 8 << 20, 2);
        assert_eq!(offered(&small_rank), None);
        // A runtime that would not read it while it runs: none.
        let (old, old_rank) = registered(EARLY_FILL_VERSION - 1);
        old_rank.set_nonblocking(true).unwrap();
        offer_first_slots(&pool, &old, 8 << 20, 2);
        assert_eq!(offered(&old_rank), None);
    }
}
