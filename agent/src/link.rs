//! Coordinated mode: the agent's TCP link to its job's coordinator.
//!
//! The agent dials the coordinator (retrying for a while, since the
//! coordinator may still be starting), sends a [`Hello`] with the job token
//! and [`Peer::Agent`], and expects [`CoordinatorToAgent::Welcome`]. From
//! then on requests ([`CoordinatorToAgent`]) come one way and reports
//! ([`AgentToCoordinator`]) go the other, as frames of the same protocol the
//! ranks speak.
//!
//! ```text
//! coordinator                      agent                         ranks
//!     |<------ Hello{Agent, token} ---|                              |
//!     |------- Welcome{world} ------->|                              |
//!     |<------ RankRegistered --------|<-------- Hello{Rank} --------|
//!     |------- Checkpoint{E} -------->| flags, park, copy, Resume --->|
//!     |<------ Copied{E, rank} -------|  (per rank, at its resume)   |
//!     |<------ Durable{E, rank} ------|  (per rank, part written)    |
//!     |  commit_epoch(E) when every rank of every node is durable   |
//!     |------- Committed{E} --------->|                              |
//! ```

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::protocol::{
    read_message, write_message, write_message_as, AgentToCoordinator, CoordinatorToAgent,
    FrameError, Hello, Peer, PROTOCOL_VERSION,
};
use cryo_core::token::JobToken;
use thiserror::Error;

