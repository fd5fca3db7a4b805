//! What a rank changed of its process after `cryo_init`, beside its memory,
//! files and working directory (format 2.8): environment variables it set
//! or unset, resource limits it changed, signals it blocked or unblocked in
//! the thread that took the safe point, and the signal dispositions it set.
//! Saved as the region `cryo:process-state` of kind
//! [`RegionKind::ProcessState`](crate::format::manifest::RegionKind), only
//! when something changed; a restart applies it once its own `cryo_init`
//! is done, so that what the application did after `cryo_init` on its
//! first run, and does not do again on a restart, is back.
//!
//! Only what changed since `cryo_init` is recorded: the rest of the
//! environment (the launcher's, the MPI library's) belongs to the new run.
//! A handler is recorded by the file that holds its code and its offset
//! there, since that file is mapped elsewhere in a restarted process.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::codec::{self, CodecError};

/// The region that holds a rank's changes.
pub const PROCESS_STATE_REGION: &str = "cryo:process-state";
/// The largest encoded record a restart reads.
pub const MAX_STATE_BYTES: u64 = 4 << 20;
/// The highest signal number recorded (Linux's `_NSIG - 1`).
pub const MAX_SIGNAL: i32 = 64;
/// The number of resource limits recorded (`RLIM_NLIMITS`).
pub const RESOURCE_LIMITS: u32 = 16;

/// A rank's changes (see the module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Variables set, changed or unset since `cryo_init`.
    pub env: Vec<EnvChange>,
    /// Resource limits changed since `cryo_init`.
    pub limits: Vec<LimitChange>,
    /// Signals blocked since `cryo_init` in the thread of the safe point
    /// (bit `n - 1` for signal `n`).
    pub blocked: u64,
    /// Signals unblocked since `cryo_init` in that thread.
    pub unblocked: u64,
    /// Signal dispositions set since `cryo_init`.
    pub actions: Vec<SignalAction>,
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvChange {
    /// Its name.
    pub name: Vec<u8>,
    /// Its value; `None` when it was unset.
    pub value: Option<Vec<u8>>,
}

/// One resource limit (`RLIMIT_*`), as `getrlimit` gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChange {
    /// The resource.
    pub resource: u32,
    /// The soft limit (`u64::MAX` for unlimited).
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// One signal's disposition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalAction {
    /// The signal.
    pub signal: i32,
    /// What it does.
    pub handler: Handler,
    /// `sa_flags`, without the C library's `SA_RESTORER`.
    pub flags: u64,
    /// `sa_mask` (bit `n - 1` for signal `n`).
    pub mask: u64,
}

/// What a signal does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handler {
    /// `SIG_DFL`.
    Default,
    /// `SIG_IGN`.
    Ignore,
    /// A function, at `offset` bytes into the mapped file `file`.
    At {
        /// The absolute path of the file that holds its code.
        file: String,
        /// Its offset in that file.
        offset: u64,
    },
}

/// A record that no rank could have written.
#[derive(Debug, Error)]
pub enum ProcessStateError {
    /// It does not decode.
    #[error("it does not decode: {0}")]
    Codec(#[from] CodecError),
    /// It is longer than any rank writes.
    #[error("it is {0} bytes, over the {MAX_STATE_BYTES}-byte limit")]
    TooLong(u64),
    /// A variable name that `setenv` would refuse, or a value with a NUL.
    #[error("the environment variable {0:?} has an impossible name or value")]
    Env(String),
    /// A resource no `RLIMIT_*` names.
    #[error("resource limit {0} is not one Linux has")]
    Limit(u32),
    /// A signal number out of range.
    #[error("signal {0} is not one Linux has")]
    Signal(i32),
    /// A handler whose file is not an absolute path.
    #[error("the handler of signal {0} is in {1:?}, not an absolute path")]
    HandlerFile(i32, String),
}

impl ProcessState {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.limits.is_empty()
            && self.blocked == 0
            && self.unblocked == 0
            && self.actions.is_empty()
    }

