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

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::epoch::lock;
use crate::procfs::resident_anon_bytes;
use crate::ranks::RankConn;
use crate::server::Shared;

/// How often the expected copy is looked at again.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Slots kept warm past the expected copy: room for a region that grows
/// between two looks, and for a rank's odd pieces.
const SPARE_SLOTS: u64 = 4;

/// What a checkpoint of `ranks` is likely to copy: what each rank's last
/// capture stored, or, before any, its resident anonymous memory (its
/// regions and protected buffers, and whatever else it allocated).
pub(crate) fn expected_copy(ranks: &[Arc<RankConn>]) -> u64 {
    ranks
        .iter()
        .map(|conn| {
            let stored = lock(&conn.baseline)
                .as_ref()
                .map(|baseline| baseline.regions.iter().map(|r| r.len).sum::<u64>());
            stored
                .or_else(|| resident_anon_bytes(conn.pid))
                .unwrap_or(0)
        })
        .sum()
}

/// How much to keep warm for an expected copy of `bytes`: an eighth more
/// and a few slots.
pub(crate) fn to_keep_warm(bytes: u64, slot_size: u64) -> u64 {
    bytes
        .saturating_add(bytes / 8)
        .saturating_add(SPARE_SLOTS.saturating_mul(slot_size))
}

/// Tells the pool, once a second, what the node's ranks need warm, until
/// the agent is gone or shut down.
pub(crate) fn keep_warm(shared: Weak<Shared>) {
    loop {
        let Some(agent) = shared.upgrade() else {
            return;
        };
        if agent.shutdown.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let ranks: Vec<Arc<RankConn>> = lock(&agent.ranks).values().cloned().collect();
        if !ranks.is_empty() {
            let slot = agent.pool.slot_size() as u64;
            agent.pool.want(to_keep_warm(expected_copy(&ranks), slot));
        }
        drop(agent);
        std::thread::sleep(LOOK_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_an_eighth_and_four_slots() {
        assert_eq!(to_keep_warm(0, 1 << 20), 4 << 20);
        assert_eq!(to_keep_warm(512 << 20, 1 << 20), (576 + 4) << 20);
        assert_eq!(to_keep_warm(u64::MAX, 1 << 20), u64::MAX);
    }
}
