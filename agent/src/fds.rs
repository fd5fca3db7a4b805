//! A rank's fd table at capture: what each fd is, which fds share one open
//! file description (`kcmp(KCMP_FILE)`), and what a restart will do with
//! each.
//!
//! Whose fd is it:
//! * the cryo runtime's own fds (socket, control page, userfaultfd) are
//!   never captured;
//! * fds that were open when `cryo_init` ran and still refer to the same
//!   file, other than regular files and directories, belong to the MPI
//!   library or the launcher (standard streams, the PMI socket, its own
//!   `/dev/null`, unlinked shared-memory segments): the new process's own
//!   start opens them again, so they are left alone, without a warning;
//!   regular files and directories are the application's whenever it opened
//!   them;
//! * everything else is the application's: restored when a restart can
//!   give it back (regular files, unlinked files whose contents the runtime
//!   saved, directories, the memory-like character devices), and named in
//!   a warning when it cannot (pipes, sockets, anonymous inodes, other
//!   devices).

use std::collections::HashMap;
use std::io;

use cryo_core::format::manifest::{
    is_clean_absolute_path, is_working_directory, FdKind, FdRecord, FdRestore, RegionKind,
};
use cryo_core::protocol::RegionInfo;
use thiserror::Error;

use crate::procfs::{parse_fdinfo, FdInfoParseError, FileStat, FileType, ProcessAccess};

/// Character devices that behave the same on every node, so a restart
/// opens them again by path.
pub const PORTABLE_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

const DELETED_SUFFIX: &str = " (deleted)";

/// Who owns which fds of a parked rank, as its runtime reported them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FdOwners<'a> {
    /// The runtime's own fds.
    pub runtime: &'a [i32],
    /// Open since `cryo_init`: the MPI library's and the launcher's.
    pub library: &'a [i32],
    /// Unlinked files whose contents the runtime handed over as regions.
    pub saved_unlinked: &'a [i32],
}

/// The fds of unlinked files whose contents the rank handed over among
/// its `regions`.
pub fn saved_unlinked(regions: &[RegionInfo]) -> Vec<i32> {
    regions
        .iter()
        .filter_map(|region| match region.kind {
            RegionKind::UnlinkedFile { fd } => Some(fd),
            _ => None,
        })
        .collect()
}

/// A rank's fd table, classified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    /// One record per fd, in fd order.
    pub fds: Vec<FdRecord>,
    /// What a restart will not give back beyond the fds not restored.
    pub warnings: Vec<String>,
    /// The working directory, empty if it was deleted or unreadable.
    pub cwd: String,
}

