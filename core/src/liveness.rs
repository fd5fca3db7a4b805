//! Noticing a dead peer on the TCP link between the coordinator and an
//! agent.
//!
//! A peer that crashed closes its connection and is seen at once. A peer
//! behind a network partition, or on a node that lost power, says nothing:
//! without help TCP retransmits for about 15 minutes before it gives up, and
//! an idle link never notices at all. So both ends of the link set
//! `TCP_USER_TIMEOUT` (data left unacknowledged that long closes the
//! connection) and keepalive probes (an idle link probes its peer, and
//! closes after the same time without an answer). A partition shorter than
//! the timeout costs nothing: TCP delivers what was held up once it heals,
//! as its retransmissions are at most a sixth of the timeout apart
//! (`TCP_RTO_MAX_MS`; where the kernel lacks it, unacknowledged data may
//! wait twice the timeout instead).
//! A longer one is reported as a lost agent (coordinator) or a lost
//! coordinator (agent) within the timeout, and the epoch it interrupts is
//! aborted.
//!
//! A peer that is stopped or hung, or swapped out, says nothing either,
//! but its kernel still acknowledges what it is sent: TCP sees a healthy
//! link. So an agent also says it is alive every [`heartbeat_interval`],
//! and its coordinator counts it lost once it has heard nothing for
//! [`silence_limit`], a bound a partition TCP would survive stays under.

use std::net::TcpStream;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};

use crate::env::ENV_LINK_TIMEOUT;

/// The default time after which a silent peer counts as dead.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest timeout accepted: below it, a busy peer's scheduling delay
/// would already count as death.
pub const MIN_LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an agent says it is alive: a quarter of its link timeout,
/// and at least once a second, so that a coordinator given a shorter
/// timeout than the agent's never takes it for silent.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(1))
}

/// How long a peer whose link [`watch_link`] watches with `timeout`, and
/// which sends heartbeats, may say nothing before it counts as lost: the
/// time TCP holds unacknowledged data (`unacknowledged`, as `watch_link`
/// returns it), half the timeout for the retransmission that follows a
/// heal, and a second for a heartbeat that was on its way.
pub fn silence_limit(unacknowledged: Duration, timeout: Duration) -> Duration {
    unacknowledged + timeout.max(MIN_LINK_TIMEOUT) / 2 + Duration::from_secs(1)
}

/// Connects to the first address `addr` resolves to that answers within
/// `timeout`: a host that is down or cut off is named in seconds, not
/// after TCP's two minutes of retries.
pub fn connect_within(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolves to no address",
    );
    for sockaddr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sockaddr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// The link timeout: `CRYO_LINK_TIMEOUT` seconds when set and valid (at
/// least [`MIN_LINK_TIMEOUT`]), else [`DEFAULT_LINK_TIMEOUT`]; a bad value
/// is logged and ignored.
pub fn link_timeout() -> Duration {
    let Ok(text) = std::env::var(ENV_LINK_TIMEOUT) else {
        return DEFAULT_LINK_TIMEOUT;
    };
    match parse_link_timeout(&text) {
        Some(timeout) => timeout,
        None => {
            tracing::warn!(
                value = %text,
                default_secs = DEFAULT_LINK_TIMEOUT.as_secs(),
                "link_timeout.ignored"
            );
            DEFAULT_LINK_TIMEOUT
        }
    }
}

