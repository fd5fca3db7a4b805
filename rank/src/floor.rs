//! Keeps the application's fds clear of the MPI library's.
//!
//! A restart puts every application fd back at its number. The numbers the
//! MPI library and the launcher take before `cryo_init` can differ between
//! the checkpointed run and the restarted one (another node layout, another
//! rank per node, another launcher), and a library fd at a number the
//! application used would make the restart fail. So `cryo_init` fills the
//! free numbers below a floor
//! (`CRYO_FD_FLOOR`, default 64) with placeholders on `/dev/null`: the
//! application's own files then get numbers at or above the floor in every
//! run, and the library's stay below it as long as it opens fewer than that
//! many fds before `cryo_init`. It does so with or without an agent, so the
//! application's fds are numbered alike in every run. On a restart the
//! placeholders are made after the application's fds are back. They are the
//! runtime's own fds: never captured, never restored, close-on-exec.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use cryo_core::format::manifest::{FdRestore, RankRecord};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::dup3;

/// Default floor for the application's fds.
pub const DEFAULT_FD_FLOOR: RawFd = 64;

/// Fills every free fd number below `floor` with a placeholder on
/// `/dev/null`, and returns them.
pub(crate) fn fill_below(floor: RawFd) -> Result<Vec<OwnedFd>, Errno> {
    let mut held = Vec::new();
    if floor <= 0 {
        return Ok(held);
    }
    let raw = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open just returned this fd and nothing else owns it.
    let null = unsafe { OwnedFd::from_raw_fd(raw) };
    loop {
        // The lowest free number: a gap below the floor, or the first
        // number at or above it, which means there are no gaps left.
        let next = match fcntl(null.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(0)) {
            Ok(next) => next,
            // A low fd limit: keep what there is rather than fail the job.
            Err(Errno::EMFILE | Errno::ENFILE) => break,
            Err(errno) => return Err(errno),
        };
        // SAFETY: fcntl just returned this fd and nothing else owns it.
        let next = unsafe { OwnedFd::from_raw_fd(next) };
        if next.as_raw_fd() >= floor {
            break;
        }
        held.push(next);
    }
    if null.as_raw_fd() < floor {
        held.push(null);
    }
    Ok(held)
}