/// A rank's fd table could not be read.
#[derive(Debug, Error)]
pub enum FdTableError {
    /// A procfs read failed.
    #[error("pid {pid}: reading {what}: {source}")]
    Io {
        /// The pid.
        pid: u32,
        /// What was read.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// fdinfo did not parse.
    #[error("pid {pid} fd {fd}: {source}")]
    FdInfo {
        /// The pid.
        pid: u32,
        /// The fd.
        fd: i32,
        /// The error.
        source: FdInfoParseError,
    },
}

/// What an fd is, from its link text and `stat`. An unlinked regular file
/// is told by its link count, not by the `" (deleted)"` in its link text
/// (a live file may carry that in its name).
pub fn fd_kind(link: &str, stat: Option<FileStat>) -> FdKind {
    if link.starts_with("pipe:") {
        FdKind::Pipe
    } else if link.starts_with("socket:") {
        FdKind::Socket
    } else if link.starts_with("anon_inode:") || link.starts_with("/memfd:") {
        FdKind::AnonInode
    } else {
        match stat {
            Some(s) if s.file_type == FileType::Regular && s.nlink == 0 => FdKind::Deleted,
            None if link.ends_with(DELETED_SUFFIX) => FdKind::Deleted,
            Some(s) => match s.file_type {
                FileType::Regular => FdKind::Regular,
                FileType::Directory => FdKind::Directory,
                FileType::CharDevice => FdKind::CharDevice,
                FileType::BlockDevice => FdKind::BlockDevice,
                FileType::Fifo => FdKind::Pipe,
                FileType::Socket => FdKind::Socket,
                FileType::Other => FdKind::Other,
            },
            None => FdKind::Other,
        }
    }
}

/// The path an fd's record keeps: the link text, less `" (deleted)"` for
/// an unlinked file (its old place, where a restart recreates it).
pub fn record_path(kind: FdKind, link: &str) -> String {
    match kind {
        FdKind::Deleted => link.strip_suffix(DELETED_SUFFIX).unwrap_or(link).to_owned(),
        _ => link.to_owned(),
    }
}

/// Decides whether an fd is restored, ignoring the fds it may share its
/// open file with (see [`link_shared`]).
pub fn classify_fd(fd: i32, kind: FdKind, path: &str, owners: &FdOwners<'_>) -> FdRestore {
    let no = |why: &str| FdRestore::NotRestored(why.to_owned());
    if owners.runtime.contains(&fd) {
        return FdRestore::NotOurs("cryo runtime".into());
    }
    // Regular files and directories are the application's whenever it
    // opened them (the MPI library's own files live under /dev/shm, /proc
    // and /sys, which are never restored); what else was open at cryo_init
    // is the library's or the launcher's, the standard streams among them
    // unless the program sent them elsewhere since it started (the rank
    // leaves those out of `library`).
    let path_based = matches!(kind, FdKind::Regular | FdKind::Directory);
    if owners.library.contains(&fd) && ((0..=2).contains(&fd) || !path_based) {
        return FdRestore::NotOurs(if (0..=2).contains(&fd) {
            "standard stream, inherited from the launcher".into()
        } else {
            "open before cryo_init (MPI library or launcher)".into()
        });
    }
    let clean = is_clean_absolute_path(path);
    match kind {
        FdKind::Pipe => no("pipe"),
        FdKind::Socket => no("socket"),
        FdKind::AnonInode => no("anonymous inode (eventfd, epoll, memfd…)"),
        FdKind::Deleted if !owners.saved_unlinked.contains(&fd) => {
            no("file deleted while open, its contents not saved")
        }
        FdKind::Deleted if !clean => no("file deleted while open, at an unclean path"),
        FdKind::Deleted => FdRestore::Restore,
        FdKind::CharDevice if PORTABLE_DEVICES.contains(&path) => FdRestore::Restore,
        FdKind::CharDevice | FdKind::BlockDevice => no("device"),
        FdKind::Directory if clean => FdRestore::Restore,
        FdKind::Directory => no("directory at an unclean path"),
        FdKind::Other => no("unknown file type"),
        FdKind::Regular if path.starts_with("/dev/shm/") => {
            no("shared memory segment (MPI library or another process)")
        }
        FdKind::Regular
            if path.starts_with("/dev/")
                || path.starts_with("/proc/")
                || path.starts_with("/sys/") =>
        {
            no("pseudo-file")
        }
        FdKind::Regular if !clean => no("path is not absolute and clean"),
        FdKind::Regular => FdRestore::Restore,
    }
}

/// Marks each fd that shares its open file description with a lower fd
/// (`same(a, b)`: `kcmp(KCMP_FILE)`), and decides its restore from its
/// group's leader, the lowest fd of the group: a dup is restored with
/// `dup2` from the leader when the leader comes back (restored, or a
/// standard stream the new launcher provides). `identity` is each fd's
/// `(dev, inode)`: only fds of one file can share a description, so `kcmp`
/// runs within those buckets only; an fd without one (the runtime's own) is
/// left alone.
pub fn link_shared(
    fds: &mut [FdRecord],
    identity: &HashMap<i32, (u64, u64)>,
    mut same: impl FnMut(i32, i32) -> io::Result<bool>,
) -> io::Result<()> {
    let mut leaders: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for index in 0..fds.len() {
        let Some(id) = identity.get(&fds[index].fd) else {
            continue;
        };
        let bucket = leaders.entry(*id).or_default();
        let mut leader = None;
        for &candidate in bucket.iter() {
            if same(fds[candidate].fd, fds[index].fd)? {
                leader = Some(candidate);
                break;
            }
        }
        let Some(leader) = leader else {
            bucket.push(index);
            continue;
        };
        let (lead_fd, lead_restore) = (fds[leader].fd, fds[leader].restore.clone());
        let record = &mut fds[index];
        if matches!(record.restore, FdRestore::NotOurs(_)) {
            continue;
        }
        record.shares_with = Some(lead_fd);
        record.restore = match lead_restore {
            FdRestore::Restore | FdRestore::ReopenOf(_) => FdRestore::Restore,
            FdRestore::NotOurs(_) if (0..=2).contains(&lead_fd) => FdRestore::Restore,
            FdRestore::NotOurs(_) | FdRestore::NotRestored(_) => FdRestore::NotRestored(format!(
                "shares its open file with fd {lead_fd}, which is not restored"
            )),
        };
    }
    Ok(())
}

/// Marks each unlinked file's fd whose contents were not saved but whose
/// file another fd's saved contents recreate (the same `(dev, inode)`: a
/// second open through `/proc/self/fd`, a Fortran unit opened again on a
/// scratch file's fd) to be opened again through that fd. Two opens of one
/// file are separate open file descriptions, which `kcmp` does not link.
pub fn link_reopened_unlinked(fds: &mut [FdRecord], identity: &HashMap<i32, (u64, u64)>) {
    let saved: HashMap<(u64, u64), i32> = fds
        .iter()
        .filter(|fd| fd.kind == FdKind::Deleted && fd.restore == FdRestore::Restore)
        .filter_map(|fd| Some((*identity.get(&fd.fd)?, fd.fd)))
        .collect();
    for fd in fds.iter_mut() {
        if fd.kind != FdKind::Deleted || !matches!(fd.restore, FdRestore::NotRestored(_)) {
            continue;
        }
        if let Some(&of) = identity.get(&fd.fd).and_then(|id| saved.get(id)) {
            fd.restore = FdRestore::ReopenOf(of);
        }
    }
}

/// Reads and classifies every fd of `pid`, links the fds that share an
/// open file, and notes the file locks held.
pub fn read_fd_table(
    access: &dyn ProcessAccess,
    pid: u32,
    owners: &FdOwners<'_>,
) -> Result<FdTable, FdTableError> {
    let io_err = |what: String| move |source| FdTableError::Io { pid, what, source };
    let mut table = FdTable::default();
    let mut identity = HashMap::new();
    for (fd, link) in access.fds(pid).map_err(io_err(format!("/proc/{pid}/fd")))? {
        // The runtime's placeholders below its fd floor: not worth a record.
        if owners.runtime.contains(&fd) && link == "/dev/null" {
            continue;
        }
        let info = match access.fdinfo(pid, fd) {
            Ok(text) => {
                parse_fdinfo(&text).map_err(|source| FdTableError::FdInfo { pid, fd, source })?
            }
            // Closed since the listing (impossible while parked, but harmless).
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(io_err(format!("/proc/{pid}/fdinfo/{fd}"))(err)),
        };
        let stat = access.fd_stat(pid, fd).ok();
        let kind = fd_kind(&link, stat);
        let path = record_path(kind, &link);
        let restore = classify_fd(fd, kind, &path, owners);
        // The runtime's own fds are nobody's dups: they are left out of
        // the files fds are matched by.
        if let Some(stat) = stat.filter(|_| !owners.runtime.contains(&fd)) {
            identity.insert(fd, (stat.dev, stat.ino));
        }
        if info.locks > 0 && !matches!(restore, FdRestore::NotOurs(_)) {
            table.warnings.push(format!(
                "fd {fd} ({path}) holds a file lock; a restart does not take it again"
            ));
        }
        table.fds.push(FdRecord {
            fd,
            kind,
            path,
            flags: info.flags,
            offset: info.pos,
            size_at_checkpoint: match kind {
                FdKind::Regular | FdKind::Deleted => stat.map_or(0, |s| s.size),
                _ => 0,
            },
            restore,
            shares_with: None,
        });
    }
    table.cwd = working_directory(access, pid, &mut table.warnings);
    link_reopened_unlinked(&mut table.fds, &identity);
    let unlinked = table.fds.clone();
    if let Err(err) = link_shared(&mut table.fds, &identity, |a, b| {
        access.same_open_file(pid, a, b)
    }) {
        table.warnings.push(format!(
            "could not tell which fds share an open file (kcmp: {err}); each fd is restored on its own"
        ));
        table.fds = unlinked;
    }
    Ok(table)
}

/// The working directory a restart returns the rank to; a warning and
/// nothing when it was deleted, cannot be read, or is not a clean
/// absolute path (a manifest holding one would not load).
fn working_directory(access: &dyn ProcessAccess, pid: u32, warnings: &mut Vec<String>) -> String {
    let why = match access.cwd(pid) {
        Ok(link) if link.ends_with(DELETED_SUFFIX) => format!(
            "the working directory {} was deleted",
            link.trim_end_matches(DELETED_SUFFIX)
        ),
        Ok(link) if is_working_directory(&link) => return link,
        // Outside this agent's root ("(unreachable)/…"), or oddly spelt.
        Ok(link) => format!("the working directory {link:?} cannot be named from the agent"),
        Err(err) => format!("could not read the working directory ({err})"),
    };
    warnings.push(format!(
        "{why}; a restart starts the rank in the job's launch directory"
    ));
    String::new()
}

#[cfg(test)]
mod tests {
    use cryo_core::dirty::WrittenRanges;

