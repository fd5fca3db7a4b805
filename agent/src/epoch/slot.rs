//! The agent's one epoch slot: which epoch is running, how to cancel it,
//! which epochs are over, and the epochs ranks parked for early.
//!
//! Pure bookkeeping under one lock, so every transition is a unit test.
//! The parked ranks themselves stay with their connections
//! ([`crate::ranks::RankConn::early`]); the slot knows only their epochs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cryo_core::protocol::AbortReason;

use super::lock;

/// How many aborted epochs the slot remembers (a `Checkpoint` that arrives
/// after its `Abort` is then skipped).
const ABORTED_KEPT: usize = 64;

/// Stops an epoch in progress (coordinator `Abort`, lost coordinator,
/// shutdown, a failed rank) and, once the epoch is over, closes it to late
/// parks.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    flag: AtomicBool,
    reason: Mutex<Option<AbortReason>>,
    coordinated: bool,
}

impl Cancel {
    pub(crate) fn new(coordinated: bool) -> Cancel {
        Cancel {
            coordinated,
            ..Cancel::default()
        }
    }

    /// Aborts the epoch; the first reason wins.
    pub(crate) fn cancel(&self, reason: AbortReason) {
        lock(&self.reason).get_or_insert(reason);
        self.flag.store(true, Ordering::Release);
    }

    /// The epoch is over: ranks parking for it now get `Abort` at once.
    pub(crate) fn close(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether the epoch is cancelled or over.
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The flag itself, for loops that poll it (the capture).
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Why the epoch was cancelled, if it was.
    pub(crate) fn reason(&self) -> Option<AbortReason> {
        lock(&self.reason).clone()
    }
}

/// Whether a coordinated `Checkpoint { epoch }` may start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Start it.
    Go,
    /// It is already running (a duplicate request): ignore it.
    Duplicate,
    /// The coordinator aborted it before it started: skip it.
    Aborted,
    /// Another epoch is still running: wait for it, or give up.
    Busy(u64),
    /// An epoch this new was already started or given up on.
    NotNewer {
        /// The newest epoch the slot has seen.
        newest: u64,
    },
}

/// The agent's epoch state.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    busy: Option<u64>,
    /// Cancels the busy epoch.
    cancel: Option<Arc<Cancel>>,
    /// The newest epoch started, aborted or given up on.
    last_epoch: u64,
    /// Coordinated: epochs ranks parked for before their `Checkpoint`
    /// arrived, and when to give up on them.
    early: BTreeMap<u64, Instant>,
    /// Coordinated: recent epochs the coordinator aborted.
    aborted: BTreeSet<u64>,
    /// Coordinated: the last epoch whose parts this agent wrote, and for
    /// which ranks (removed if the coordinator aborts it afterwards).
    written: Option<(u64, Vec<u32>)>,
}

impl Slot {
    /// The running epoch.
    pub(crate) fn busy(&self) -> Option<u64> {
        self.busy
    }

    /// The newest epoch started, aborted or given up on.
    pub(crate) fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// Whether a rank parking for `epoch` joins the running epoch.
    pub(crate) fn is_open(&self, epoch: u64) -> bool {
        self.busy == Some(epoch) && self.cancel.as_ref().is_some_and(|c| !c.is_set())
    }

    /// Whether a coordinated `Checkpoint { epoch }` may start now.
    pub(crate) fn admit(&self, epoch: u64) -> Admission {
        if self.busy == Some(epoch) {
            Admission::Duplicate
        } else if self.aborted.contains(&epoch) {
            Admission::Aborted
        } else if let Some(busy) = self.busy {
            Admission::Busy(busy)
        } else if epoch <= self.last_epoch {
            Admission::NotNewer {
                newest: self.last_epoch,
            }
        } else {
            Admission::Go
        }
    }

