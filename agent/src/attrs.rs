//! What a restart gives back of a parked rank's process beside its memory,
//! fds and working directory (`cryo_core::format::process`): the umask it
//! runs with and, for each file whose contents it saved, the permission
//! bits a restart gives the file when it makes it again, and what tells
//! whether two ranks may share a node after a restart (the file is on a
//! filesystem of this node, written, its device and inode on this machine:
//! `cryo_core::format::fds::node_file_clashes`), and the directories of
//! this node it holds open or works in, which a restart makes again.

use std::path::Path;

use cryo_core::format::fds::{SavedBy, SavedFiles, CLOSED_CONTENTS_PREFIX};
use cryo_core::format::manifest::{
    is_clean_absolute_path, FdKind, FdRecord, FdRestore, RegionKind,
};
use cryo_core::format::process::{FileTail, NodeDir, ProcessAttrs, SavedFile};
use cryo_core::locality::{unreachable_elsewhere, Filesystem};
use cryo_core::protocol::RegionInfo;

use crate::procfs::{boot_id, ProcessAccess};

/// The attributes of the rank `pid` whose fds are `fds`, whose regions
/// are `regions` and whose working directory is `cwd`, given the store's
/// filesystem `store`. What cannot be read is left out: a restart then
/// keeps the launcher's umask, or makes a file with a new file's mode.
pub fn process_attrs(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    regions: &[RegionInfo],
    cwd: &str,
    store: Option<Filesystem>,
) -> ProcessAttrs {
    let umask = access.umask(pid).unwrap_or_else(|err| {
        tracing::debug!(pid, error = %err, "rank.umask_unknown");
        None
    });
    let saved = saved_files_of(fds, regions);
    let tails = file_tails(access, pid, fds, |path| {
        saved.iter().any(|(p, _)| *p == path)
    });
    let mut saved_files = Vec::new();
    for (path, saved) in saved {
        let (stat, link) = match saved {
            SavedBy::Fd(fd) => (access.fd_stat(pid, fd), format!("/proc/{pid}/fd/{fd}")),
            SavedBy::Path => (
                access.path_stat(pid, path),
                format!("/proc/{pid}/root{path}"),
            ),
        };
        let stat = stat
            .inspect_err(|err| tracing::debug!(pid, path, error = %err, "file.stat_unknown"))
            .ok();
        let on_node = store.is_some_and(|store| on_node(access, &link, store));
        saved_files.push(SavedFile {
            path: path.to_owned(),
            mode: stat.as_ref().map(|stat| stat.mode & 0o7777),
            on_node,
            written: written(path, fds, regions),
            dev: stat.as_ref().map_or(0, |stat| stat.dev),
            ino: stat.as_ref().map_or(0, |stat| stat.ino),
        });
    }
    ProcessAttrs {
        umask,
        machine: boot_id().to_owned(),
        saved_files,
        node_dirs: store.map_or_else(Vec::new, |store| node_dirs(access, pid, fds, cwd, store)),
        tails,
    }
}

/// The tails of the regular files open at `fds` that a restart opens again
/// by path and whose contents are not saved (`is_saved`): what tells them
/// from another file put at their path since. One that cannot be read is
/// left out (its restart is not checked).
fn file_tails(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    is_saved: impl Fn(&str) -> bool,
) -> Vec<FileTail> {
    use std::os::unix::fs::FileExt;
    let mut tails = Vec::new();
    for fd in fds {
        if fd.kind != FdKind::Regular
            || fd.restore != FdRestore::Restore
            || fd.shares_with.is_some()
            || fd.size_at_checkpoint == 0
            || is_saved(&fd.path)
        {
            continue;
        }
        let (start, len) = FileTail::range(fd.size_at_checkpoint);
        let mut bytes = vec![0u8; len as usize];
        let link = format!("/proc/{pid}/fd/{}", fd.fd);
        match (access.open_read(Path::new(&link)))
            .and_then(|file| file.read_exact_at(&mut bytes, start))
        {
            Ok(()) => tails.push(FileTail::of(fd.fd, &bytes)),
            Err(err) => tracing::debug!(pid, fd = fd.fd, error = %err, "file.tail_unread"),
        }
    }
    tails
}

/// Whether the file `link` names (an fd or a path under `/proc/<pid>`) is
/// on a filesystem of this node that a restart elsewhere will not see.
fn on_node(access: &dyn ProcessAccess, link: &str, store: Filesystem) -> bool {
    (access.filesystem(Path::new(link)))
        .is_ok_and(|file| unreachable_elsewhere(file, store).is_some())
}

/// The directories of this node the rank `pid` holds open among `fds`
/// (each open directory once) or works in (`cwd`), with their modes. A
/// directory whose filesystem cannot be read is left out: the restart
/// names it if it is missing.
fn node_dirs(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    cwd: &str,
    store: Filesystem,
) -> Vec<NodeDir> {
    let held = fds
        .iter()
        .filter(|fd| {
            fd.kind == FdKind::Directory
                && fd.restore == FdRestore::Restore
                && fd.shares_with.is_none()
        })
        .map(|fd| (fd.path.as_str(), Some(fd.fd)));
    let worked = (!cwd.is_empty()).then_some((cwd, None));
    let mut dirs: Vec<NodeDir> = Vec::new();
    for (path, fd) in held.chain(worked) {
        if !is_clean_absolute_path(path) || dirs.iter().any(|dir| dir.path == path) {
            continue;
        }
        let (stat, link) = match fd {
            Some(fd) => (access.fd_stat(pid, fd), format!("/proc/{pid}/fd/{fd}")),
            None => (access.path_stat(pid, path), format!("/proc/{pid}/cwd")),
        };
        if on_node(access, &link, store) {
            dirs.push(NodeDir {
                path: path.to_owned(),
                mode: stat.ok().map(|stat| stat.mode & 0o7777),
            });
        }
    }
    dirs
}

