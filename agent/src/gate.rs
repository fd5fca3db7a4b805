//! The gate between a node's ranks in one epoch: parked ranks copy in
//! turns, and no chunk is compressed nor snapshot read while a rank of the
//! epoch has yet to resume.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::pool::BufferPool;

/// Ranks parked together copy in turns, each at the node's full memory
/// bandwidth, so the first resume early rather than all late; and no rank's
/// chunks are compressed, nor its snapshot read, while another rank of the
/// epoch has yet to resume (on its way to the safe point, planning its copy
/// or copying), so that this work never slows a pause down: in a coupled
/// code a rank resumed early waits for the last one at its next exchange.
#[derive(Debug, Default)]
pub struct CopyGate {
    turn: Mutex<()>,
    copying: Mutex<usize>,
    idle: Condvar,
}

/// How often a rank waiting at the gate looks whether the budget ran dry.
const STARVED_LOOK: Duration = Duration::from_millis(10);

impl CopyGate {
    /// Counts a rank of an epoch until the returned hold is dropped (at its
    /// resume, or when its capture ends otherwise). An epoch takes one for
    /// each of its ranks before any of them is captured.
    pub fn hold(&self) -> GateHold<'_> {
        *self.copying.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        GateHold(self)
    }

    /// Waits for this node's turn to copy a parked rank.
    pub(crate) fn take_turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leave(&self) {
        let mut copying = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        *copying = copying.saturating_sub(1);
        drop(copying);
        self.idle.notify_all();
    }

    /// Waits until no rank is counted, or until `pool` has no slot left to
    /// give (a rank still to be copied would otherwise wait for the slots
    /// this caller holds, and this caller for it).
    pub(crate) fn wait_idle(&self, pool: &BufferPool) {
        let mut copying = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        while *copying > 0 && !pool.starved() {
            copying = self
                .idle
                .wait_timeout(copying, STARVED_LOOK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A rank counted by its [`CopyGate`] until dropped.
#[derive(Debug)]
pub struct GateHold<'a>(&'a CopyGate);

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_compression_until_every_rank_resumed() {
        let gate = CopyGate::default();
        let pool = BufferPool::new(4 << 20, 1 << 20, Duration::ZERO).unwrap();
        pool.wait_warm();
        let (on_its_way, parked) = (gate.hold(), gate.hold());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                gate.wait_idle(&pool);
                tx.send(()).unwrap();
            });
            drop(parked);
            let waited = Duration::from_millis(100);
            assert!(rx.recv_timeout(waited).is_err(), "passed a rank on its way");
            drop(on_its_way);
            rx.recv_timeout(Duration::from_secs(10))
                .expect("still waiting once every rank resumed");
        });
    }

    #[test]
    fn a_rank_waiting_at_the_gate_gives_way_when_the_budget_ran_dry() {
        // Resumed ranks hold every slot of the budget, their chunks waiting
        // for the gate, while another rank is parked: it could get no slot
        // until they store theirs, and they would wait for it for ever.
        let gate = CopyGate::default();
        let pool = BufferPool::new(4 << 20, 1 << 20, Duration::ZERO).unwrap();
        let held = pool.try_take(4).unwrap();
        let parked = gate.hold();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                gate.wait_idle(&pool);
                tx.send(()).unwrap();
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("waited for a parked rank that needs the slots it holds");
        });
        drop((held, parked));
    }
}
