//! The files a rank holds that a restart on another node will not find:
//! files and file mappings restored by path from a filesystem of this node
//! (see `cryo_core::locality`), named in the checkpoint's warnings when it
//! is taken. A file whose contents the rank saved (see `rank/src/held.rs`:
//! within its cap, every file of the node it holds or maps) is made again
//! where it is missing, and not named.

use std::collections::BTreeSet;
use std::path::Path;

use cryo_core::format::fds::SavedFiles;
use cryo_core::format::manifest::{FdKind, FdRecord, FdRestore, RegionKind};
use cryo_core::locality::{unreachable_elsewhere, Filesystem};
use cryo_core::protocol::RegionInfo;

use crate::procfs::ProcessAccess;

/// One warning per restored fd (the leader of each shared open file) whose
/// contents are not saved (a directory: that holds nothing saved, nor the
/// working directory `cwd`) and per mapped file of `regions` that lies on a
/// filesystem a restart on another node will not see, given the store's
/// filesystem `store`. A file whose filesystem cannot be read is passed
/// over: the restart names it if it is missing.
pub fn node_local_warnings(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    regions: &[RegionInfo],
    cwd: &str,
    store: Filesystem,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let saved = SavedFiles::of(fds, regions.iter().map(|region| &region.kind));
    let by_path = fds.iter().filter(|fd| {
        fd.restore == FdRestore::Restore
            && fd.shares_with.is_none()
            && match fd.kind {
                FdKind::Regular => !saved.contains(&fd.path),
                // Made again with the files saved under it.
                FdKind::Directory => !saved.make_directory(&fd.path, cwd),
                _ => false,
            }
    });
    for fd in by_path {
        let link = format!("/proc/{pid}/fd/{}", fd.fd);
        if let Some(why) = reach(access, &link, store) {
            warnings.push(format!("fd {} ({}) {why}", fd.fd, fd.path));
        }
    }
    let mapped: BTreeSet<&str> = regions
        .iter()
        .filter_map(|region| match &region.kind {
            RegionKind::FileShared { path, .. }
            | RegionKind::FilePrivate { path, .. }
            | RegionKind::AppMapping { path, .. } => Some(path.as_str()),
            _ => None,
        })
        // A file the rank also holds through an fd whose contents it saved,
        // or that it saved whole, is made again first.
        .filter(|path| !saved.contains(path))
        .collect();
    for path in mapped {
        if let Some(why) = reach(access, path, store) {
            warnings.push(format!("the mapped file {path} {why}"));
        }
    }
    warnings
}