    /// The record's bytes as saved in its region.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// A record read back from its region, checked.
    pub fn decode(bytes: &[u8]) -> Result<ProcessState, ProcessStateError> {
        let state: ProcessState = codec::decode(bytes)?;
        state.check()?;
        Ok(state)
    }

    fn check(&self) -> Result<(), ProcessStateError> {
        for change in &self.env {
            let name_ok = !change.name.is_empty()
                && !change.name.contains(&b'=')
                && !change.name.contains(&0);
            let value_ok = change.value.as_ref().is_none_or(|v| !v.contains(&0));
            if !name_ok || !value_ok {
                return Err(ProcessStateError::Env(
                    String::from_utf8_lossy(&change.name).into_owned(),
                ));
            }
        }
        if let Some(limit) = self.limits.iter().find(|l| l.resource >= RESOURCE_LIMITS) {
            return Err(ProcessStateError::Limit(limit.resource));
        }
        for action in &self.actions {
            if !(1..=MAX_SIGNAL).contains(&action.signal) {
                return Err(ProcessStateError::Signal(action.signal));
            }
            if let Handler::At { file, .. } = &action.handler {
                if !crate::format::paths::is_clean_absolute_path(file) {
                    return Err(ProcessStateError::HandlerFile(action.signal, file.clone()));
                }
            }
        }
        Ok(())
    }
}

/// The bit of signal `signal` in a mask of this module.
pub fn signal_bit(signal: i32) -> u64 {
    match u32::try_from(signal - 1) {
        Ok(shift) if shift < 64 => 1 << shift,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProcessState {
        ProcessState {
            env: vec![
                EnvChange {
                    name: b"APP_SCALE".to_vec(),
                    value: Some(b"7".to_vec()),
                },
                EnvChange {
                    name: b"APP_DEBUG".to_vec(),
                    value: None,
                },
            ],
            limits: vec![LimitChange {
                resource: 7,
                soft: 900,
                hard: u64::MAX,
            }],
            blocked: signal_bit(12),
            unblocked: 0,
            actions: vec![SignalAction {
                signal: 10,
                handler: Handler::At {
                    file: "/scratch/app".into(),
                    offset: 0x1234,
                },
                flags: 0,
                mask: signal_bit(2),
            }],
        }
    }

    #[test]
    fn a_record_comes_back_as_it_was_saved() {
        let state = sample();
        assert!(!state.is_empty());
        assert!(ProcessState::default().is_empty());
        let bytes = state.encode().unwrap();
        assert_eq!(ProcessState::decode(&bytes).unwrap(), state);
        assert_eq!(signal_bit(1), 1);
        assert_eq!(signal_bit(64), 1 << 63);
        assert_eq!((signal_bit(0), signal_bit(65)), (0, 0));
    }

    #[test]
    fn what_no_rank_could_have_written_is_refused() {
        let mut bad_name = sample();
        bad_name.env[0].name = b"A=B".to_vec();
        let bytes = bad_name.encode().unwrap();
        assert!(matches!(
            ProcessState::decode(&bytes),
            Err(ProcessStateError::Env(_))
        ));
        let mut bad_limit = sample();
        bad_limit.limits[0].resource = 99;
        let bytes = bad_limit.encode().unwrap();
        assert!(matches!(
            ProcessState::decode(&bytes),
            Err(ProcessStateError::Limit(99))
        ));
        let mut bad_signal = sample();
        bad_signal.actions[0].signal = 0;
        let bytes = bad_signal.encode().unwrap();
        assert!(matches!(
            ProcessState::decode(&bytes),
            Err(ProcessStateError::Signal(0))
        ));
        let mut relative = sample();
        relative.actions[0].handler = Handler::At {
            file: "app".into(),
            offset: 0,
        };
        let bytes = relative.encode().unwrap();
        assert!(matches!(
            ProcessState::decode(&bytes),
            Err(ProcessStateError::HandlerFile(10, _))
        ));
        assert!(matches!(
            ProcessState::decode(b"\xff\xff"),
            Err(ProcessStateError::Codec(_))
        ));
    }
}
