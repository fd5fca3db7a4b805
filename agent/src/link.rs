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
//!     |<------ Alive -----------------|  (heartbeat, at least 1/s:  |
//!     |                               |   `heartbeat`)               |
//! ```

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::protocol::{
    read_message, write_message, write_message_as, AgentToCoordinator, CoordinatorToAgent,
    FrameError, Hello, Peer, PROTOCOL_VERSION,
};
use cryo_core::token::JobToken;
use thiserror::Error;

use crate::roster::Roster;

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

/// The sending half of an established link. Reports are best effort: while
/// the link is down they are dropped (the coordinator aborts the epoch), but
/// what they say of the node's ranks is kept ([`Roster`]) and stated again
/// when the agent rejoins ([`CoordinatorLink::rejoin`]).
#[derive(Debug)]
pub struct CoordinatorLink {
    who: Identity,
    wire: Mutex<Wire>,
    connected: AtomicBool,
    world_size: u32,
    /// The version the coordinator answered in (an older one's own).
    version: AtomicU16,
}

/// Where the agent dials and who it says it is.
#[derive(Debug)]
struct Identity {
    addr: String,
    job: String,
    node: String,
    token: JobToken,
}

/// The current connection and what has been reported on it or any before.
#[derive(Debug)]
struct Wire {
    stream: TcpStream,
    roster: Roster,
}

impl CoordinatorLink {
    /// The coordinator's address, for messages.
    pub fn addr(&self) -> &str {
        &self.who.addr
    }

    /// The job's world size as the coordinator announced it.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The protocol version the coordinator answered in.
    pub fn version(&self) -> u16 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether the link is still up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn wire(&self) -> std::sync::MutexGuard<'_, Wire> {
        self.wire.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the link as lost and closes it.
    pub fn lost(&self) {
        self.connected.store(false, Ordering::Release);
        let _ = self.wire().stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a report; a failure marks the link as lost.
    pub fn send(&self, msg: &AgentToCoordinator) {
        let mut wire = self.wire();
        wire.roster.record(msg);
        if !self.is_connected() {
            return;
        }
        if let Err(err) = write_message_as(&mut wire.stream, msg, self.version()) {
            tracing::error!(coordinator = %self.who.addr, error = %err, "coordinator.send_failed");
            self.connected.store(false, Ordering::Release);
            let _ = wire.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Dials the coordinator once more after the link was lost, says hello
    /// again and states the node's ranks afresh. Returns the stream to read
    /// requests from. Reports made meanwhile wait for the roster to be
    /// stated, so none is lost between the two.
    pub fn rejoin(&self) -> Result<TcpStream, LinkError> {
        let dialed = dial(&self.who, Duration::ZERO, HELLO_TIMEOUT)?;
        if dialed.world_size != self.world_size {
            return Err(LinkError::Unexpected {
                addr: self.who.addr.clone(),
                what: format!(
                    "a job of {} ranks (this agent joined one of {})",
                    dialed.world_size, self.world_size
                ),
            });
        }
        let mut stream = dialed.stream;
        let mut wire = self.wire();
        for msg in wire.roster.restated() {
            write_message_as(&mut stream, &msg, dialed.version).map_err(|source| {
                LinkError::Protocol {
                    addr: self.who.addr.clone(),
                    source,
                }
            })?;
        }
        wire.stream = stream;
        self.version.store(dialed.version, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        Ok(dialed.reader)
    }
}

/// How long one dial of the coordinator may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn try_connect(addr: &str) -> io::Result<TcpStream> {
    cryo_core::liveness::connect_within(addr, DIAL_TIMEOUT)
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
    let who = Identity {
        addr: addr.to_owned(),
        job: job.to_owned(),
        node: node.to_owned(),
        token: token.clone(),
    };
    let dialed = dial(&who, wait, hello_timeout)?;
    Ok((
        CoordinatorLink {
            who,
            wire: Mutex::new(Wire {
                stream: dialed.stream,
                roster: Roster::default(),
            }),
            connected: AtomicBool::new(true),
            world_size: dialed.world_size,
            version: AtomicU16::new(dialed.version),
        },
        dialed.reader,
    ))
}

/// A connection the coordinator welcomed.
struct Dialed {
    stream: TcpStream,
    reader: TcpStream,
    version: u16,
    world_size: u32,
}

fn dial(who: &Identity, wait: Duration, hello_timeout: Duration) -> Result<Dialed, LinkError> {
    let (addr, job, node, token) = (
        who.addr.as_str(),
        who.job.as_str(),
        who.node.as_str(),
        &who.token,
    );
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
    Ok(Dialed {
        stream,
        reader,
        version,
        world_size,
    })
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
    fn a_link_dialed_again_states_the_ranks_and_then_carries_reports() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let welcome = CoordinatorToAgent::Welcome {
            job: "j".into(),
            world_size: 2,
        };
        let handle = std::thread::spawn(move || {
            let mut heard = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                let hello: Hello = read_message(&mut &stream).unwrap();
                let (nonce, proof) = auth::challenge(&mut &stream).unwrap();
                assert!(auth::verify(&token(), &nonce, &hello, &proof).is_ok());
                write_message(&mut &stream, &welcome).unwrap();
                let mut said = Vec::new();
                while let Ok(msg) = read_message::<AgentToCoordinator>(&mut &stream) {
                    said.push(msg);
                }
                heard.push(said);
            }
            heard
        });
        let registered = |rank| AgentToCoordinator::RankRegistered {
            rank,
            pid: 10 + rank,
            restored_epoch: None,
        };
        let finalized = AgentToCoordinator::RankLeft {
            rank: 0,
            how: Departure::Finalized,
        };
        let (link, _reader) = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap();
        link.send(&registered(0));
        link.lost();
        // While the link is down: not sent, but not forgotten either.
        link.send(&finalized);
        link.send(&registered(1));
        let _reader = link.rejoin().unwrap();
        assert!(link.is_connected());
        let durable = AgentToCoordinator::Durable {
            epoch: 2,
            rank: 1,
            written: 7,
        };
        link.send(&durable);
        link.lost();
        let heard = handle.join().unwrap();
        assert_eq!(heard[0], [registered(0)]);
        assert_eq!(heard[1], [registered(0), finalized, registered(1), durable]);
    }

    #[test]
    fn a_coordinator_of_another_world_is_not_rejoined() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            for world_size in [2, 3] {
                let (stream, _) = listener.accept().unwrap();
                let _: Hello = read_message(&mut &stream).unwrap();
                auth::challenge(&mut &stream).unwrap();
                let welcome = CoordinatorToAgent::Welcome {
                    job: "j".into(),
                    world_size,
                };
                write_message(&mut &stream, &welcome).unwrap();
                while read_message::<AgentToCoordinator>(&mut &stream).is_ok() {}
            }
        });
        let (link, _reader) = connect(&addr, "j", "n1", &token(), Duration::from_secs(5)).unwrap();
        link.lost();
        let err = link.rejoin().unwrap_err();
        assert!(matches!(err, LinkError::Unexpected { .. }), "{err}");
        assert!(!link.is_connected());
        drop(link);
        handle.join().unwrap();
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
