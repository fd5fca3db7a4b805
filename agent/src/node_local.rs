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

/// One warning per restored fd on a regular file (the leader of each
/// shared open file) whose contents are not saved and per mapped file of
/// `regions` that lies on a filesystem a restart on another node will not
/// see, given the store's filesystem `store`. A file whose filesystem cannot be read is passed
/// over: the restart names it if it is missing.
pub fn node_local_warnings(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    regions: &[RegionInfo],
    store: Filesystem,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let saved = SavedFiles::of(fds, regions.iter().map(|region| &region.kind));
    let by_path = fds.iter().filter(|fd| {
        fd.restore == FdRestore::Restore
            && fd.shares_with.is_none()
            && match fd.kind {
                FdKind::Regular => !saved.contains(&fd.path),
                // A directory of the node is made again, even empty
                // (`ProcessAttrs::node_dirs`).
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
    use crate::procfs::{FileStat, FileType, MemoryError};

    /// fd 3 (a directory, mode 0750) and the working directory on tmpfs,
    /// fd 4 a dup of fd 3, fd 5 on the store's NFS, fd 6 on a
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
            Ok(None)
        }
        fn path_stat(&self, _: u32, _: &str) -> io::Result<FileStat> {
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn fdinfo(&self, _: u32, _: i32) -> io::Result<String> {
            unreachable!()
        }
        fn fd_stat(&self, _: u32, fd: i32) -> io::Result<FileStat> {
            assert_eq!(fd, 3);
            Ok(FileStat {
                file_type: FileType::Directory,
                size: 0,
                nlink: 2,
                dev: 2,
                ino: 7,
                mode: 0o750,
            })
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
                "/proc/9/fd/3" | "/proc/9/fd/4" | "/proc/9/cwd" => (TMPFS, 2),
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
        let warnings = node_local_warnings(&Fake, 9, &fds, &regions, store);
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
        let fewer = node_local_warnings(&Fake, 9, &fds, &saved, store);
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
        let fewer = node_local_warnings(&Fake, 9, &fds, &saved, store);
        assert_eq!(fewer.len(), 1, "{fewer:?}");
        assert!(fewer[0].starts_with("fd 3 (/tmp/scratch)"), "{fewer:?}");
        assert!(warnings[0].starts_with("fd 3 (/tmp/scratch) is in this node's memory (tmpfs)"));
        assert!(warnings[1].starts_with("fd 6 (/scratch/out) is on a disk of this node (ext4)"));
        assert!(warnings[2].starts_with("the mapped file /scratch/m is on a disk"));
    }

    #[test]
    fn a_directory_of_the_node_is_made_again_with_its_mode_not_named() {
        // /tmp/run held open, /tmp/run/steps worked in: both on tmpfs;
        // /home/u on the store's NFS.
        let dir = [FdRecord {
            kind: FdKind::Directory,
            ..fd(3, "/tmp/run", FdRestore::Restore, None)
        }];
        let store = Filesystem { magic: NFS, dev: 1 };
        assert!(node_local_warnings(&Fake, 9, &dir, &[], store).is_empty());
        let attrs = crate::attrs::process_attrs(&Fake, 9, &dir, &[], "/tmp/run/steps", Some(store));
        let dirs: Vec<(&str, Option<u32>)> = (attrs.node_dirs.iter())
            .map(|dir| (dir.path.as_str(), dir.mode))
            .collect();
        assert_eq!(dirs, [("/tmp/run", Some(0o750)), ("/tmp/run/steps", None)]);
        // Beside no store, nothing is known to be the node's own.
        let unknown = crate::attrs::process_attrs(&Fake, 9, &dir, &[], "/tmp/run/steps", None);
        assert!(unknown.node_dirs.is_empty());
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
        let warnings = node_local_warnings(&Fake, 9, &fds, &[], store);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("fd 3"));
    }
}