fn parse_link_timeout(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    if !secs.is_finite() || secs < MIN_LINK_TIMEOUT.as_secs_f64() || secs > 86_400.0 {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// Makes `stream` close by itself once its peer has been silent for about
/// `timeout`: unacknowledged data (`TCP_USER_TIMEOUT`), or an idle link
/// whose keepalive probes go unanswered (half the time idle, then three
/// probes a sixth of it apart). Returns how long unacknowledged data may
/// wait: the timeout, or twice it on a kernel without the retransmission
/// cap.
pub fn watch_link(stream: &TcpStream, timeout: Duration) -> nix::Result<Duration> {
    let timeout = timeout.max(MIN_LINK_TIMEOUT);
    let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &secs(timeout / 2))?;
    setsockopt(stream, sockopt::TcpKeepInterval, &secs(timeout / 6))?;
    setsockopt(stream, sockopt::TcpKeepCount, &3)?;
    // TCP backs its retransmissions off (0.2, 0.6, 1.4, 3, 6.2, 12.6 s ...):
    // after a cut of two thirds of the timeout, the next one would come
    // after it, and a link whose peer is reachable again would close.
    // Capped at a sixth of the timeout, a retransmission follows the heal
    // within that; a kernel without the cap (before Linux 6.15) gets twice
    // the time for unacknowledged data instead.
    let user_timeout = if cap_retransmission_interval(stream, timeout / 6).is_ok() {
        timeout
    } else {
        timeout * 2
    };
    let millis = u32::try_from(user_timeout.as_millis()).unwrap_or(u32::MAX);
    setsockopt(stream, sockopt::TcpUserTimeout, &millis)?;
    Ok(user_timeout)
}

/// `TCP_RTO_MAX_MS` (Linux 6.15 and later): the longest the kernel waits
/// between two retransmissions.
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// The length of a `c_int` option's value (4 bytes).
#[allow(clippy::cast_possible_truncation)]
const C_INT_LEN: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;

/// Caps the interval between retransmissions at `cap` (within the kernel's
/// bounds, 1 to 120 s).
fn cap_retransmission_interval(stream: &TcpStream, cap: Duration) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let millis: libc::c_int = cap
        .as_millis()
        .clamp(1_000, 120_000)
        .try_into()
        .unwrap_or(120_000);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live
    // c_int on the stack; the fd is the stream's, open for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            std::ptr::from_ref(&millis).cast(),
            C_INT_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use nix::sys::socket::getsockopt;

    use super::*;

    #[test]
    fn parses_the_timeout_and_refuses_nonsense() {
        assert_eq!(parse_link_timeout("6"), Some(Duration::from_secs(6)));
        assert_eq!(
            parse_link_timeout(" 2.5 "),
            Some(Duration::from_millis(2500))
        );
        for bad in ["", "x", "-1", "0", "1", "NaN", "inf", "1e9"] {
            assert_eq!(parse_link_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_watched_link_carries_the_timeouts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let unacknowledged = watch_link(&stream, Duration::from_secs(12)).unwrap();
        assert!(getsockopt(&stream, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).unwrap(), 6);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepInterval).unwrap(), 2);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).unwrap(), 3);
        // With the retransmission cap (Linux 6.15+: 2 s, a sixth of it),
        // unacknowledged data may wait the timeout; without, twice that.
        let mut cap: libc::c_int = 0;
        let mut len = C_INT_LEN;
        // SAFETY: getsockopt writes at most `len` bytes into a live c_int.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                libc::IPPROTO_TCP,
                TCP_RTO_MAX_MS,
                std::ptr::from_mut(&mut cap).cast(),
                &mut len,
            )
        };
        let user_timeout = getsockopt(&stream, sockopt::TcpUserTimeout).unwrap();
        if rc == 0 {
            assert_eq!((cap, user_timeout), (2_000, 12_000));
        } else {
            assert_eq!(user_timeout, 24_000);
        }
        assert_eq!(u128::from(user_timeout), unacknowledged.as_millis());
    }

    #[test]
    fn heartbeats_come_well_within_the_silence_a_peer_is_allowed() {
        for secs in [2, 3, 4, 30, 600] {
            let timeout = Duration::from_secs(secs);
            let beat = heartbeat_interval(timeout);
            assert!(
                beat <= Duration::from_secs(1) && beat <= timeout / 4,
                "{secs}"
            );
            // A partition just short of the timeout, a retransmission a
            // sixth of it later, and the beat that was on its way: still
            // inside the limit, with a second to spare.
            let survived = timeout + timeout / 6 + beat;
            let limit = silence_limit(timeout, timeout);
            assert!(
                survived + Duration::from_secs(1) <= limit,
                "{secs}: {limit:?}"
            );
        }
        // The coordinator's bound holds however long the agent's timeout.
        assert!(
            heartbeat_interval(Duration::from_secs(86_400))
                < silence_limit(MIN_LINK_TIMEOUT, MIN_LINK_TIMEOUT)
        );
    }
}