fn reach(access: &dyn ProcessAccess, path: &str, store: Filesystem) -> Option<String> {
    match access.filesystem(Path::new(path)) {
        Ok(file) => unreachable_elsewhere(file, store),
        Err(err) => {
            tracing::debug!(path, error = %err, "fd.filesystem_unknown");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io;

    use cryo_core::dirty::WrittenRanges;
    use cryo_core::locality::{EXT4_MAGIC as EXT4, NFS_MAGIC as NFS, TMPFS_MAGIC as TMPFS};

    use super::*;
    use crate::procfs::{FileStat, MemoryError};

    /// fd 3 on tmpfs, fd 4 a dup of it, fd 5 on the store's NFS, fd 6 on a
    /// local disk, fd 7 unreadable; `/scratch/m` and `/scratch/out` on a local disk.
    struct Fake;

    impl ProcessAccess for Fake {
        fn maps(&self, _: u32) -> io::Result<String> {
            unreachable!()
        }
        fn fds(&self, _: u32) -> io::Result<Vec<(i32, String)>> {
            unreachable!()
        }
        fn cwd(&self, _: u32) -> io::Result<String> {
            unreachable!()
        }
        fn umask(&self, _: u32) -> io::Result<Option<u32>> {
            unreachable!()
        }
        fn path_stat(&self, _: u32, _: &str) -> io::Result<FileStat> {
            unreachable!()
        }
        fn fdinfo(&self, _: u32, _: i32) -> io::Result<String> {
            unreachable!()
        }
        fn fd_stat(&self, _: u32, _: i32) -> io::Result<FileStat> {
            unreachable!()
        }
        fn same_open_file(&self, _: u32, _: i32, _: i32) -> io::Result<bool> {
            unreachable!()
        }
        fn read_memory(&self, _: u32, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
        fn written_pages(&self, _: u32, _: u64, _: u64, _: bool) -> io::Result<WrittenRanges> {
            unreachable!()
        }
        fn filesystem(&self, path: &Path) -> io::Result<Filesystem> {
            let (magic, dev) = match path.to_str().unwrap() {
                "/proc/9/fd/3" | "/proc/9/fd/4" => (TMPFS, 2),
                "/proc/9/fd/5" => (NFS, 1),
                "/proc/9/fd/6" | "/scratch/m" | "/scratch/out" => (EXT4, 3),
                _ => return Err(io::ErrorKind::NotFound.into()),
            };
            Ok(Filesystem { magic, dev })
        }
    }

    fn fd(fd: i32, path: &str, restore: FdRestore, shares_with: Option<i32>) -> FdRecord {
        FdRecord {
            fd,
            kind: FdKind::Regular,
            path: path.into(),
            flags: 1,
            offset: 0,
            size_at_checkpoint: 0,
            restore,
            shares_with,
        }
    }

    fn mapping(name: &str, path: &str) -> RegionInfo {
        RegionInfo {
            name: name.into(),
            addr: 0x1000,
            len: 4096,
            kind: RegionKind::AppMapping {
                path: path.into(),
                offset: 0,
                shared: true,
                prot: 3,
                map_len: 4096,
            },
        }
    }

    #[test]
    fn node_local_files_and_mappings_are_named_once_each() {
        let fds = [
            fd(3, "/tmp/scratch", FdRestore::Restore, None),
            fd(4, "/tmp/scratch", FdRestore::Restore, Some(3)),
            fd(5, "/home/u/log", FdRestore::Restore, None),
            fd(6, "/scratch/out", FdRestore::Restore, None),
            fd(7, "/gone", FdRestore::Restore, None),
            fd(8, "/tmp/p", FdRestore::NotRestored("pipe".into()), None),
        ];
        let regions = [mapping("a", "/scratch/m"), mapping("b", "/scratch/m")];
        let store = Filesystem { magic: NFS, dev: 1 };
        let warnings = node_local_warnings(&Fake, 9, &fds, &regions, "", store);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        // The rank saved fd 6's contents: it is made again, not named, nor
        // is a mapping of it.
        let mut saved = regions.to_vec();
        saved.push(mapping("c", "/scratch/out"));
        saved.push(RegionInfo {
            name: "cryo:file:6".into(),
            addr: 0x9000,
            len: 10,
            kind: RegionKind::FileContents { fd: 6 },
        });
        let fewer = node_local_warnings(&Fake, 9, &fds, &saved, "", store);
        assert_eq!(fewer.len(), 2, "{fewer:?}");
        assert!(
            !fewer.iter().any(|w| w.contains("/scratch/out")),
            "{fewer:?}"
        );
        // A mapped file the rank saved whole is made again, not named.
        saved.push(RegionInfo {
            name: "cryo:mapped-file:0".into(),
            addr: 0xa000,
            len: 4096,
            kind: RegionKind::NodeFileContents {
                path: "/scratch/m".into(),
            },
        });
        let fewer = node_local_warnings(&Fake, 9, &fds, &saved, "", store);
        assert_eq!(fewer.len(), 1, "{fewer:?}");
        assert!(fewer[0].starts_with("fd 3 (/tmp/scratch)"), "{fewer:?}");
        assert!(warnings[0].starts_with("fd 3 (/tmp/scratch) is in this node's memory (tmpfs)"));
        assert!(warnings[1].starts_with("fd 6 (/scratch/out) is on a disk of this node (ext4)"));
        assert!(warnings[2].starts_with("the mapped file /scratch/m is on a disk"));
    }

    #[test]
    fn a_directory_holding_what_is_made_again_is_not_named() {
        let dir = [FdRecord {
            kind: FdKind::Directory,
            ..fd(3, "/tmp/run", FdRestore::Restore, None)
        }];
        let store = Filesystem { magic: NFS, dev: 1 };
        let named = node_local_warnings(&Fake, 9, &dir, &[], "/home/u", store);
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(named[0].starts_with("fd 3 (/tmp/run) is in this node's memory"));
        // The working directory is under it: both are made again.
        assert!(node_local_warnings(&Fake, 9, &dir, &[], "/tmp/run/steps", store).is_empty());
        let saved_whole = [RegionInfo {
            name: "cryo:closed:0".into(),
            addr: 0,
            len: 3,
            kind: RegionKind::NodeFileContents {
                path: "/tmp/run/log".into(),
            },
        }];
        assert!(node_local_warnings(&Fake, 9, &dir, &saved_whole, "/home/u", store).is_empty());
    }

    #[test]
    fn beside_a_store_on_a_disk_of_the_node_only_memory_is_named() {
        let fds = [
            fd(3, "/tmp/scratch", FdRestore::Restore, None),
            fd(6, "/scratch/out", FdRestore::Restore, None),
        ];
        let store = Filesystem {
            magic: EXT4,
            dev: 3,
        };
        let warnings = node_local_warnings(&Fake, 9, &fds, &[], "", store);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("fd 3"));
    }
}
