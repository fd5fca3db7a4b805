//! What the agent tells a rank while it runs, between checkpoints: where
//! its first parked copy will go (`FillView` with epoch 0, protocol
//! version 11), so that its view of the budget is filled before that copy
//! and not in its pause (see [`crate::self_copy::fill_later`]); and that
//! no checkpoint will answer a `SIGTERM` (`Held` with epoch 0, protocol
//! version 17: see [`crate::termination`]).
//!
//! A parked rank reads its socket itself, holding the runtime's lock for
//! the whole park; this thread reads it only under that lock, so the two
//! never share a message. Outside a park the agent sends nothing else: an
//! answer always follows a `Parked`.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cryo_core::protocol::{recv_message_with_fd, AgentToRank};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::runtime::lock;

/// How long the thread waits on the socket before it looks whether the
/// runtime still has it (an agent lost at a park; `finalize` shuts the
/// socket down, which ends the wait at once).
const LOOK_AGAIN: Duration = Duration::from_millis(500);

/// Starts the thread that reads what the agent sends on `sock` while the
/// rank runs. Without a thread to be had, the rank only goes without the
/// early fill.
pub(crate) fn listen(sock: &UnixStream) {
    let fd = sock.as_raw_fd();
    let _ = std::thread::Builder::new()
        .name("cryo-offers".into())
        .spawn(move || {
            crate::quiet_thread::block_signals();
            // SAFETY: `setpriority` with `who` 0 changes only the calling
            // thread's nice value on Linux; a refusal leaves it at the
            // application's priority, which only makes it less polite.
            let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            while wait_and_read(fd) {}
        });
}

/// Waits for the socket `fd` to be readable (or [`LOOK_AGAIN`]), then
/// reads what waits under the runtime's lock. False once the runtime no
/// longer has that socket, or the agent is gone.
fn wait_and_read(fd: RawFd) -> bool {
    let ready = wait_readable(fd);
    let guard = lock();
    let Some(sock) = socket_of(&guard, fd) else {
        return false;
    };
    !ready || read_offers(sock)
}

/// The runtime's socket, if it is still `fd`.
fn socket_of(guard: &Option<crate::runtime::Runtime>, fd: RawFd) -> Option<&UnixStream> {
    guard
        .as_ref()
        .and_then(|runtime| runtime.conn.as_ref())
        .map(|conn| &conn.sock)
        .filter(|sock| sock.as_raw_fd() == fd)
}

/// Whether `fd` turned readable (or hung up) within [`LOOK_AGAIN`].
fn wait_readable(fd: RawFd) -> bool {
    // SAFETY: the number was the runtime's socket when the thread started
    // or last looked; if the runtime closed it since, poll reports it
    // invalid or, reused, some other file's readiness, and nothing is read
    // from it: the caller looks again under the lock, where the runtime no
    // longer holds that socket, and stops.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(LOOK_AGAIN).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

/// Reads every message waiting on `sock` without blocking. False if the
/// agent is gone (the next park finds out and says so).
fn read_offers(sock: &UnixStream) -> bool {
    // A failed look is not the agent gone: the next wake looks again.
    while let Ok(true) = crate::park::readable(sock) {
        match recv_message_with_fd::<AgentToRank>(sock) {
            Ok((AgentToRank::FillView { epoch: 0, ranges }, fd)) => {
                tracing::debug!(ranges = ranges.len(), "rank.fill_view_early");
                crate::self_copy::fill_later(fd, ranges);
            }
            // The coordinator is out of reach: a SIGTERM ends the rank.
            Ok((AgentToRank::Held { epoch: 0 }, _)) => crate::termination::unanswered(),
            Ok((other, _)) => {
                tracing::warn!(message = ?other, "rank.unexpected_while_running");
            }
            Err(error) => {
                tracing::debug!(error = %error, "rank.offers_stopped");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cryo_core::protocol::send_message_with_fd;
    use std::os::fd::AsFd;

    /// Without a runtime the thread stops at once.
    #[test]
    fn without_a_runtime_the_listener_stops() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!wait_and_read(a.as_raw_fd()));
    }

    /// An early `FillView` is read and handed to the fill; a closed peer
    /// stops the reading.
    #[test]
    fn reads_fill_views_and_stops_when_the_agent_is_gone() {
        let _turn = crate::self_copy::TEST_TURN
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (rank, agent) = UnixStream::pair().unwrap();
        let memfd = nix::sys::memfd::memfd_create(
            c"offers-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        nix::unistd::ftruncate(&memfd, 1 << 20).unwrap();
        let view = AgentToRank::FillView {
            epoch: 0,
            ranges: vec![(0, 64 << 10)],
        };
        send_message_with_fd(&agent, &view, memfd.as_fd()).unwrap();
        assert!(read_offers(&rank));
        assert!(crate::self_copy::wait_filled(1 << 20, 0));
        drop(agent);
        assert!(!read_offers(&rank));
    }
}
