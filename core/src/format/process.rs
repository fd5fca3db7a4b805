//! What a restart gives back of a rank's process beside its memory, fds
//! and working directory (format 2.5): the file mode creation mask it ran
//! with, and, for each file whose contents the checkpoint saved, its
//! permission bits (which a restart gives the file when it makes it again)
//! and whether it lay on a filesystem of the rank's node and was written
//! (which says whether two ranks may share a node after a restart: see
//! `fds::node_file_clashes`), and the directories it held open or worked
//! in on a filesystem of its node, which a restart makes again where they
//! are missing.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A rank's process attributes (see the module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAttrs {
    /// The `umask` it ran with; `None` when unknown (written before 2.5, or
    /// not readable at the checkpoint): a restart keeps the launcher's.
    pub umask: Option<u32>,
    /// The boot id of the machine it ran on
    /// (`/proc/sys/kernel/random/boot_id`; empty when unknown): saved files
    /// of one machine, device and inode are one file, whichever nodes
    /// their ranks were named (nodes emulated on one machine).
    pub machine: String,
    /// The files whose contents were saved, one entry per path.
    pub saved_files: Vec<SavedFile>,
    /// The directories on a filesystem of the rank's node that it held
    /// open or worked in, one entry per path: a restart on a node that
    /// lacks one makes it again, with its mode, even when it holds nothing
    /// saved.
    pub node_dirs: Vec<NodeDir>,
}

/// A directory of the rank's node (see [`ProcessAttrs::node_dirs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDir {
    /// Its absolute path.
    pub path: String,
    /// `st_mode & 0o7777`; `None` when it could not be read.
    pub mode: Option<u32>,
}

/// One file whose contents a checkpoint saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFile {
    /// Its absolute path.
    pub path: String,
    /// `st_mode & 0o7777`; `None` when it could not be read.
    pub mode: Option<u32>,
    /// On a filesystem of the rank's node (`cryo_core::locality`): ranks of
    /// other nodes that hold this path hold other files.
    pub on_node: bool,
    /// Written by the rank (open for writing, written and closed, mapped
    /// shared and writable), not only read.
    pub written: bool,
    /// Its device and inode at the checkpoint (zero when unknown).
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
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
        self.saved_file(path).and_then(|file| file.mode)
    }

    /// What was recorded of the saved file at `path`.
    pub fn saved_file(&self, path: &str) -> Option<&SavedFile> {
        self.saved_files.iter().find(|file| file.path == path)
    }

    /// The directory of the rank's node at `path`, if it held or worked in
    /// one there.
    pub fn node_dir(&self, path: &str) -> Option<&NodeDir> {
        self.node_dirs.iter().find(|dir| dir.path == path)
    }

    /// Every path this records, files and directories (a manifest's
    /// validation checks them).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        (self.saved_files.iter().map(|file| file.path.as_str()))
            .chain(self.node_dirs.iter().map(|dir| dir.path.as_str()))
    }

    /// Checks the bits (a manifest's validation checks the paths).
    pub fn check(&self) -> Result<(), AttrsError> {
        if let Some(mask) = self.umask.filter(|mask| mask & !0o777 != 0) {
            return Err(AttrsError::Umask(mask));
        }
        let files = self.saved_files.iter().map(|file| (&file.path, file.mode));
        let dirs = self.node_dirs.iter().map(|dir| (&dir.path, dir.mode));
        let mut seen = std::collections::BTreeSet::new();
        for (path, mode) in files.chain(dirs) {
            if let Some(mode) = mode.filter(|mode| mode & !0o7777 != 0) {
                return Err(AttrsError::Mode {
                    path: path.clone(),
                    mode,
                });
            }
            if !seen.insert(path) {
                return Err(AttrsError::DuplicateMode(path.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &str, mode: u32) -> SavedFile {
        SavedFile {
            path: path.into(),
            mode: Some(mode),
            on_node: true,
            written: false,
            dev: 0,
            ino: 0,
        }
    }

    #[test]
    fn bits_beyond_the_permissions_are_refused() {
        let attrs = ProcessAttrs {
            umask: Some(0o027),
            machine: String::new(),
            saved_files: vec![
                mode("/scratch/in.dat", 0o640),
                mode("/scratch/run.sh", 0o4755),
            ],
            node_dirs: vec![NodeDir {
                path: "/scratch/run".into(),
                mode: Some(0o750),
            }],
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
        bad_mode.saved_files.push(mode("/scratch/dir", 0o40755));
        assert!(matches!(
            bad_mode.check(),
            Err(AttrsError::Mode { mode: 0o40755, .. })
        ));
        assert_eq!(attrs.node_dir("/scratch/run").unwrap().mode, Some(0o750));
        assert_eq!(attrs.paths().count(), 3);
        let mut bad_dir = attrs.clone();
        bad_dir.node_dirs[0].mode = Some(0o40750);
        assert!(matches!(
            bad_dir.check(),
            Err(AttrsError::Mode { mode: 0o40750, .. })
        ));
        let mut twice = attrs.clone();
        twice.saved_files.push(mode("/scratch/in.dat", 0o600));
        assert_eq!(
            twice.check(),
            Err(AttrsError::DuplicateMode("/scratch/in.dat".into()))
        );
        let mut file_and_dir = attrs;
        file_and_dir.node_dirs[0].path = "/scratch/run.sh".into();
        assert_eq!(
            file_and_dir.check(),
            Err(AttrsError::DuplicateMode("/scratch/run.sh".into()))
        );
    }
}
