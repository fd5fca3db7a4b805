//! One registered rank, as the agent holds it: its socket, its control
//! page mapped here, and the events its reader thread forwards to whoever
//! runs an epoch.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Mutex;

use cryo_core::protocol::{
    send_message_with_fd_as, write_message_as, AgentToRank, ControlPage, CopyOutcome, Departure,
    SnapshotOutcome, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC, TERMINATION_VERSION,
};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::capture::{Parked, RegionHeat};
use crate::tracking::Baseline;

/// What a rank's reader thread forwards to the epoch in progress.
pub(crate) enum RankEvent {
    Parked(Parked),
    Gone(Departure),
    /// The rank refused to park for the epoch (MPI: message in flight).
    Refused {
        epoch: u64,
        reason: String,
    },
    /// The rank's answer to a request for a snapshot.
    Snapshot {
        epoch: u64,
        outcome: SnapshotOutcome,
    },
    /// The rank's answer to a request to copy its own memory.
    Copied {
        epoch: u64,
        outcome: CopyOutcome,
    },
}

/// The control page of a rank, mapped in the agent.
pub(crate) struct PageMap {
    addr: usize,
}

impl PageMap {
    pub(crate) fn map(fd: &OwnedFd) -> Result<PageMap, String> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|e| format!("control page fd: F_GET_SEALS: {e}"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err("control page memfd is not sealed against shrinking".into());
        }
        let size = nix::sys::stat::fstat(fd.as_raw_fd())
            .map_err(|e| format!("control page fd: fstat: {e}"))?
            .st_size;
        if u64::try_from(size).unwrap_or(0) < CONTROL_PAGE_LEN as u64 {
            return Err(format!(
                "control page is {size} bytes, expected {CONTROL_PAGE_LEN}"
            ));
        }
        let len = NonZeroUsize::new(CONTROL_PAGE_LEN).ok_or("zero page length")?;
        // SAFETY: a new shared mapping of the rank's sealed memfd at an
        // address the kernel picks; the seal guarantees it stays 4 KiB.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(|e| format!("mapping the control page: {e}"))?;
        let map = PageMap {
            addr: ptr.as_ptr() as usize,
        };
        if map.page().magic.load(Ordering::Acquire) != CONTROL_PAGE_MAGIC {
            return Err("control page has a bad magic".into());
        }
        Ok(map)
    }

    pub(crate) fn page(&self) -> &ControlPage {
        // SAFETY: `addr` is a live, page-aligned, 4 KiB shared mapping owned
        // by self, and ControlPage holds only atomics.
        unsafe { &*(self.addr as *const ControlPage) }
    }
}

impl Drop for PageMap {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.addr as *mut libc::c_void) {
            // SAFETY: we mapped exactly this range and nothing borrows it
            // past the PageMap's life.
            let _ = unsafe { munmap(ptr, CONTROL_PAGE_LEN) };
        }
    }
}

pub(crate) struct RankConn {
    pub(crate) rank: u32,
    pub(crate) pid: u32,
    /// The protocol version the rank's runtime speaks: it is answered in
    /// that version's layouts.
    pub(crate) version: u16,
    pub(crate) writer: Mutex<UnixStream>,
    pub(crate) page: PageMap,
    pub(crate) events: Mutex<Receiver<RankEvent>>,
    pub(crate) alive: AtomicBool,
    /// Coordinated mode: the rank parked for an epoch this agent has not
    /// started yet (MPI ranks agree on the epoch among themselves).
    pub(crate) early: Mutex<Option<Parked>>,
    /// The regions as this process's last capture stored them, when that
    /// capture's part is durable: unwritten chunks are reused from it.
    /// Taken by each capture and put back only once its part is durable,
    /// since the write-tracking scan of a failed capture is lost.
    pub(crate) baseline: Mutex<Option<Baseline>>,
    /// Which of this process's regions are hot (rewritten whole between
    /// captures) and so copied without being scanned and protected again.
    pub(crate) heat: Mutex<RegionHeat>,
    /// Slots of the budget offered to the rank, while it ran, for its first
    /// parked copy ([`crate::warming`]); [`OFFERS_DONE`] once it has been
    /// resumed from one (each resume offers the next copy's).
    pub(crate) offered_slots: AtomicUsize,
}

/// [`RankConn::offered_slots`] once the rank has been through a checkpoint.
pub(crate) const OFFERS_DONE: usize = usize::MAX;

impl RankConn {
    pub(crate) fn send(&self, msg: &AgentToRank) -> Result<(), String> {
        let mut sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_message_as(&mut *sock, msg, self.version)
            .map_err(|e| format!("rank {} (pid {}): {e}", self.rank, self.pid))
    }

    /// Tells the rank that a `SIGTERM` may end it (`AgentToRank::Held`,
    /// protocol version 17; nothing to an older rank): `epoch`, the
    /// checkpoint before the stop, is committed, or with 0 no checkpoint
    /// will answer one (its coordinator is out of reach).
    pub(crate) fn tell_held(&self, epoch: u64) -> Result<(), String> {
        if self.version < TERMINATION_VERSION {
            return Ok(());
        }
        self.send(&AgentToRank::Held { epoch })
    }

    /// [`RankConn::tell_held`] with epoch 0: no checkpoint will answer a
    /// `SIGTERM`, so one ends the rank as it would have.
    pub(crate) fn tell_unanswered(&self) {
        let _ = self.tell_held(0);
    }

    /// Sends `msg` with `fd` attached (`SCM_RIGHTS`).
    pub(crate) fn send_with_fd(&self, msg: &AgentToRank, fd: BorrowedFd<'_>) -> Result<(), String> {
        let sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        send_message_with_fd_as(&sock, msg, fd, self.version)
            .map_err(|e| format!("rank {} (pid {}): {e}", self.rank, self.pid))
    }

    /// Tells a parked rank to carry on without a checkpoint of `epoch`.
    pub(crate) fn abort(&self, epoch: u64, reason: &impl std::fmt::Display) {
        let _ = self.send(&AgentToRank::Abort {
            epoch,
            reason: reason.to_string(),
        });
    }

    /// Withdraws the request for `epoch` if the rank has not taken it;
    /// true if it had (it is parking, or parked).
    pub(crate) fn withdraw_request(&self, epoch: u64) -> bool {
        self.page
            .page()
            .checkpoint_requested
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    }
}

impl crate::server::Shared {
    /// The registered ranks, in rank order.
    pub(crate) fn rank_conns(&self) -> Vec<std::sync::Arc<RankConn>> {
        crate::epoch::lock(&self.ranks).values().cloned().collect()
    }
}
