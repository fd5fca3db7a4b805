//! Why an agent's connection ended, typed: an agent that closed its end
//! exited or was killed, and does not dial in again by itself; one whose
//! link went silent or broke may be behind a network partition, and dials
//! in again once the network heals (a stop waits for it: `preemption`), and
//! so may one that fell silent (stopped or hung, then let go on).

use std::fmt;
use std::time::Duration;

/// How an agent's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkLoss {
    /// The agent closed its end: it exited, or was killed.
    Closed,
    /// Reading from it failed: the link timeout, a reset, or garbage.
    Broken(String),
    /// It sent nothing, not even its heartbeat, for this long: it is
    /// stopped, hung, or behind a partition that TCP has not noticed yet.
    Silent(Duration),
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
            Self::Silent(for_how_long) => write!(
                f,
                "silent for {:.1} s, not even its heartbeat: stopped, hung, or cut off",
                for_how_long.as_secs_f64()
            ),
            Self::Unwritable(why) => write!(f, "writing to it: {why}"),
        }
    }
}