    use super::*;
    use crate::procfs::MemoryError;

    fn stat(file_type: FileType, nlink: u64, ino: u64) -> Option<FileStat> {
        Some(FileStat {
            file_type,
            size: 30,
            nlink,
            dev: 1,
            ino,
            mode: 0o644,
        })
    }

    #[test]
    fn classification() {
        let owners = FdOwners {
            runtime: &[1000],
            library: &[0, 1, 2, 5, 12, 13],
            saved_unlinked: &[8],
        };
        let decide = |fd, link: &str, st| {
            let kind = fd_kind(link, st);
            (
                kind,
                classify_fd(fd, kind, &record_path(kind, link), &owners),
            )
        };
        let regular = stat(FileType::Regular, 1, 7);
        assert_eq!(
            decide(3, "/tmp/log", regular),
            (FdKind::Regular, FdRestore::Restore)
        );
        // The launcher's standard stream, a file or a pipe, is its own.
        assert!(
            matches!(decide(1, "/tmp/log", regular).1, FdRestore::NotOurs(w) if w.contains("standard"))
        );
        assert!(
            matches!(decide(1, "pipe:[9]", None).1, FdRestore::NotOurs(w) if w.contains("standard"))
        );
        assert!(matches!(
            decide(5, "socket:[1]", None),
            (FdKind::Socket, FdRestore::NotOurs(_))
        ));
        // A file the application opened before cryo_init is still its own;
        // the MPI library's /dev/null is not.
        assert_eq!(
            decide(12, "/work/early.log", regular),
            (FdKind::Regular, FdRestore::Restore)
        );
        let null = stat(FileType::CharDevice, 1, 3);
        assert!(matches!(
            decide(13, "/dev/null", null).1,
            FdRestore::NotOurs(_)
        ));
        assert!(
            matches!(decide(1000, "socket:[1]", None).1, FdRestore::NotOurs(w) if w == "cryo runtime")
        );
        assert!(matches!(
            decide(4, "pipe:[77]", None),
            (FdKind::Pipe, FdRestore::NotRestored(_))
        ));
        assert!(matches!(
            decide(4, "socket:[77]", None),
            (FdKind::Socket, FdRestore::NotRestored(_))
        ));
        assert!(matches!(
            decide(4, "anon_inode:[eventfd]", None),
            (FdKind::AnonInode, FdRestore::NotRestored(_))
        ));
        // Unlinked: by link count; restored only with saved contents.
        let gone = stat(FileType::Regular, 0, 9);
        assert_eq!(
            decide(8, "/tmp/x (deleted)", gone),
            (FdKind::Deleted, FdRestore::Restore)
        );
        assert!(matches!(
            decide(9, "/tmp/x (deleted)", gone),
            (FdKind::Deleted, FdRestore::NotRestored(_))
        ));
        // A live file whose name ends in " (deleted)" is a live file.
        assert_eq!(
            decide(3, "/tmp/x (deleted)", regular),
            (FdKind::Regular, FdRestore::Restore)
        );
        let dev = stat(FileType::CharDevice, 1, 3);
        assert_eq!(
            decide(4, "/dev/null", dev),
            (FdKind::CharDevice, FdRestore::Restore)
        );
        assert!(matches!(
            decide(4, "/dev/ttyS0", dev),
            (FdKind::CharDevice, FdRestore::NotRestored(_))
        ));
        let dir = stat(FileType::Directory, 2, 4);
        assert_eq!(
            decide(4, "/tmp/d", dir),
            (FdKind::Directory, FdRestore::Restore)
        );
        assert!(
            matches!(decide(4, "/dev/shm/mpich_seg", regular).1, FdRestore::NotRestored(w) if w.contains("shared memory"))
        );
        assert!(matches!(
            decide(4, "/memfd:cryo-control (deleted)", regular).0,
            FdKind::AnonInode
        ));
    }

