//! Process file descriptors (`pidfd_open(2)`, Linux 5.3): a handle on a
//! process that cannot come to name another one once the pid is reused.
//! The rank watches its agent through one; the agent kills a rank's
//! snapshot through one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// Opens a pidfd on process `pid`.
pub fn open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: a fresh fd from the kernel, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `SIGKILL` to the process behind `pidfd`.
pub fn kill(pidfd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: signals the process behind a pidfd we own; no pointers but a
    // null siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_child_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        let fd = open(pid).expect("pidfd");
        kill(&fd).expect("kill");
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: the pidfd names no process any more.
        assert_eq!(kill(&fd), Err(Errno::ESRCH));
    }

    #[test]
    fn no_such_process_is_an_error() {
        assert!(open(-1).is_err());
    }
}
