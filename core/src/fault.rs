//! A test hook that holds the agent or the coordinator at a precise point of
//! an epoch, so an end-to-end test can kill a process, cut a link or let a
//! deadline pass exactly there.
//!
//! `CRYO_FAULT=pause-at:<phase>:<epoch>:<milliseconds>` is read once, at the
//! first check. `<phase>` is one of
//!
//! * `open` (agent): the epoch is open to parks, before the ranks' queued
//!   messages are taken and their requests raised;
//! * `begin` (agent): the ranks' requests are raised, before the store opens
//!   the epoch;
//! * `quiesce` (agent): a rank has parked, before its memory is copied;
//! * `copy` (agent): the rank's memory is copied, before it is resumed;
//! * `snapshot` (agent): the rank is resumed, before its snapshot (the
//!   copy-on-write capture) is read;
//! * `drain` (agent): chunks are written, before the rank's part is made
//!   durable (a slow or stalled store looks the same from outside);
//! * `commit` (coordinator): every rank is durable, before the manifest is
//!   published.
//!
//! When the process reaches that phase of that epoch it logs `fault.paused`
//! (with the phase and epoch) and sleeps for the given time, then carries on.
//! Unset, a check is one load of an initialised `OnceLock`.

use std::sync::OnceLock;
use std::time::Duration;

pub use crate::env::ENV_FAULT;

/// A point of an epoch where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The epoch is open to parks; queued messages not yet taken (agent).
    Open,
    /// The ranks' requests are raised, the store has not opened the epoch
    /// (agent).
    Begin,
    /// A rank is parked, not yet copied (agent).
    Quiesce,
    /// A rank is copied, not yet resumed (agent).
    Copy,
    /// A rank is resumed, its snapshot not yet read (agent).
    Snapshot,
    /// Chunks are written, the rank's part is not yet durable (agent).
    Drain,
    /// Every rank is durable, the manifest is not yet published
    /// (coordinator).
    Commit,
}

impl Phase {
    fn parse(text: &str) -> Option<Phase> {
        Some(match text {
            "open" => Phase::Open,
            "begin" => Phase::Begin,
            "quiesce" => Phase::Quiesce,
            "copy" => Phase::Copy,
            "snapshot" => Phase::Snapshot,
            "drain" => Phase::Drain,
            "commit" => Phase::Commit,
            _ => return None,
        })
    }

    /// The phase's name as `CRYO_FAULT` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Open => "open",
            Phase::Begin => "begin",
            Phase::Quiesce => "quiesce",
            Phase::Copy => "copy",
            Phase::Snapshot => "snapshot",
            Phase::Drain => "drain",
            Phase::Commit => "commit",
        }
    }
}

/// A parsed `CRYO_FAULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub phase: Phase,
    /// In which epoch.
    pub epoch: u64,
    /// How long to hold.
    pub pause: Duration,
}

impl Fault {
    /// Parses `pause-at:<phase>:<epoch>:<milliseconds>`.
    pub fn parse(text: &str) -> Result<Fault, String> {
        let bad = || {
            format!(
                "{ENV_FAULT}={text:?}: expected pause-at:<open|begin|quiesce|copy|snapshot|drain|commit>:<epoch>:<milliseconds>"
            )
        };
        let mut parts = text.split(':');
        if parts.next() != Some("pause-at") {
            return Err(bad());
        }
        let phase = parts.next().and_then(Phase::parse).ok_or_else(bad)?;
        let epoch = parts.next().and_then(|e| e.parse().ok()).ok_or_else(bad)?;
        let ms: u64 = parts.next().and_then(|e| e.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Fault {
            phase,
            epoch,
            pause: Duration::from_millis(ms),
        })
    }
}

fn configured() -> Option<Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let text = std::env::var(ENV_FAULT).ok()?;
        match Fault::parse(&text) {
            Ok(fault) => {
                tracing::warn!(fault = %text, "fault.armed");
                Some(fault)
            }
            Err(err) => {
                // A test hook that silently does nothing would make a fault
                // test pass for the wrong reason: say so loudly.
                tracing::error!(error = %err, "fault.ignored");
                None
            }
        }
    })
}

/// Holds the calling thread if `CRYO_FAULT` names this phase and epoch.
pub fn pause_at(phase: Phase, epoch: u64, job: &str) {
    if let Some(fault) = configured() {
        if fault.phase == phase && fault.epoch == epoch {
            tracing::warn!(
                job,
                epoch,
                phase = phase.name(),
                pause_ms = u64::try_from(fault.pause.as_millis()).unwrap_or(u64::MAX),
                "fault.paused"
            );
            std::thread::sleep(fault.pause);
            tracing::warn!(job, epoch, phase = phase.name(), "fault.released");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            Fault::parse("pause-at:drain:2:1500").unwrap(),
            Fault {
                phase: Phase::Drain,
                epoch: 2,
                pause: Duration::from_millis(1500)
            }
        );
        for bad in [
            "",
            "pause-at",
            "pause-at:flush:2:10",
            "pause-at:drain:x:10",
            "pause-at:drain:2",
            "pause-at:drain:2:10:9",
            "stall:drain:2:10",
        ] {
            let err = Fault::parse(bad).unwrap_err();
            assert!(err.contains("expected pause-at"), "{bad}: {err}");
        }
    }
}