    /// Marks `epoch` running (the caller checked that nothing is). Early
    /// parks up to `epoch` are no longer waited for: the caller takes them.
    pub(crate) fn begin(&mut self, epoch: u64, coordinated: bool) -> Arc<Cancel> {
        debug_assert!(self.busy.is_none(), "an epoch is already running");
        let cancel = Arc::new(Cancel::new(coordinated));
        self.busy = Some(epoch);
        self.cancel = Some(Arc::clone(&cancel));
        self.last_epoch = self.last_epoch.max(epoch);
        self.early.retain(|e, _| *e > epoch);
        cancel
    }

    /// The running epoch is over. `written`: the ranks whose parts stay
    /// until the coordinator commits or aborts it (coordinated success).
    /// Returns why it was cancelled, if it was.
    pub(crate) fn end(
        &mut self,
        cancel: &Cancel,
        written: Option<(u64, Vec<u32>)>,
    ) -> Option<AbortReason> {
        cancel.close();
        let reason = cancel.reason();
        if reason.is_none() {
            if let Some(written) = written {
                self.written = Some(written);
            }
        }
        self.busy = None;
        self.cancel = None;
        reason
    }

    /// Holds a park for `epoch`, which the coordinator has not asked for
    /// yet, until `give_up`; false if that epoch is already over here.
    pub(crate) fn hold_early(&mut self, epoch: u64, give_up: Instant) -> bool {
        if epoch <= self.last_epoch {
            return false;
        }
        self.early.entry(epoch).or_insert(give_up);
        true
    }

    /// When the next held early park is given up on.
    pub(crate) fn next_give_up(&self) -> Option<Instant> {
        self.early.values().min().copied()
    }