/// On a restart, takes the number of every fd the application held that
/// could not come back (a pipe, a socket: [`FdRestore::NotRestored`],
/// named when the checkpoint was taken) with a placeholder on which reads
/// and writes fail with `EBADF` as on a closed fd (an `O_PATH` open of
/// `/dev/null`), so that no file the program opens afterwards lands on
/// that number and receives what the program still sends to its old fd.
/// The placeholders are the application's: it may close them. Returns
/// their numbers.
pub(crate) fn hold_lost(record: &RankRecord) -> Vec<RawFd> {
    let mut held = Vec::new();
    let lost = record
        .fds
        .iter()
        .filter(|fd| matches!(fd.restore, FdRestore::NotRestored(_)) && fd.fd >= 0);
    for fd in lost {
        // Taken already (by the new MPI library, say): not ours to hold.
        if fcntl(fd.fd, FcntlArg::F_GETFD).is_ok() {
            continue;
        }
        let placeholder = open("/dev/null", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .and_then(|raw| {
                // SAFETY: open just returned this fd and nothing else owns it.
                let temp = unsafe { OwnedFd::from_raw_fd(raw) };
                if raw == fd.fd {
                    return Ok(temp.into_raw_fd());
                }
                dup3(temp.as_raw_fd(), fd.fd, OFlag::O_CLOEXEC)
            });
        match placeholder {
            Ok(number) => held.push(number),
            // Past the fd limit, say: the number stays free, as before.
            Err(errno) => {
                tracing::warn!(fd = fd.fd, path = %fd.path, %errno, "fd.lost_not_held");
            }
        }
    }
    held
}

/// Raises this process's soft limit on open files, within its hard limit,
/// so that every fd of `record` to give back fits under it: the
/// checkpointed run may have raised its own (`ulimit -n`, `setrlimit`)
/// before opening them, and a restarted one starts with the launcher's
/// until the application raises it again, after `cryo_init`. An fd at or
/// above the hard limit is left to its restore, which fails naming it.
/// Returns the soft limit now (`u64::MAX` when it cannot be read).
pub(crate) fn make_room(record: &RankRecord) -> u64 {
    let highest = (record.fds.iter())
        .filter(|fd| !matches!(fd.restore, FdRestore::NotOurs(_)))
        .map(|fd| u64::try_from(fd.fd).unwrap_or(0))
        .max();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        // Unknown: each restore says whether its number fits.
        return u64::MAX;
    }
    let Some(needed) = highest.map(|fd| fd + 1) else {
        return limit.rlim_cur;
    };
    if needed <= limit.rlim_cur {
        return limit.rlim_cur;
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given; a soft limit within
    // the hard one is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return limit.rlim_cur;
    }
    tracing::info!(
        rank = record.rank,
        from = limit.rlim_cur,
        to = raised.rlim_cur,
        "restart.fd_limit_raised"
    );
    raised.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_open_lands_at_the_floor() {
        let floor = 200;
        let held = fill_below(floor).unwrap();
        let probe = open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        // SAFETY: open just returned this fd.
        let probe = unsafe { OwnedFd::from_raw_fd(probe) };
        assert!(probe.as_raw_fd() >= floor, "{}", probe.as_raw_fd());
        assert!(held.iter().all(|fd| fd.as_raw_fd() < floor));
        drop(held);
        assert!(fill_below(0).unwrap().is_empty());
    }

    fn lost(fd: RawFd, restore: FdRestore) -> cryo_core::format::manifest::FdRecord {
        cryo_core::format::manifest::FdRecord {
            fd,
            kind: cryo_core::format::manifest::FdKind::Pipe,
            path: "pipe:[1]".into(),
            flags: libc::O_WRONLY,
            offset: 0,
            size_at_checkpoint: 0,
            restore,
            shares_with: None,
        }
    }

    #[test]
    fn a_lost_fd_keeps_its_number_and_fails_like_a_closed_one() {
        let (free, mpi) = (931, 932);
        // SAFETY: closing numbers this test owns (nothing else in the test
        // binary opens fds this high).
        unsafe { libc::close(free) };
        let taken = fcntl(0, FcntlArg::F_DUPFD_CLOEXEC(mpi)).unwrap();
        assert_eq!(taken, mpi);
        let record = RankRecord {
            fds: vec![
                lost(free, FdRestore::NotRestored("pipe".into())),
                lost(mpi, FdRestore::NotRestored("socket".into())),
                lost(933, FdRestore::NotOurs("MPI library".into())),
            ],
            ..RankRecord::new(0, "n", 1)
        };
        assert_eq!(
            hold_lost(&record),
            vec![free],
            "only a free number, only a lost fd"
        );
        let byte = [0u8; 1];
        // SAFETY: a one-byte buffer on the stack.
        let wrote = unsafe { libc::write(free, byte.as_ptr().cast(), 1) };
        assert_eq!((wrote, Errno::last()), (-1, Errno::EBADF));
        assert!(
            fcntl(933, FcntlArg::F_GETFD).is_err(),
            "not the MPI library's"
        );
        // SAFETY: the placeholder and the dup this test made.
        unsafe {
            libc::close(free);
            libc::close(mpi);
        }
    }

    #[test]
    fn the_fd_limit_is_raised_for_the_fds_to_give_back_within_the_hard_one() {
        use cryo_core::format::manifest::{FdKind, FdRecord};
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(got, 0);
        // A soft limit below the hard one, as a launcher may give, and well
        // above what this process's other tests open.
        let lowered = libc::rlimit {
            rlim_cur: (limit.rlim_max / 2)
                .clamp(4096, 1 << 20)
                .min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) };
        assert_eq!(set, 0);
        let original = limit;
        let limit = lowered;
        let with_fd = |number: u64, restore: FdRestore| {
            let mut record = RankRecord::new(0, "n", 1);
            record.fds.push(FdRecord {
                fd: i32::try_from(number).unwrap_or(i32::MAX),
                kind: FdKind::Regular,
                path: "/work/log".into(),
                flags: 1,
                offset: 0,
                size_at_checkpoint: 0,
                restore,
                shares_with: None,
            });
            record
        };
        // Within the limit, or not ours to give back: unchanged.
        assert_eq!(make_room(&with_fd(3, FdRestore::Restore)), limit.rlim_cur);
        let far = limit.rlim_cur.saturating_add(10);
        assert_eq!(
            make_room(&with_fd(far, FdRestore::NotOurs("mpi".into()))),
            limit.rlim_cur
        );
        // Above it: raised to fit, never past the hard limit.
        let raised = make_room(&with_fd(far, FdRestore::Restore));
        assert_eq!(raised, (far + 1).min(limit.rlim_max));
        // SAFETY: setrlimit reads the struct it is given; the soft limit
        // goes back to what it was.
        let back = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &original) };
        assert_eq!(back, 0);
    }
}