    /// fds 3, 4 (dup of 3), 6 (dup of 1, the launcher's stdout), 7 (a
    /// second open of 3's file), 9 (dup of the pipe 8).
    struct Fake;

    impl ProcessAccess for Fake {
        fn maps(&self, _: u32) -> io::Result<String> {
            Ok(String::new())
        }
        fn fds(&self, _: u32) -> io::Result<Vec<(i32, String)>> {
            Ok([
                (1, "pipe:[5]"),
                (3, "/tmp/log"),
                (4, "/tmp/log"),
                (6, "pipe:[5]"),
                (7, "/tmp/log"),
                (8, "pipe:[6]"),
                (9, "pipe:[6]"),
                (1000, "socket:[2]"),
            ]
            .into_iter()
            .map(|(fd, link)| (fd, link.to_owned()))
            .collect())
        }
        fn cwd(&self, pid: u32) -> io::Result<String> {
            match pid {
                42 => Ok("/work/run/rank 0".into()),
                43 => Ok("/tmp/job.1 (deleted)".into()),
                45 => Ok("(unreachable)/scratch/run".into()),
                _ => Err(io::ErrorKind::PermissionDenied.into()),
            }
        }
        fn umask(&self, _: u32) -> io::Result<Option<u32>> {
            unreachable!()
        }
        fn path_stat(&self, _: u32, _: &str) -> io::Result<FileStat> {
            unreachable!()
        }
        fn fdinfo(&self, _: u32, fd: i32) -> io::Result<String> {
            let lock = if fd == 7 {
                "lock:\t1: POSIX ADVISORY WRITE 1 01:02:7 0 EOF\n"
            } else {
                ""
            };
            Ok(format!("pos:\t{}\nflags:\t02\n{lock}", fd * 10))
        }
        fn fd_stat(&self, _: u32, fd: i32) -> io::Result<FileStat> {
            let (file_type, ino) = match fd {
                3 | 4 | 7 => (FileType::Regular, 7),
                8 | 9 => (FileType::Fifo, 6),
                _ => (FileType::Fifo, 5),
            };
            Ok(stat(file_type, 1, ino).unwrap_or_else(|| unreachable!()))
        }
        fn same_open_file(&self, _: u32, a: i32, b: i32) -> io::Result<bool> {
            let group = |fd| match fd {
                3 | 4 => 1,
                1 | 6 => 2,
                8 | 9 => 3,
                other => 100 + other,
            };
            Ok(group(a) == group(b))
        }
        fn written_pages(&self, _: u32, _: u64, _: u64, _: bool) -> io::Result<WrittenRanges> {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
        fn filesystem(&self, _: &std::path::Path) -> io::Result<cryo_core::locality::Filesystem> {
            Err(io::ErrorKind::Unsupported.into())
        }
        fn read_memory(&self, pid: u32, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
            Err(MemoryError::Gone { pid })
        }
    }