    /// Gives up on the held early parks whose time has come; returns the
    /// newest such epoch (every park up to it is then aborted).
    pub(crate) fn expire_early(&mut self, now: Instant) -> Option<u64> {
        let newest = self
            .early
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(e, _)| *e)
            .max()?;
        self.early.retain(|e, _| *e > newest);
        self.last_epoch = self.last_epoch.max(newest);
        Some(newest)
    }

    /// The coordinator aborted `epoch`: cancel it if it runs, never start
    /// it, and hand back the ranks whose parts of it this agent wrote.
    pub(crate) fn abort(&mut self, epoch: u64, reason: &AbortReason) -> Vec<u32> {
        self.aborted.insert(epoch);
        while self.aborted.len() > ABORTED_KEPT {
            self.aborted.pop_first();
        }
        self.last_epoch = self.last_epoch.max(epoch);
        self.early.retain(|e, _| *e > epoch);
        if self.busy == Some(epoch) {
            if let Some(cancel) = &self.cancel {
                cancel.cancel(reason.clone());
            }
        }
        match self.written.take() {
            Some((e, ranks)) if e == epoch => ranks,
            other => {
                self.written = other;
                Vec::new()
            }
        }
    }

    /// The coordinator committed `epoch`: its parts are no longer ours to
    /// remove.
    pub(crate) fn committed(&mut self, epoch: u64) {
        if self.written.as_ref().is_some_and(|(e, _)| *e == epoch) {
            self.written = None;
        }
    }

    /// The coordinator is gone or the job ends: cancel its running epoch
    /// and stop waiting for every early one.
    pub(crate) fn abandon_coordinated(&mut self, reason: &AbortReason) {
        if let Some(cancel) = self.cancel.as_ref().filter(|c| c.coordinated) {
            cancel.cancel(reason.clone());
        }
        if let Some(max) = self.early.keys().next_back().copied() {
            self.last_epoch = self.last_epoch.max(max);
        }
        self.early.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn shutting() -> AbortReason {
        AbortReason::ShuttingDown
    }

    #[test]
    fn one_epoch_at_a_time_and_only_newer_ones() {
        let mut slot = Slot::default();
        assert_eq!(slot.admit(3), Admission::Go);
        let cancel = slot.begin(3, true);
        assert!(slot.is_open(3));
        assert!(!slot.is_open(4));
        assert_eq!(slot.admit(3), Admission::Duplicate);
        assert_eq!(slot.admit(4), Admission::Busy(3));
        assert_eq!(slot.end(&cancel, Some((3, vec![0, 1]))), None);
        assert!(!slot.is_open(3), "an ended epoch is closed to parks");
        assert_eq!(slot.admit(3), Admission::NotNewer { newest: 3 });
        assert_eq!(slot.admit(2), Admission::NotNewer { newest: 3 });
        assert_eq!(slot.admit(4), Admission::Go);
    }

    #[test]
    fn an_abort_cancels_the_running_epoch_and_returns_its_parts_once() {
        let mut slot = Slot::default();
        let cancel = slot.begin(5, true);
        assert!(slot.abort(5, &shutting()).is_empty(), "nothing written yet");
        assert!(cancel.is_set());
        assert!(!slot.is_open(5));
        assert_eq!(slot.end(&cancel, Some((5, vec![1]))), Some(shutting()));
        // A cancelled epoch leaves no parts to remove later.
        assert!(slot.abort(5, &shutting()).is_empty());

        let cancel = slot.begin(6, true);
        assert_eq!(slot.end(&cancel, Some((6, vec![0, 2]))), None);
        assert_eq!(slot.abort(6, &shutting()), vec![0, 2]);
        assert!(slot.abort(6, &shutting()).is_empty(), "handed back once");
        assert_eq!(slot.admit(6), Admission::Aborted);
    }

    #[test]
    fn an_abort_before_the_checkpoint_skips_it() {
        let mut slot = Slot::default();
        slot.abort(9, &shutting());
        assert_eq!(slot.admit(9), Admission::Aborted);
        assert_eq!(slot.admit(10), Admission::Go);
    }

    #[test]
    fn a_commit_keeps_the_parts() {
        let mut slot = Slot::default();
        let cancel = slot.begin(2, true);
        slot.end(&cancel, Some((2, vec![0])));
        slot.committed(2);
        assert!(slot.abort(2, &shutting()).is_empty());
    }

    #[test]
    fn first_cancel_reason_wins() {
        let cancel = Cancel::new(true);
        cancel.cancel(AbortReason::ShuttingDown);
        cancel.cancel(AbortReason::Busy { busy: 1 });
        assert_eq!(cancel.reason(), Some(AbortReason::ShuttingDown));
    }

    #[test]
    fn early_parks_wait_until_their_time_then_close_their_epochs() {
        let mut slot = Slot::default();
        let now = Instant::now();
        assert!(slot.hold_early(4, now + Duration::from_secs(1)));
        assert!(slot.hold_early(5, now + Duration::from_secs(2)));
        assert_eq!(slot.next_give_up(), Some(now + Duration::from_secs(1)));
        assert_eq!(slot.expire_early(now), None);
        assert_eq!(
            slot.expire_early(now + Duration::from_millis(1500)),
            Some(4)
        );
        assert_eq!(slot.admit(4), Admission::NotNewer { newest: 4 });
        assert!(
            !slot.hold_early(4, now),
            "a given-up epoch is not held again"
        );
        assert_eq!(slot.admit(5), Admission::Go);
        // Starting epoch 5 takes its early parks off the watch.
        let cancel = slot.begin(5, true);
        assert_eq!(slot.next_give_up(), None);
        slot.end(&cancel, None);
    }

    #[test]
    fn losing_the_coordinator_abandons_running_and_early_epochs() {
        let mut slot = Slot::default();
        let cancel = slot.begin(1, true);
        assert!(slot.hold_early(3, Instant::now()));
        slot.abandon_coordinated(&shutting());
        assert!(cancel.is_set());
        assert_eq!(slot.next_give_up(), None);
        slot.end(&cancel, None);
        assert_eq!(slot.admit(3), Admission::NotNewer { newest: 3 });
        // A standalone epoch is not the coordinator's to cancel.
        let own = slot.begin(4, false);
        slot.abandon_coordinated(&shutting());
        assert!(!own.is_set());
    }
}
