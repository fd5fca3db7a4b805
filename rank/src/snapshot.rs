//! A frozen copy of the parked rank for its agent to read after the rank
//! runs again: the copy-on-write capture.
//!
//! At the agent's request a parked rank clones itself without `CLONE_VM`,
//! as `fork` does. The child's private memory is the parent's at that
//! instant and stays so while the parent computes on: the kernel copies a
//! page only when one side writes it. Cloning costs a copy of the page
//! tables (a few ms per GiB), against a copy of the memory itself, so the
//! rank's pause no longer grows with its state.
//!
//! The child does nothing but wait, and must do nothing else: it is a copy
//! of a threaded process, so it makes raw system calls only (no allocation,
//! no locks, no signal handlers). It blocks every signal but `SIGKILL`
//! (a launcher's `SIGTERM` to the process group is the parent's to handle),
//! closes every fd but a pidfd of its agent (it must not keep the job's
//! sockets or pipes open), and exits when its agent kills it or dies. Its
//! exit signal is 0, so the application's `SIGCHLD` handling and `wait(-1)`
//! never see it; the runtime reaps it (`__WALL`) at later parks and at
//! finalize.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use cryo_core::protocol::SnapshotOutcome;
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Snapshots this process cloned and has not reaped yet.
static UNREAPED: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Takes a snapshot of this process for the agent at the other end of
/// `agent`. Never fails the checkpoint: a refusal says why, and the agent
/// then copies while the rank stays parked.
pub(crate) fn take(agent: &UnixStream) -> SnapshotOutcome {
    reap_finished();
    let agent_pid = match getsockopt(agent, PeerCredentials) {
        Ok(creds) => creds.pid(),
        Err(err) => return failed("reading the agent's pid (SO_PEERCRED)", err),
    };
    let watch = match cryo_core::pidfd::open(agent_pid) {
        Ok(fd) => fd,
        Err(err) => return failed("pidfd_open of the agent", err),
    };
    match clone_waiting(&watch, agent_pid) {
        Ok(pid) => {
            unreaped().push(pid);
            match u32::try_from(pid) {
                Ok(pid) => SnapshotOutcome::Taken { pid },
                Err(_) => failed("clone", Errno::EINVAL),
            }
        }
        Err(err) => failed("clone", err),
    }
}

fn failed(what: &str, err: Errno) -> SnapshotOutcome {
    SnapshotOutcome::Failed {
        reason: format!("{what}: {err}"),
    }
}

fn unreaped() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    UNREAPED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reaps the snapshots that have exited (their agent killed them).
pub(crate) fn reap_finished() {
    unreaped().retain(|&pid| {
        // SAFETY: waitpid on a child this process cloned; WNOHANG never
        // blocks, __WALL is needed for a child whose exit signal is not
        // SIGCHLD.
        let got = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
        // 0: still running. -1 (ECHILD): someone else reaped it.
        got == 0
    });
}

/// Waits until every snapshot of this process has exited: the agent kills
/// each once it has read it, or it exits when its agent dies. Called at
/// finalize, before the rank says goodbye, so that a rank leaving right
/// after a checkpoint does not end its job step (and with it, under Slurm,
/// every process of the step) while its agent still reads the snapshot.
pub(crate) fn wait_all() {
    let pids = std::mem::take(&mut *unreaped());
    for pid in pids {
        loop {
            // SAFETY: waitpid on a child this process cloned; __WALL since
            // its exit signal is not SIGCHLD.
            let got = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL) };
            if got != -1 || Errno::last() != Errno::EINTR {
                break;
            }
        }
    }
}

/// Clones this process (fork semantics, exit signal 0) with every signal
/// blocked in the child from its first instruction. Returns the child's
/// pid once the child has named `agent_pid` as its tracer
/// (`crate::ptracer`), so that the agent may read it as soon as it hears
/// of it.
fn clone_waiting(watch: &OwnedFd, agent_pid: libc::pid_t) -> Result<libc::pid_t, Errno> {
    let watch = watch.as_raw_fd();
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ready = ready_write.as_raw_fd();
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: valid sigset pointers; only this thread's mask changes, and
    // it is restored below on every path.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut before) };
    if blocked != 0 {
        return Err(Errno::from_raw(blocked));
    }
    // SAFETY: a raw clone without CLONE_VM and with exit signal 0 (the low
    // byte of the flags) is a fork whose parent gets no SIGCHLD. The child
    // runs on its own copy of this stack and calls `wait_then_exit`, which
    // makes raw system calls only and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, 0 as libc::c_ulong, 0, 0, 0, 0) };
    if pid == 0 {
        wait_then_exit(watch, agent_pid, ready);
    }
    let err = Errno::last();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(err);
    }
    // The child's byte, or end of file should it have died first: either
    // way it has nothing more to do before the agent reads it.
    drop(ready_write);
    let mut byte = [0u8; 1];
    while let Err(Errno::EINTR) = nix::unistd::read(ready_read.as_raw_fd(), &mut byte) {}
    libc::pid_t::try_from(pid).map_err(|_| Errno::EINVAL)
}

/// The snapshot's whole life: name the agent as its tracer and say so on
/// `ready`, close every fd but `watch`, wait until the agent behind `watch`
/// exits (or kills this process), exit.
fn wait_then_exit(watch: libc::c_int, agent_pid: libc::pid_t, ready: libc::c_int) -> ! {
    let watch_u = libc::c_uint::try_from(watch).unwrap_or(0);
    // Best effort: without Yama there is nothing to name.
    let _ = crate::ptracer::allow_raw(agent_pid);
    // SAFETY: raw system calls on this process's own fds, in a child of a
    // threaded process, where only such calls are safe. Nothing is
    // allocated and no lock is taken.
    unsafe {
        libc::write(ready, [1u8].as_ptr().cast(), 1);
        if watch_u > 0 {
            libc::syscall(libc::SYS_close_range, 0, watch_u - 1, 0);
        }
        libc::syscall(libc::SYS_close_range, watch_u + 1, libc::c_uint::MAX, 0);
        let mut poll = libc::pollfd {
            fd: watch,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let ready = libc::syscall(
                libc::SYS_ppoll,
                &mut poll as *mut libc::pollfd,
                1 as libc::c_ulong,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<libc::sigset_t>(),
                0 as libc::size_t,
            );
            // Ready (the agent exited) or an error other than EINTR: done.
            if ready != -1 || *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
        libc::syscall(libc::SYS_exit_group, 0);
    }
    // exit_group does not return.
    #[allow(clippy::empty_loop)]
    loop {}
}
