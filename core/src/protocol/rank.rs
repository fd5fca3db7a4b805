//! Between a rank and its node agent: how the rank starts, what it says when
//! parked, the agent's answers, and the control page they share.
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{Command, Message};
use crate::format::manifest::RegionKind;
/// How a rank starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartMode {
    /// A fresh start: nothing to restore.
    Fresh,
    /// A restart from a committed epoch.
    Restart {
        /// The epoch.
        epoch: u64,
        /// The store root directory.
        store: String,
        /// The job in the store.
        job: String,
    },
}

/// A region as the rank describes it when parked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Region name.
    pub name: String,
    /// Address in the rank.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// How its memory is provided.
    pub kind: RegionKind,
}

/// Messages from a rank to its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankToAgent {
    /// The rank is parked at a safe point for `epoch`.
    Parked {
        /// The epoch requested in the control page.
        epoch: u64,
        /// The rank's regions.
        regions: Vec<RegionInfo>,
        /// The runtime's own fds (socket, control page), never restored.
        runtime_fds: Vec<i32>,
        /// Fds that were open when the runtime started (`cryo_init`, after
        /// `MPI_Init`) and still refer to the same file: the MPI library's
        /// and the launcher's, not restored and not warned about (protocol
        /// version 4).
        library_fds: Vec<i32>,
        /// What the rank found it holds that a restart cannot give back (a
        /// mapping of a deleted file, a file written in place over its cap),
        /// for the manifest (protocol version 4).
        warnings: Vec<String>,
    },
    /// The rank finished restoring its files from `epoch`.
    Restored {
        /// The epoch.
        epoch: u64,
    },
    /// Restoring failed; the rank will exit.
    RestoreFailed {
        /// The epoch.
        epoch: u64,
        /// What went wrong.
        error: String,
    },
    /// The rank is finalizing.
    Goodbye,
    /// The ranks agreed on `epoch` but refused to park (MPI mode: a message
    /// was in flight at the safe point); the rank carries on.
    Refused {
        /// The epoch.
        epoch: u64,
        /// Why, naming the rank and the message.
        reason: String,
    },
    /// The answer to [`AgentToRank::Snapshot`] (protocol version 6).
    Snapshot {
        /// The epoch the rank is parked for.
        epoch: u64,
        /// The snapshot, or why there is none.
        outcome: SnapshotOutcome,
    },
    /// The answer to [`AgentToRank::CopyInto`] (protocol version 7).
    Copied {
        /// The epoch the rank is parked for.
        epoch: u64,
        /// Whether it copied.
        outcome: CopyOutcome,
    },
    /// The rank's process is exiting (`exit`, Fortran `STOP`, Python's
    /// `sys.exit`) without having finalized (protocol version 13).
    Exiting {
        /// The status it exits with.
        status: i32,
    },
    /// A warning of the job's end reached the rank: `SIGUSR1`, which Slurm
    /// sends to every task of a job submitted with `--signal=USR1@TIME`
    /// (without `B:`) or preempted with `send_user_signal` (protocol
    /// version 15); or `SIGTERM`, which `scancel` and a preemption without
    /// a warning send to every task (protocol version 17).
    Warned {
        /// The signal's number.
        signal: i32,
    },
}

/// What a parked rank did when asked to copy its own memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyOutcome {
    /// Every piece is in the budget.
    Copied,
    /// Nothing was copied (the request named memory outside the rank's
    /// regions, or the budget could not be mapped): the agent copies.
    Failed {
        /// Why, for the log.
        reason: String,
    },
}

/// One piece of a parked rank's memory to copy into the agent's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyPiece {
    /// Where it starts in the rank (inside one of the regions it parked
    /// with).
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// Where it goes in the budget's memfd.
    pub offset: u64,
}

/// What a parked rank did when asked for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotOutcome {
    /// A frozen copy of the rank runs as `pid` until the agent kills it.
    Taken {
        /// The snapshot's pid.
        pid: u32,
    },
    /// No snapshot: the agent copies while the rank stays parked.
    Failed {
        /// What failed (clone, pidfd_open, …) and the errno.
        reason: String,
    },
}

impl Message for RankToAgent {
    const COMMAND: Command = Command::RankToAgent;
}

/// Messages from an agent to a rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToRank {
    /// Registration accepted.
    Welcome {
        /// Fresh start or restart.
        start: StartMode,
        /// The agent's node name.
        node: String,
    },
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// The rank's memory is copied; it may run again.
    Resume {
        /// The epoch.
        epoch: u64,
    },
    /// The checkpoint was abandoned; the rank may run again.
    Abort {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Clone a frozen copy of yourself for the agent to read once you run
    /// again (copy-on-write capture), and answer with
    /// [`RankToAgent::Snapshot`]; then wait for `Resume` or `Abort` as
    /// before (protocol version 6).
    Snapshot {
        /// The epoch the rank is parked for.
        epoch: u64,
    },
    /// Copy these pieces of your memory into the budget (the memfd sent
    /// with this message as `SCM_RIGHTS`), and answer with
    /// [`RankToAgent::Copied`]; then wait for `Resume` or `Abort` as before
    /// (protocol version 7). A parked rank copies its own memory at memcpy
    /// speed, where the agent's `process_vm_readv` pins every page.
    CopyInto {
        /// The epoch the rank is parked for.
        epoch: u64,
        /// What to copy where.
        pieces: Vec<CopyPiece>,
        /// Threads the rank may copy with (its share of the node's cores).
        threads: u32,
    },
    /// Sent before `Resume`: these ranges of the budget (the memfd sent
    /// with this message) are the slots of your next parked copy; fill your
    /// view of them while you run, so that the copy does not (protocol
    /// version 9). No answer. With epoch 0 it comes while the rank runs,
    /// before its first parked copy, and a thread of the rank's runtime
    /// reads it (protocol version 11).
    FillView {
        /// The epoch the rank is parked for; 0 between checkpoints.
        epoch: u64,
        /// `(offset, length)` in the memfd.
        ranges: Vec<(u64, u64)>,
    },
    /// The rank's part of `epoch`, the checkpoint before the job stops, is
    /// durable, and it stays parked until the job is stopped: a `SIGTERM`
    /// may end it now (protocol version 17). No answer.
    Held {
        /// The epoch the rank is parked for.
        epoch: u64,
    },
}

