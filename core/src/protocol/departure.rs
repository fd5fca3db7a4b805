//! How a rank left its job, as its agent saw it
//! ([`super::AgentToCoordinator::RankLeft`]).
use std::fmt;

use serde::{Deserialize, Serialize};

/// How a rank left its job. The coordinator decides from it whether the
/// job is finishing (every rank finalized) or failing, and which departure
/// to name as the failure's cause; its `Display` text is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Departure {
    /// It said goodbye (`cryo_finalize`), or its process exited with
    /// status 0: a program that ended as it should.
    Finalized,
    /// Its process called `exit` with a non-zero status before
    /// `cryo_finalize` (C `exit`, Fortran `STOP n`, Python `sys.exit`).
    Exited {
        /// The status it exited with.
        status: i32,
    },
    /// Its connection closed without a word: the process ended without
    /// running exit handlers (killed, crashed, or `MPI_Abort`, which MPICH
    /// and Open MPI leave with `_exit`).
    Vanished,
    /// Its restart failed.
    RestoreFailed {
        /// The epoch it restarted from.
        epoch: u64,
        /// What could not be restored.
        error: String,
    },
    /// Its agent refused it as it registered for a restart (a rank the
    /// restart's node placement does not allow there).
    RefusedAtRestart {
        /// Why.
        reason: String,
    },
    /// It sent something its agent could not read.
    ProtocolError {
        /// The frame error.
        detail: String,
    },
    /// An agent older than protocol 14 said how, in text.
    Told {
        /// The agent's words.
        account: String,
    },
}

/// Version 13's text for [`Departure::Finalized`], the one value of that
/// field an older peer did not write for people.
const LEGACY_FINALIZED: &str = "finalized";

impl Departure {
    /// A process that called `exit(status)` before it finalized.
    pub fn exited(status: i32) -> Departure {
        if status == 0 {
            Departure::Finalized
        } else {
            Departure::Exited { status }
        }
    }

    /// Whether the rank ended as it should.
    pub fn is_finalized(&self) -> bool {
        matches!(self, Departure::Finalized)
    }

    /// Whether it says how the rank left, where [`Departure::Vanished`]
    /// cannot: the likelier cause of a job's failure when the two come
    /// close together (a launcher kills every rank once one exits).
    pub fn says_how(&self) -> bool {
        !matches!(self, Departure::Vanished)
    }

    /// This departure as a peer older than protocol 14 reads it.
    pub(super) fn to_legacy_text(&self) -> String {
        match self {
            Departure::Finalized => LEGACY_FINALIZED.to_owned(),
            other => other.to_string(),
        }
    }

    /// A departure an older peer wrote as text.
    pub(super) fn from_legacy_text(why: String) -> Departure {
        if why == LEGACY_FINALIZED {
            Departure::Finalized
        } else if why == Departure::Vanished.to_string() {
            Departure::Vanished
        } else {
            Departure::Told { account: why }
        }
    }
}

impl fmt::Display for Departure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Departure::Finalized => write!(f, "it finalized"),
            Departure::Exited { status } => write!(
                f,
                "it exited with status {status} before cryo_finalize (exit, Fortran STOP or sys.exit)"
            ),
            Departure::Vanished => {
                write!(f, "its process ended without a word (killed, crashed, or MPI_Abort)")
            }
            Departure::RestoreFailed { epoch, error } => {
                write!(f, "its restart from epoch {epoch} failed: {error}")
            }
            Departure::RefusedAtRestart { reason } => write!(f, "refused at the restart: {reason}"),
            Departure::ProtocolError { detail } => write!(f, "protocol error: {detail}"),
            Departure::Told { account } => f.write_str(account),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_of_zero_is_a_program_that_ended_as_it_should() {
        assert!(Departure::exited(0).is_finalized());
        assert_eq!(Departure::exited(7), Departure::Exited { status: 7 });
        assert!(Departure::exited(7).says_how());
        assert!(!Departure::Vanished.says_how());
    }

    #[test]
    fn the_legacy_text_reads_back_as_the_same_departure() {
        for departure in [Departure::Finalized, Departure::Vanished] {
            assert_eq!(
                Departure::from_legacy_text(departure.to_legacy_text()),
                departure
            );
        }
        let exited = Departure::Exited { status: 3 };
        assert_eq!(
            Departure::from_legacy_text(exited.to_legacy_text()),
            Departure::Told {
                account: exited.to_string()
            }
        );
    }
}