/// The files whose contents `regions` saved, once each, and only those
/// at a path a manifest can hold.
fn saved_files_of<'a>(fds: &'a [FdRecord], regions: &'a [RegionInfo]) -> Vec<(&'a str, SavedBy)> {
    let saved = SavedFiles::of(fds, regions.iter().map(|region| &region.kind));
    saved
        .iter()
        .filter(|(path, _)| is_clean_absolute_path(path))
        .collect()
}

/// Whether the rank wrote the file at `path`: an fd on it open for
/// writing, written and closed (saved as a closed file), or mapped shared
/// and writable. An input it only reads or maps read-only is not.
fn written(path: &str, fds: &[FdRecord], regions: &[RegionInfo]) -> bool {
    let writes = |flags: i32| flags & libc::O_ACCMODE != libc::O_RDONLY;
    fds.iter().any(|fd| fd.path == path && writes(fd.flags))
        || regions.iter().any(|region| match &region.kind {
            RegionKind::NodeFileContents { path: saved } => {
                saved == path && region.name.starts_with(CLOSED_CONTENTS_PREFIX)
            }
            RegionKind::FileShared { path: mapped, .. } => mapped == path,
            RegionKind::AppMapping {
                path: mapped,
                shared,
                prot,
                ..
            } => mapped == path && *shared && prot & 2 != 0,
            _ => false,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use cryo_core::format::manifest::{FdKind, FdRestore};

    use super::*;
    use crate::procfs::parse_umask;

    fn fd(fd: i32, path: &str) -> FdRecord {
        FdRecord {
            fd,
            kind: FdKind::Regular,
            path: path.into(),
            flags: 0,
            offset: 0,
            size_at_checkpoint: 10,
            restore: FdRestore::Restore,
            shares_with: None,
        }
    }

    fn region(kind: RegionKind) -> RegionInfo {
        RegionInfo {
            name: "r".into(),
            addr: 0,
            len: 10,
            kind,
        }
    }

    #[test]
    fn each_saved_file_is_read_once_where_it_can_be() {
        let fds = [fd(5, "/scratch/in.dat"), fd(6, "/scratch/../x")];
        let whole = |path: &str| region(RegionKind::NodeFileContents { path: path.into() });
        let regions = [
            region(RegionKind::Anonymous),
            region(RegionKind::FileContents { fd: 5 }),
            // No record for fd 9; fd 6's path would not validate.
            region(RegionKind::FileContents { fd: 9 }),
            region(RegionKind::FileContents { fd: 6 }),
            whole("/scratch/t.bin"),
            // Saved through fd 5 already.
            whole("/scratch/in.dat"),
        ];
        assert_eq!(
            saved_files_of(&fds, &regions),
            [
                ("/scratch/in.dat", SavedBy::Fd(5)),
                ("/scratch/t.bin", SavedBy::Path)
            ]
        );
    }

    #[test]
    fn a_file_is_written_when_an_fd_writes_it_or_it_was_written_and_closed() {
        let mut log = fd(3, "/scratch/log");
        log.flags = libc::O_WRONLY | libc::O_APPEND;
        let fds = [fd(5, "/scratch/in.dat"), log];
        let named = |name: &str, kind: RegionKind| RegionInfo {
            name: name.into(),
            ..region(kind)
        };
        let whole = |path: &str| RegionKind::NodeFileContents { path: path.into() };
        let map = |path: &str, shared, prot| RegionKind::AppMapping {
            path: path.into(),
            offset: 0,
            shared,
            prot,
            map_len: 4096,
        };
        let regions = [
            named("cryo:closed:0", whole("/scratch/closed.log")),
            named("cryo:mapped-file:0", whole("/scratch/table")),
            named("cryo:map:1000", map("/scratch/table", true, 1)),
            named("cryo:mapped-file:1", whole("/scratch/grid")),
            named("cryo:map:2000", map("/scratch/grid", true, 3)),
            named("cryo:map:3000", map("/scratch/private", false, 3)),
        ];
        let written = |path| written(path, &fds, &regions);
        assert!(written("/scratch/log"));
        assert!(!written("/scratch/in.dat"));
        assert!(written("/scratch/closed.log"));
        assert!(!written("/scratch/table"), "mapped read-only");
        assert!(written("/scratch/grid"), "mapped shared and writable");
        assert!(
            !written("/scratch/private"),
            "a private mapping's writes stay in memory"
        );
    }

    #[test]
    fn the_umask_is_read_from_the_status() {
        assert_eq!(
            parse_umask("Name:\tstencil\nUmask:\t0027\nState:\tS\n"),
            Some(0o027)
        );
        // A kernel before 4.7 has no such line.
        assert_eq!(parse_umask("Name:\tstencil\nState:\tS\n"), None);
    }
}
