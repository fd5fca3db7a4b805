//! The names of the regions that carry what a rank held beyond its own
//! regions: unlinked files, files written in place, its own file mappings.
//! (The links between fd records are checked with the rest of a rank
//! record, in `manifest.rs`.)

use std::collections::BTreeSet;

use super::manifest::{FdRecord, RegionKind};

/// The name of the region that holds the contents of the unlinked file
/// open at `fd`.
pub fn unlinked_region_name(fd: i32) -> String {
    format!("cryo:fd:{fd}")
}

/// The name of the region that holds the contents of the file open for
/// writing in place at `fd`.
pub fn contents_region_name(fd: i32) -> String {
    format!("cryo:file:{fd}")
}

/// The name of the region that holds an application file mapping that
/// starts at `start`.
pub fn mapping_region_name(start: u64) -> String {
    format!("cryo:map:{start:x}")
}

/// The name of the region that holds the contents of the `n`th file
/// written and closed on a filesystem of the rank's node.
pub fn closed_contents_region_name(n: usize) -> String {
    format!("cryo:closed:{n}")
}

/// The name of the region that holds the contents of the `n`th file on a
/// filesystem of the rank's node that it maps and no fd of it saves.
pub fn mapped_file_region_name(n: usize) -> String {
    format!("cryo:mapped-file:{n}")
}

/// Region names starting with this are the runtime's own.
pub const RESERVED_REGION_PREFIX: &str = "cryo:";

/// The files whose contents a checkpoint saved, by path: a restart makes
/// each again where it is missing, with its directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedFiles<'a> {
    /// Files held open by an fd whose contents a
    /// [`RegionKind::FileContents`] region saved.
    pub by_fd: BTreeSet<&'a str>,
    /// Files saved whole by path ([`RegionKind::NodeFileContents`]):
    /// written and closed, or mapped with no fd saving them.
    pub whole: BTreeSet<&'a str>,
}

impl<'a> SavedFiles<'a> {
    /// The files saved by the regions of `kinds`, among a rank's `fds`.
    pub fn of(fds: &'a [FdRecord], kinds: impl IntoIterator<Item = &'a RegionKind>) -> Self {
        let mut saved = SavedFiles::default();
        for kind in kinds {
            match kind {
                RegionKind::FileContents { fd } => {
                    if let Some(record) = fds.iter().find(|f| f.fd == *fd) {
                        saved.by_fd.insert(record.path.as_str());
                    }
                }
                RegionKind::NodeFileContents { path } => {
                    saved.whole.insert(path.as_str());
                }
                _ => {}
            }
        }
        saved
    }

    /// Whether the file at `path` was saved, either way.
    pub fn contains(&self, path: &str) -> bool {
        self.by_fd.contains(path) || self.whole.contains(path)
    }

    /// Whether a restart that does not find the directory `dir` makes it
    /// again anyway: it is, or holds, the working directory `cwd`, or it
    /// holds a saved file. Those are made again with their directories, so
    /// a directory fd on it comes back too.
    pub fn make_directory(&self, dir: &str, cwd: &str) -> bool {
        let under = |path: &str| {
            path == dir
                || path
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/') || dir.ends_with('/'))
        };
        under(cwd) || self.by_fd.iter().chain(&self.whole).any(|path| under(path))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::manifest::{FdKind, FdRestore};
    use super::*;

    #[test]
    fn a_directory_is_made_again_with_what_it_holds() {
        let fds = [FdRecord {
            fd: 5,
            kind: FdKind::Regular,
            path: "/scratch/run/out.log".into(),
            flags: 1,
            offset: 0,
            size_at_checkpoint: 0,
            restore: FdRestore::Restore,
            shares_with: None,
        }];
        let kinds = [
            RegionKind::FileContents { fd: 5 },
            RegionKind::NodeFileContents {
                path: "/tmp/tables/t.bin".into(),
            },
            RegionKind::FileContents { fd: 9 },
        ];
        let saved = SavedFiles::of(&fds, &kinds);
        assert!(saved.contains("/scratch/run/out.log") && saved.contains("/tmp/tables/t.bin"));
        assert!(!saved.contains("/scratch/run"));
        let made = |dir: &str, cwd: &str| saved.make_directory(dir, cwd);
        assert!(made("/scratch/run", ""));
        assert!(made("/scratch", ""));
        assert!(made("/tmp/tables", ""));
        assert!(made("/work/steps", "/work/steps"));
        assert!(made("/work", "/work/steps"));
        assert!(made("/", ""));
        // A name that only starts the same is another directory.
        assert!(!made("/scratch/ru", "/work/steps"));
        assert!(!made("/work/step", "/work/steps"));
        assert!(!made("/elsewhere", ""));
    }
}
