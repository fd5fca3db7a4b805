//! The coordinator's listener: agents and `cryo` clients connect over TCP,
//! prove they hold the job token, and what they say becomes an [`Event`]
//! for the event loop. Each peer is answered in its own protocol version.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread;
use std::time::Duration;

use cryo_core::protocol::{
    read_message, write_message_as, AgentToCoordinator, CoordinatorToAgent, Hello, JobRequest,
    JobResponse, Message, Peer, HEARTBEAT_VERSION,
};
use cryo_core::token::JobToken;
use cryo_core::{auth, liveness};

use crate::link_loss::LinkLoss;

/// What the event loop hears.
pub(crate) enum Event {
    /// An agent said hello and was accepted.
    AgentConnected {
        node: String,
        writer: TcpStream,
        /// The protocol version it speaks.
        version: u16,
        /// This connection's number ([`next_link`]).
        link: u64,
    },
    Agent {
        node: String,
        msg: AgentToCoordinator,
    },
    AgentLost {
        node: String,
        why: LinkLoss,
        /// The number of the connection that was lost: an agent that
        /// rejoined may be on a newer one already.
        link: u64,
    },
    Request {
        request: JobRequest,
        reply: Sender<JobResponse>,
    },
    /// The commit thread finished an epoch ([`crate::commit`]).
    Committed {
        epoch: u64,
        result: crate::commit::CommitResult,
    },
}

/// Accepts connections and forwards what peers say to the event loop.
pub(crate) fn serve_connections(
    listener: TcpListener,
    job: String,
    world_size: u32,
    token: JobToken,
    expected: Option<BTreeSet<String>>,
    events: Sender<Event>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // Frames are small and each answers the other side: Nagle's
        // algorithm would hold one back for the peer's delayed ACK (40 ms).
        let _ = stream.set_nodelay(true);
        let (job, token, expected, events) =
            (job.clone(), token.clone(), expected.clone(), events.clone());
        thread::spawn(move || serve_peer(stream, &job, world_size, &token, &expected, &events));
    }
}

/// A number for each agent connection, unique in this process.
pub(crate) fn next_link() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn refuse<M: Message>(stream: &TcpStream, msg: &M, version: u16) {
    let _ = write_message_as(&mut &*stream, msg, version);
}

/// How long the coordinator waits for one write to an agent before it
/// takes that agent for lost.
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

fn serve_peer(
    stream: TcpStream,
    job: &str,
    world_size: u32,
    token: &JobToken,
    expected: &Option<BTreeSet<String>>,
    events: &Sender<Event>,
) {
    let peer_addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // The client proves it holds the token without sending it; the answer
    // is bound to this connection's nonce, so a recorded one is worthless.
    let greeting = match auth::accept(&stream, |s| {
        read_message::<Hello>(&mut &*s).map(|hello| (hello, ()))
    }) {
        Ok(greeting) => greeting,
        Err(auth::Rejected {
            role: None,
            source: cryo_core::protocol::FrameError::Closed,
        }) => {
            // A liveness probe (`cryo run` checking for a stale entry).
            tracing::debug!(job, peer = %peer_addr, "peer.closed_before_hello");
            return;
        }
        Err(err) => {
            tracing::warn!(job, peer = %peer_addr, error = %err, "peer.rejected");
            return;
        }
    };
    let auth::Greeting {
        hello,
        nonce,
        proof,
        ..
    } = greeting;
    let version = hello.version;
    let problem = if let Err(err) = hello.check_version() {
        Some(err.to_string())
    } else if hello.job != job {
        Some(format!(
            "this coordinator runs job {job:?}, not {:?}",
            hello.job
        ))
    } else if let Err(err) = auth::verify(token, &nonce, &hello, &proof) {
        Some(format!("wrong or missing job token: {err}"))
    } else {
        None
    };
    match hello.peer {
        Peer::Agent { node } => {
            let problem = problem.or_else(|| {
                expected
                    .as_ref()
                    .is_some_and(|nodes| !nodes.contains(&node))
                    .then(|| format!("node {node:?} is not part of this job"))
            });
            if let Some(reason) = problem {
                tracing::warn!(job, peer = %peer_addr, node = %node, reason = %reason, "peer.rejected");
                refuse(&stream, &CoordinatorToAgent::Refused { reason }, version);
                return;
            }
            let welcome = CoordinatorToAgent::Welcome {
                job: job.to_owned(),
                world_size,
            };
            if write_message_as(&mut &stream, &welcome, version).is_err() {
                return;
            }
            let Ok(writer) = stream.try_clone() else {
                return;
            };
            // The event thread writes to every agent: one whose socket
            // stopped draining costs it a bounded wait, then counts as lost.
            let _ = writer.set_write_timeout(Some(AGENT_WRITE_TIMEOUT));
            // An agent behind a partition says nothing: count it lost after
            // the link timeout rather than TCP's quarter of an hour.
            let timeout = liveness::link_timeout();
            let unacknowledged = liveness::watch_link(&stream, timeout).unwrap_or_else(|errno| {
                tracing::warn!(job, node = %node, error = %errno, "peer.unwatched");
                timeout * 2
            });
            // One that is stopped or hung still has its kernel answer TCP,
            // but its heartbeats stop.
            let silence = liveness::silence_limit(unacknowledged, timeout);
            let heard = version >= HEARTBEAT_VERSION;
            if heard {
                if let Err(err) = stream.set_read_timeout(Some(silence)) {
                    tracing::warn!(job, node = %node, error = %err, "peer.unwatched");
                }
            }
            let link = next_link();
            if events
                .send(Event::AgentConnected {
                    node: node.clone(),
                    writer,
                    version,
                    link,
                })
                .is_err()
            {
                return;
            }
            let why = loop {
                match read_message::<AgentToCoordinator>(&mut &stream) {
                    // Hearing it is all a heartbeat is for.
                    Ok(AgentToCoordinator::Alive) => {}
                    Ok(msg) => {
                        if events
                            .send(Event::Agent {
                                node: node.clone(),
                                msg,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(err) if err.is_disconnect() => break LinkLoss::Closed,
                    Err(err) if heard && err.is_timeout() => break LinkLoss::Silent(silence),
                    Err(err) => break LinkLoss::Broken(err.to_string()),
                }
            };
            let _ = events.send(Event::AgentLost { node, why, link });
        }
        Peer::Control { client } => {
            if let Some(reason) = problem {
                tracing::warn!(job, peer = %peer_addr, client = %client, reason = %reason, "peer.rejected");
                refuse(&stream, &JobResponse::Refused { reason }, version);
                return;
            }
            loop {
                let request = match read_message::<JobRequest>(&mut &stream) {
                    Ok(request) => request,
                    Err(err) if err.is_disconnect() => return,
                    Err(err) => {
                        tracing::warn!(job, peer = %peer_addr, client = %client, error = %err, "request.rejected");
                        return;
                    }
                };
                let (tx, rx) = mpsc::channel();
                if events.send(Event::Request { request, reply: tx }).is_err() {
                    return;
                }
                let Ok(response) = rx.recv() else { return };
                if write_message_as(&mut &stream, &response, version).is_err() {
                    return;
                }
            }
        }
        Peer::Rank { rank, .. } => {
            tracing::warn!(job, peer = %peer_addr, rank, "peer.rejected");
            refuse(
                &stream,
                &JobResponse::Refused {
                    reason: "ranks talk to their node agent, not the coordinator".into(),
                },
                version,
            );
        }
    }
}
