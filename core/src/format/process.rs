//! What a restart gives back of a rank's process beside its memory, fds
//! and working directory (format 2.5): the file mode creation mask it ran
//! with, and, for each file whose contents the checkpoint saved, its
//! permission bits (which a restart gives the file when it makes it again)
//! and whether it lay on a filesystem of the rank's node and was written
//! (which says whether two ranks may share a node after a restart: see
//! `fds::node_file_clashes`), and the directories it held open or worked
//! in on a filesystem of its node, which a restart makes again where they
//! are missing; and, for each file held open whose contents it did not
//! save, the last bytes it held as of the checkpoint (format 2.7), by which
//! a restart tells that file from another put at its path since.

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
    /// The tails of the regular files held open and restored by path whose
    /// contents were not saved (an input only read, an `O_APPEND` log),
    /// one per fd that could be read (format 2.7; none before).
    pub tails: Vec<FileTail>,
}

/// The last bytes of a file held open at `fd`, as of the checkpoint: up to
/// [`FILE_TAIL_LEN`] bytes ending at the file's size then. A file in their
/// place whose bytes there differ is not the file the rank held (a log
/// rotated away and a new one begun, an input staged again with other
/// contents): appending to it, or reading it, would go on with another
/// file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTail {
    /// The fd.
    pub fd: i32,
    /// How many bytes, ending at the fd's `size_at_checkpoint`.
    pub len: u32,
    /// XXH3-64 of those bytes.
    pub xxh3: u64,
}

/// The most bytes a [`FileTail`] covers.
pub const FILE_TAIL_LEN: u64 = 4096;

impl FileTail {
    /// Where the tail of a file of `size` bytes starts, and its length.
    pub fn range(size: u64) -> (u64, u32) {
        let len = size.min(FILE_TAIL_LEN);
        // FILE_TAIL_LEN fits in u32.
        (size - len, u32::try_from(len).unwrap_or(0))
    }

    /// The tail of the file at `fd` whose last `bytes` these are.
    pub fn of(fd: i32, bytes: &[u8]) -> FileTail {
        FileTail {
            fd,
            len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            xxh3: xxhash_rust::xxh3::xxh3_64(bytes),
        }
    }

    /// Whether `bytes`, read where this tail was, are its bytes.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        u32::try_from(bytes.len()).is_ok_and(|len| len == self.len)
            && xxhash_rust::xxh3::xxh3_64(bytes) == self.xxh3
    }
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
    /// A file tail longer than [`FILE_TAIL_LEN`], or a second one for an fd.
    #[error("the tail recorded of fd {0} is longer than {FILE_TAIL_LEN} bytes or recorded twice")]
    Tail(i32),
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

    /// The tail recorded of the file held open at `fd`.
    pub fn tail_of(&self, fd: i32) -> Option<&FileTail> {
        self.tails.iter().find(|tail| tail.fd == fd)
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
        let mut fds = std::collections::BTreeSet::new();
        for tail in &self.tails {
            if u64::from(tail.len) > FILE_TAIL_LEN || !fds.insert(tail.fd) {
                return Err(AttrsError::Tail(tail.fd));
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
            tails: Vec::new(),
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

    #[test]
    fn a_tail_matches_only_its_own_bytes() {
        assert_eq!(FileTail::range(100), (0, 100));
        assert_eq!(FileTail::range(10_000), (10_000 - 4096, 4096));
        let tail = FileTail::of(5, b"step 41\nstep 42\n");
        assert!(tail.matches(b"step 41\nstep 42\n"));
        assert!(!tail.matches(b"XXXX 41\nstep 42\n"));
        assert!(!tail.matches(b"step 42\n"));
        let twice = ProcessAttrs {
            tails: vec![tail.clone(), tail],
            ..ProcessAttrs::default()
        };
        assert_eq!(twice.check(), Err(AttrsError::Tail(5)));
    }
}
