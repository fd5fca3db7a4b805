//! What the agreement needs from MPI: the [`Collectives`] trait that the
//! MPI binding (`mpi.rs`) and the simulated ranks (`sim.rs`) implement, and
//! the plain values that cross it.

use std::fmt;
use std::time::Instant;

/// The reductions the agreement uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reduce {
    Max,
    Sum,
}

/// An MPI call that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CallError {
    /// The MPI function, e.g. `MPI_Test`.
    pub(crate) call: &'static str,
    /// Its error code.
    pub(crate) code: i32,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed with MPI error {}", self.call, self.code)
    }
}

/// A message a rank at the target found waiting on the application's
/// communicator: sent before the safe point and not received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InFlight {
    /// Its sender's rank.
    pub(crate) source: i32,
    /// Its tag.
    pub(crate) tag: i32,
}

/// What the agreement needs from MPI, and nothing more: one non-blocking
/// allreduce at a time on a private communicator, a probe of the
/// application's communicator, the ring and its bell, and a clock.
///
/// Every rank calls `start` the same number of times, in the same order,
/// with the same `reduce` and `N`: the agreement's decisions are all taken
/// from results that are the same on every rank.
pub(crate) trait Collectives {
    /// A started allreduce of `N` words, completed by [`Collectives::test`].
    type Pending<const N: usize>;

    /// Starts a non-blocking allreduce of `words` over every rank.
    fn start<const N: usize>(
        &mut self,
        reduce: Reduce,
        words: [u64; N],
    ) -> Result<Self::Pending<N>, CallError>;

    /// Tests it once (driving its progress): its result once complete.
    fn test<const N: usize>(
        &mut self,
        pending: &mut Self::Pending<N>,
    ) -> Result<Option<[u64; N]>, CallError>;

    /// Looks for a message waiting on the application's communicator, for
    /// a short window (see `PROBE_WINDOW`).
    fn probe(&mut self) -> Result<Option<InFlight>, CallError>;

    /// Rings every other rank.
    fn ring(&mut self) -> Result<(), CallError>;

    /// Looks once for a ring: whether one came since the bell was last
    /// listened to. A ring once taken is not reported again until
    /// [`Collectives::collect_rings`].
    fn bell_rang(&mut self) -> Result<bool, CallError>;

    /// Receives the `rings` sent to this rank in the agreement that just
    /// ended (counting one the bell took), then listens again.
    fn collect_rings(&mut self, rings: u64) -> Result<(), CallError>;

    /// The time, read only where a period is measured (never at a safe
    /// point with nothing to do).
    fn now(&self) -> Instant;

    /// This rank has reached the agreed target of `epoch`, and is about to
    /// say so. What the application buffers (stdio, Fortran units, its
    /// hooks) is written out here, before the arrival that lets any rank
    /// decide to park: every rank's output is then in the files before any
    /// rank's files are recorded. Several ranks appending to one log, or
    /// writing their parts of one file, through buffers flushed only at
    /// the park would otherwise each record the file as it was before the
    /// other ranks' flushes, and a restart would cut their lines away.
    fn at_target(&mut self, _epoch: u64) {}
}