/// How long the coordinator has to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// A report that cannot be written within this time counts as a lost link.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The link to the coordinator could not be set up.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Nothing answered at the address within the wait.
    #[error("cannot reach the coordinator at {addr} (tried for {waited:?}): {source}")]
    Unreachable {
        /// `HOST:PORT`.
        addr: String,
        /// How long the agent kept trying.
        waited: Duration,
        /// The last error.
        source: io::Error,
    },
    /// The coordinator refused this agent.
    #[error("the coordinator at {addr} refused this agent: {reason}")]
    Refused {
        /// `HOST:PORT`.
        addr: String,
        /// The coordinator's reason.
        reason: String,
    },
    /// The exchange failed.
    #[error("talking to the coordinator at {addr}: {source}")]
    Protocol {
        /// `HOST:PORT`.
        addr: String,
        /// The error.
        source: FrameError,
    },
    /// The coordinator accepted the connection but never answered the hello.
    #[error("the coordinator at {addr} did not answer the hello within {waited:?} (expected Welcome or Refused)")]
    NoAnswer {
        /// `HOST:PORT`.
        addr: String,
        /// How long the agent waited.
        waited: Duration,
    },
    /// The coordinator serves another job.
    #[error("the coordinator at {addr} serves job {theirs:?}, not {ours:?}")]
    WrongJob {
        /// `HOST:PORT`.
        addr: String,
        /// This agent's job.
        ours: String,
        /// The coordinator's job.
        theirs: String,
    },
    /// The coordinator answered the hello with something else.
    #[error("the coordinator at {addr} answered the hello with {what}")]
    Unexpected {
        /// `HOST:PORT`.
        addr: String,
        /// What arrived.
        what: String,
    },
    /// A socket option could not be set.
    #[error("coordinator connection to {addr}: {step}: {source}")]
    Socket {
        /// `HOST:PORT`.
        addr: String,
        /// The step.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// The sending half of an established link. Reports are best effort: once
/// the link is lost they are dropped (the coordinator will abort the epoch).
#[derive(Debug)]
pub struct CoordinatorLink {
    addr: String,
    writer: Mutex<TcpStream>,
    connected: AtomicBool,
    world_size: u32,
    /// The version the coordinator answered in (an older one's own).
    version: u16,
}

impl CoordinatorLink {
    /// The coordinator's address, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The job's world size as the coordinator announced it.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The protocol version the coordinator answered in.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Whether the link is still up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Marks the link as lost and closes it.
    pub fn lost(&self) {
        self.connected.store(false, Ordering::Release);
        let sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a report; a failure marks the link as lost.
    pub fn send(&self, msg: &AgentToCoordinator) {
        if !self.is_connected() {
            return;
        }
        let mut sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = write_message_as(&mut *sock, msg, self.version) {
            tracing::error!(coordinator = %self.addr, error = %err, "coordinator.send_failed");
            self.connected.store(false, Ordering::Release);
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub(crate) fn try_connect(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for sockaddr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sockaddr, Duration::from_secs(2)) {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// Dials the coordinator at `addr` (retrying for `wait`), says hello and
/// waits for the welcome. Returns the link and the stream to read requests
/// from.
pub fn connect(
    addr: &str,
    job: &str,
    node: &str,
    token: &JobToken,
    wait: Duration,
) -> Result<(CoordinatorLink, TcpStream), LinkError> {
    connect_with(addr, job, node, token, wait, HELLO_TIMEOUT)
}

fn connect_with(
    addr: &str,
    job: &str,
    node: &str,
    token: &JobToken,
    wait: Duration,
    hello_timeout: Duration,
) -> Result<(CoordinatorLink, TcpStream), LinkError> {
    let start = Instant::now();
    let stream = loop {
        match try_connect(addr) {
            Ok(stream) => break stream,
            Err(source) if start.elapsed() >= wait => {
                return Err(LinkError::Unreachable {
                    addr: addr.to_owned(),
                    waited: wait,
                    source,
                })
            }
            Err(err) => {
                tracing::debug!(coordinator = %addr, error = %err, "coordinator.retry");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let socket = |step: &'static str| {
        move |source| LinkError::Socket {
            addr: addr.to_owned(),
            step,
            source,
        }
    };
    let proto = |source| LinkError::Protocol {
        addr: addr.to_owned(),
        source,
    };
    stream.set_nodelay(true).map_err(socket("TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(hello_timeout))
        .map_err(socket("SO_RCVTIMEO"))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(socket("SO_SNDTIMEO"))?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: job.to_owned(),
        peer: Peer::Agent {
            node: node.to_owned(),
        },
    };
    let no_answer = |source: FrameError| {
        if source.is_timeout() {
            LinkError::NoAnswer {
                addr: addr.to_owned(),
                waited: hello_timeout,
            }
        } else {
            proto(source)
        }
    };
    write_message(&mut &stream, &hello).map_err(proto)?;
    let version = auth::answer(&mut &stream, &hello, Some(token)).map_err(no_answer)?;
    let answer = read_message::<CoordinatorToAgent>(&mut &stream).map_err(no_answer)?;
    let world_size = match answer {
        CoordinatorToAgent::Welcome {
            job: theirs,
            world_size,
        } => {
            if !theirs.is_empty() && theirs != job {
                return Err(LinkError::WrongJob {
                    addr: addr.to_owned(),
                    ours: job.to_owned(),
                    theirs,
                });
            }
            world_size
        }
        CoordinatorToAgent::Refused { reason } => {
            return Err(LinkError::Refused {
                addr: addr.to_owned(),
                reason,
            })
        }
        other => {
            return Err(LinkError::Unexpected {
                addr: addr.to_owned(),
                what: format!("{other:?}"),
            })
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(socket("SO_RCVTIMEO"))?;
    cryo_core::liveness::watch_link(&stream, cryo_core::liveness::link_timeout())
        .map_err(|errno| socket("TCP_USER_TIMEOUT and keepalive")(errno.into()))?;
    let reader = stream.try_clone().map_err(socket("dup"))?;
    Ok((
        CoordinatorLink {
            addr: addr.to_owned(),
            writer: Mutex::new(stream),
            connected: AtomicBool::new(true),
            world_size,
            version,
        },
        reader,
    ))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use cryo_core::protocol::Departure;

    /// A one-shot coordinator answering the hello with `answer`; returns
    /// the hello and whether its proof held the right token.
    fn coordinator(answer: CoordinatorToAgent) -> (String, std::thread::JoinHandle<(Hello, bool)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let hello: Hello = read_message(&mut &stream).unwrap();
            let (nonce, proof) = auth::challenge(&mut &stream).unwrap();
            let proven = auth::verify(&token(), &nonce, &hello, &proof).is_ok();
            write_message(&mut &stream, &answer).unwrap();
            (hello, proven)
        });
        (addr, handle)
    }

    fn token() -> JobToken {
        JobToken::parse(&"ab".repeat(32), "test").unwrap()
    }

    #[test]
    fn welcome_gives_a_link_and_the_hello_carries_node_and_proves_the_token() {
        let (addr, handle) = coordinator(CoordinatorToAgent::Welcome {
            job: "j".into(),
            world_size: 4,
        });
        let (link, _reader) = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap();
        assert_eq!(link.world_size(), 4);
        assert!(link.is_connected());
        let (hello, proven) = handle.join().unwrap();
        assert_eq!(hello.peer, Peer::Agent { node: "n1".into() });
        assert!(proven, "the agent's proof must hold the job token");
        assert_eq!(hello.version, PROTOCOL_VERSION);
        link.lost();
        assert!(!link.is_connected());
        // Sending on a lost link is a no-op, not a panic.
        link.send(&AgentToCoordinator::RankLeft {
            rank: 0,
            how: Departure::Vanished,
        });
    }

    #[test]
    fn refusal_carries_the_reason() {
        let (addr, _handle) = coordinator(CoordinatorToAgent::Refused {
            reason: "bad token".into(),
        });
        let err = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::Refused { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("the coordinator at {addr} refused this agent: bad token")
        );
    }

    #[test]
    fn another_job_or_another_answer_is_refused() {
        let (addr, _handle) = coordinator(CoordinatorToAgent::Welcome {
            job: "other".into(),
            world_size: 1,
        });
        let err = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::WrongJob { .. }), "{err}");
        let (addr, _handle) = coordinator(CoordinatorToAgent::Shutdown);
        let err = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::Unexpected { .. }), "{err}");
    }

    #[test]
    fn nothing_listening_is_unreachable_after_the_wait() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        let err = connect(&addr, "j", "n1", &token(), Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, LinkError::Unreachable { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot reach the coordinator at {addr}")),
            "{err}"
        );
    }

    #[test]
    fn a_silent_coordinator_is_named_after_the_hello_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (done, wait_done) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _: Hello = read_message(&mut &stream).unwrap();
            // Hold the connection open, answer nothing, until the test ends.
            let _ = wait_done.recv();
            drop(stream);
        });
        let err = connect_with(
            &addr,
            "j",
            "n1",
            &token(),
            Duration::from_secs(5),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, LinkError::NoAnswer { .. }), "{err}");
        assert!(
            err.to_string().contains("did not answer the hello"),
            "{err}"
        );
        drop(done);
        handle.join().unwrap();
    }

    #[test]
    fn a_peer_that_closes_is_a_protocol_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _: Hello = read_message(&mut &stream).unwrap();
        });
        let err = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap_err();
        handle.join().unwrap();
        assert!(matches!(err, LinkError::Protocol { .. }), "{err}");
    }
}
