//! What an agreement asks of a rank after each call, and what it decides:
//! park, refuse the epoch (and why), or compute on.

use std::fmt;
use std::time::Duration;

use super::agreement::MAX_ATTEMPTS;
use super::collectives::InFlight;

/// What the agreement asks of the rank after a call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Compute on: nothing under way, or an agreement under way that needs
    /// nothing more at this safe point.
    Continue,
    /// Stay inside this safe point and [`Quiesce::poll`] again: the rank is
    /// at the target (or leaving) and a step has not completed.
    Wait,
    /// The agreement has ended for this rank.
    Decided(Decision),
}

/// What an agreement decided for this rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Park at this safe point for the epoch: every rank does.
    Park(u64),
    /// Refuse the epoch (it aborts), saying why.
    Refuse(u64, Refusal),
    /// Compute on: a rank is leaving, or another rank refuses the epoch.
    ComputeOn,
}

/// Why a rank refuses an epoch. Rendered to text only where it is sent to
/// the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `rank` saw a message in flight at the target.
    InFlight { rank: i32, message: InFlight },
    /// A rank passed the target in every attempt; `missed` ranks were not
    /// at it in the last, whose furthest-behind rank was `behind` safe
    /// points short of it when the ranks joined.
    Missed {
        missed: u64,
        behind: u64,
        slowest_ns: u64,
    },
    /// `rank` left the target after `waited` for the check, and every other
    /// rank was there: they park, and this refusal releases them.
    LeftTarget { rank: i32, waited: Duration },
}

/// How long the furthest-behind rank must have needed to reach the target
/// for a refusal to name it: ranks of a coupled loop join within an
/// iteration or two of each other.
const FAR_BEHIND: Duration = Duration::from_millis(500);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::InFlight { rank, message } => write!(
                f,
                "rank {rank}: a message from rank {} (tag {}) was still in flight at the safe \
                 point; complete all communication before calling the safe point",
                message.source, message.tag
            ),
            Refusal::Missed {
                missed,
                behind,
                slowest_ns,
            } => {
                write!(
                    f,
                    "the ranks did not all stop at the agreed safe point in {MAX_ATTEMPTS} \
                     attempts ({missed} missed the last"
                )?;
                let needed = Duration::from_nanos(behind.saturating_mul(*slowest_ns));
                if needed > FAR_BEHIND {
                    write!(
                        f,
                        "; a rank was {behind} safe points, about {:.1} s, short of it when the \
                         ranks agreed: every rank must call the safe point the same number of \
                         times, and ranks that compute apart must meet within seconds",
                        needed.as_secs_f64()
                    )?;
                }
                write!(f, ")")
            }
            Refusal::LeftTarget { rank, waited } => write!(
                f,
                "rank {rank} left the agreed safe point after waiting {} ms for the others to \
                 check it",
                waited.as_millis()
            ),
        }
    }
}
