//! Why an agent's connection ended, typed: an agent that closed its end
//! exited or was killed, and does not dial in again by itself; one whose
//! link went silent or broke may be behind a network partition, and dials
//! in again once the network heals (a stop waits for it: `preemption`).

use std::fmt;

/// How an agent's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkLoss {
    /// The agent closed its end: it exited, or was killed.
    Closed,
    /// Reading from it failed: the link timeout, a reset, or garbage.
    Broken(String),
    /// Writing to it failed, or did not finish in time.
    Unwritable(String),
}

impl LinkLoss {
    /// Whether the agent may still be alive, and so dial in again.
    pub(crate) fn may_rejoin(&self) -> bool {
        !matches!(self, Self::Closed)
    }
}

impl fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed"),
            Self::Broken(why) => write!(f, "protocol error: {why}"),
            Self::Unwritable(why) => write!(f, "writing to it: {why}"),
        }
    }
}
