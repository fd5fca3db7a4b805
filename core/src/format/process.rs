//! What a restart gives back of a rank's process beside its memory, fds
//! and working directory (format 2.5): the file mode creation mask it ran
//! with, and the permission bits of the files whose contents the
//! checkpoint saved, which a restart gives a file it makes again.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A rank's process attributes (see the module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAttrs {
    /// The `umask` it ran with; `None` when unknown (written before 2.5, or
    /// not readable at the checkpoint): a restart keeps the launcher's.
    pub umask: Option<u32>,
    /// The permission bits of saved files, by path.
    pub file_modes: Vec<FileMode>,
}

/// The permission bits of one file whose contents a checkpoint saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMode {
    /// Its absolute path.
    pub path: String,
    /// `st_mode & 0o7777`.
    pub mode: u32,
}

/// A process attribute out of range.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AttrsError {
    /// A umask with bits beyond the permission bits.
    #[error("umask {0:#o} has bits beyond 0o777")]
    Umask(u32),
    /// A mode with bits beyond the permission, set-id and sticky bits.
    #[error("the mode {mode:#o} of {path} has bits beyond 0o7777")]
    Mode {
        /// The file.
        path: String,
        /// Its recorded mode.
        mode: u32,
    },
    /// One file given two modes.
    #[error("{0} is given a mode twice")]
    DuplicateMode(String),
}

impl ProcessAttrs {
    /// The recorded permission bits of the saved file at `path`.
    pub fn mode_of(&self, path: &str) -> Option<u32> {
        self.file_modes
            .iter()
            .find(|file| file.path == path)
            .map(|file| file.mode)
    }

    /// Checks the bits (a manifest's validation checks the paths).
    pub fn check(&self) -> Result<(), AttrsError> {
        if let Some(mask) = self.umask.filter(|mask| mask & !0o777 != 0) {
            return Err(AttrsError::Umask(mask));
        }
        for (n, file) in self.file_modes.iter().enumerate() {
            if file.mode & !0o7777 != 0 {
                return Err(AttrsError::Mode {
                    path: file.path.clone(),
                    mode: file.mode,
                });
            }
            if self.file_modes[..n].iter().any(|f| f.path == file.path) {
                return Err(AttrsError::DuplicateMode(file.path.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &str, mode: u32) -> FileMode {
        FileMode {
            path: path.into(),
            mode,
        }
    }

    #[test]
    fn bits_beyond_the_permissions_are_refused() {
        let attrs = ProcessAttrs {
            umask: Some(0o027),
            file_modes: vec![
                mode("/scratch/in.dat", 0o640),
                mode("/scratch/run.sh", 0o4755),
            ],
        };
        assert_eq!(attrs.check(), Ok(()));
        assert_eq!(attrs.mode_of("/scratch/run.sh"), Some(0o4755));
        assert_eq!(attrs.mode_of("/scratch/other"), None);
        let bad_mask = ProcessAttrs {
            umask: Some(0o1022),
            ..attrs.clone()
        };
        assert_eq!(bad_mask.check(), Err(AttrsError::Umask(0o1022)));
        let mut bad_mode = attrs.clone();
        bad_mode.file_modes.push(mode("/scratch/dir", 0o40755));
        assert!(matches!(
            bad_mode.check(),
            Err(AttrsError::Mode { mode: 0o40755, .. })
        ));
        let mut twice = attrs;
        twice.file_modes.push(mode("/scratch/in.dat", 0o600));
        assert_eq!(
            twice.check(),
            Err(AttrsError::DuplicateMode("/scratch/in.dat".into()))
        );
    }
}
