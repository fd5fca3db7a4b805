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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;

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
}