    /// fd 1000 is the runtime's, fd 1 the launcher's.
    fn owners() -> FdOwners<'static> {
        FdOwners {
            runtime: &[1000],
            library: &[1],
            saved_unlinked: &[],
        }
    }

    #[test]
    fn dups_are_linked_to_their_leader_by_kcmp() {
        let owners = owners();
        let table = read_fd_table(&Fake, 42, &owners).unwrap();
        let get = |fd| table.fds.iter().find(|r| r.fd == fd).unwrap();
        assert_eq!(get(3).shares_with, None);
        assert_eq!(get(3).restore, FdRestore::Restore);
        assert_eq!(get(4).shares_with, Some(3));
        assert_eq!(get(4).restore, FdRestore::Restore);
        // A dup of the launcher's stdout comes back as a dup of the new one.
        assert_eq!(get(6).shares_with, Some(1));
        assert_eq!(get(6).restore, FdRestore::Restore);
        // The same file opened twice is two open files.
        assert_eq!(get(7).shares_with, None);
        assert_eq!(get(9).shares_with, Some(8));
        assert!(matches!(&get(9).restore, FdRestore::NotRestored(w) if w.contains("fd 8")));
        assert_eq!(table.warnings.len(), 1);
        assert!(table.warnings[0].contains("fd 7") && table.warnings[0].contains("lock"));
    }