impl Message for AgentToRank {
    const COMMAND: Command = Command::AgentToRank;
}

/// Length of the control page shared by a rank and its agent.
pub const CONTROL_PAGE_LEN: usize = 4096;
/// Magic in [`ControlPage::magic`]: `CRYOCTL1`.
pub const CONTROL_PAGE_MAGIC: u64 = u64::from_le_bytes(*b"CRYOCTL1");

/// The page a rank shares with its agent (a memfd mapped `MAP_SHARED` by
/// both). Only atomics, so either side may touch it at any time.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ControlPage {
    /// [`CONTROL_PAGE_MAGIC`], written by the rank before sending the fd.
    pub magic: AtomicU64,
    /// Non-zero: the epoch the agent wants captured. The rank's safe point
    /// loads this word and nothing else.
    pub checkpoint_requested: AtomicU64,
    /// The epoch the rank last parked for (written by the rank).
    pub parked_epoch: AtomicU64,
    /// The last epoch the agent resumed the rank from.
    pub resumed_epoch: AtomicU64,
    /// The epoch for which the rank, already parked, is still looking for
    /// a message in flight (written by an MPI rank before `Parked`). The
    /// agent makes that rank's part durable only once
    /// [`ControlPage::probe_verdict`] answers for the epoch. Zero on a
    /// rank that never looks while parked (no MPI, or an older runtime).
    pub probing_epoch: AtomicU64,
    /// What that look found: the epoch, with [`IN_FLIGHT_BIT`] set if a
    /// message was in flight (the rank then also sends `Refused`).
    pub probed: AtomicU64,
    /// The last requested epoch the rank saw at a safe point (written by
    /// an MPI rank, which then waits there for the other ranks to agree on
    /// where to park). A rank that is not parked when the agent gives up
    /// on it either never reached a safe point since the request (this is
    /// not the epoch) or was held there by a rank that did not. Zero from
    /// an older runtime.
    pub seen_epoch: AtomicU64,
    /// Bytes of the rank's regions and protected buffers, written by the
    /// rank as it registers them (protocol version 11): what its first
    /// checkpoint is expected to copy, before the agent has seen one. Zero
    /// from an older runtime.
    pub region_bytes: AtomicU64,
    /// Non-zero once the rank has passed its first safe point since
    /// `cryo_init` (written by the rank, protocol version 12): its start
    /// (launcher, `MPI_Init`, its own allocation) is over, so the agent may
    /// warm its copy budget without slowing it. Zero from an older runtime.
    pub computing: AtomicU64,
}

/// Set in [`ControlPage::probed`] when the rank found a message in flight.
pub const IN_FLIGHT_BIT: u64 = 1 << 63;

/// What a parked rank found when it looked for messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// Nothing in flight: the rank's state is consistent.
    Clear,
    /// A message was in flight: the epoch must not commit.
    InFlight,
}

impl ControlPage {
    /// The rank: it will keep looking for messages in flight after it
    /// parks for `epoch`, and give a verdict.
    pub fn begin_probe(&self, epoch: u64) {
        self.probing_epoch.store(epoch, Ordering::Release);
    }

    /// The rank: its look for `epoch` is over.
    pub fn end_probe(&self, epoch: u64, verdict: ProbeVerdict) {
        let bit = match verdict {
            ProbeVerdict::Clear => 0,
            ProbeVerdict::InFlight => IN_FLIGHT_BIT,
        };
        self.probed.store(epoch | bit, Ordering::Release);
    }

    /// The agent: whether the rank said a verdict for `epoch` follows.
    pub fn probe_pending(&self, epoch: u64) -> bool {
        self.probing_epoch.load(Ordering::Acquire) == epoch
    }

    /// The agent: the rank's verdict for `epoch`, once given.
    pub fn probe_verdict(&self, epoch: u64) -> Option<ProbeVerdict> {
        let word = self.probed.load(Ordering::Acquire);
        match (word & !IN_FLIGHT_BIT == epoch, word & IN_FLIGHT_BIT != 0) {
            (false, _) => None,
            (true, false) => Some(ProbeVerdict::Clear),
            (true, true) => Some(ProbeVerdict::InFlight),
        }
    }
}

const _: () = assert!(std::mem::size_of::<ControlPage>() <= CONTROL_PAGE_LEN);
