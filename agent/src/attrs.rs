//! What a restart gives back of a parked rank's process beside its memory,
//! fds and working directory (`cryo_core::format::process`): the umask it
//! runs with, and the permission bits of each file whose contents it
//! saved, which a restart gives the file when it makes it again.

use cryo_core::format::manifest::{is_clean_absolute_path, FdRecord, RegionKind};
use cryo_core::format::process::{FileMode, ProcessAttrs};
use cryo_core::protocol::RegionInfo;

use crate::procfs::ProcessAccess;

/// The attributes of the rank `pid` whose fds are `fds` and whose regions
/// are `regions`. What cannot be read is left out: a restart then keeps
/// the launcher's umask, or makes a file with a new file's mode.
pub fn process_attrs(
    access: &dyn ProcessAccess,
    pid: u32,
    fds: &[FdRecord],
    regions: &[RegionInfo],
) -> ProcessAttrs {
    let umask = access.umask(pid).unwrap_or_else(|err| {
        tracing::debug!(pid, error = %err, "rank.umask_unknown");
        None
    });
    let mut file_modes = Vec::new();
    for (path, saved) in saved_files(fds, regions) {
        let mode = match saved {
            Saved::ThroughFd(fd) => access.fd_stat(pid, fd).map(|stat| stat.mode),
            Saved::Whole => access.path_mode(pid, path),
        };
        match mode {
            Ok(mode) => file_modes.push(FileMode {
                path: path.to_owned(),
                mode: mode & 0o7777,
            }),
            Err(err) => tracing::debug!(pid, path, error = %err, "file.mode_unknown"),
        }
    }
    ProcessAttrs { umask, file_modes }
}

/// How a file's contents were saved, which says where to read its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saved {
    /// Through the fd open on it.
    ThroughFd(i32),
    /// Whole, by path.
    Whole,
}

/// The files whose contents `regions` saved, once each (a file is saved
/// once; a dup is the same file), and only those at a path a manifest can
/// hold.
fn saved_files<'a>(fds: &'a [FdRecord], regions: &'a [RegionInfo]) -> Vec<(&'a str, Saved)> {
    let mut out: Vec<(&str, Saved)> = Vec::new();
    for region in regions {
        let (path, saved) = match &region.kind {
            RegionKind::FileContents { fd } => match fds.iter().find(|record| record.fd == *fd) {
                Some(record) => (record.path.as_str(), Saved::ThroughFd(*fd)),
                None => continue,
            },
            RegionKind::NodeFileContents { path } => (path.as_str(), Saved::Whole),
            _ => continue,
        };
        if is_clean_absolute_path(path) && !out.iter().any(|(seen, _)| *seen == path) {
            out.push((path, saved));
        }
    }
    out
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
            saved_files(&fds, &regions),
            [
                ("/scratch/in.dat", Saved::ThroughFd(5)),
                ("/scratch/t.bin", Saved::Whole)
            ]
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