    #[test]
    fn a_second_open_of_a_saved_unlinked_file_is_opened_again_through_it() {
        let unlinked = |fd, restore| FdRecord {
            fd,
            kind: FdKind::Deleted,
            path: "/scratch/s.0".into(),
            flags: 2,
            offset: 0,
            size_at_checkpoint: 10,
            restore,
            shares_with: None,
        };
        let not_saved = || FdRestore::NotRestored("its contents not saved".into());
        let mut fds = vec![
            unlinked(64, FdRestore::Restore),
            unlinked(65, not_saved()),
            unlinked(66, not_saved()),
            unlinked(70, not_saved()),
        ];
        let identity = HashMap::from([(64, (1, 5)), (65, (1, 5)), (66, (1, 5)), (70, (1, 6))]);
        link_reopened_unlinked(&mut fds, &identity);
        // fd 66 is a dup of fd 65: one open file.
        link_shared(&mut fds, &identity, |a, b| {
            Ok((a.min(b), a.max(b)) == (65, 66))
        })
        .unwrap();
        assert_eq!(fds[1].restore, FdRestore::ReopenOf(64));
        assert_eq!(fds[1].shares_with, None);
        assert_eq!(
            (fds[2].shares_with, &fds[2].restore),
            (Some(65), &FdRestore::Restore)
        );
        assert!(
            matches!(fds[3].restore, FdRestore::NotRestored(_)),
            "another file"
        );
    }

    #[test]
    fn the_working_directory_is_recorded_and_one_that_cannot_be_named() {
        let owners = owners();
        let table = read_fd_table(&Fake, 42, &owners).unwrap();
        assert_eq!(table.cwd, "/work/run/rank 0");
        for (pid, said) in [
            (43, "/tmp/job.1 was deleted"),
            (44, "could not read"),
            (45, "\"(unreachable)/scratch/run\" cannot be named"),
        ] {
            let table = read_fd_table(&Fake, pid, &owners).unwrap();
            assert_eq!(table.cwd, "", "pid {pid}");
            assert!(
                table.warnings.iter().any(|w| w.contains(said)),
                "{:?}",
                table.warnings
            );
        }
    }
}
