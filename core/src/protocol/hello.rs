//! The first messages on every connection: who is calling, and the
//! challenge-response that proves it holds the job token.
use serde::{Deserialize, Serialize};

use super::{Command, FrameError, Message};
/// Who opened a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// A rank process registering with its node agent.
    Rank {
        /// MPI rank.
        rank: u32,
        /// Its pid.
        pid: u32,
    },
    /// A command-line or admin client.
    Control {
        /// Free text naming the client, for logs.
        client: String,
    },
    /// A node agent (talking to the coordinator).
    Agent {
        /// The agent's node name.
        node: String,
    },
}

impl Peer {
    /// The peer's identity as the authentication proof binds it: a proof
    /// made for one rank, node or client does not vouch for another.
    pub fn role(&self) -> String {
        match self {
            Peer::Rank { rank, pid } => format!("rank {rank} pid {pid}"),
            Peer::Control { client } => format!("control {client}"),
            Peer::Agent { node } => format!("agent {node}"),
        }
    }
}

/// The first message on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// The job.
    pub job: String,
    /// Who is calling.
    pub peer: Peer,
}

impl Message for Hello {
    const COMMAND: Command = Command::Hello;
}

/// The first protocol version whose hello is authenticated by
/// challenge-response. Version 1 sent the token itself, which anyone who saw
/// one hello could replay, so it is refused even though its frames parse.
pub const MIN_HELLO_VERSION: u16 = 2;

impl Hello {
    /// Checks the version carried in the hello. A newer peer is accepted:
    /// it is answered in this build's version ([`super::negotiated`]) and
    /// speaks that from then on (a `cryo` upgraded while jobs of the
    /// version before run).
    pub fn check_version(&self) -> Result<(), FrameError> {
        if self.version >= MIN_HELLO_VERSION {
            Ok(())
        } else {
            Err(FrameError::UnauthenticatedHello {
                found: self.version,
            })
        }
    }
}

/// The server's answer to a hello: prove you hold the job token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes, fresh for this connection.
    pub nonce: [u8; 32],
}

impl Message for Challenge {
    const COMMAND: Command = Command::Challenge;
}

/// The client's answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// `blake3::keyed_hash(key derived from the token, nonce || role || job)`,
    /// or `None` when the client has no token.
    pub mac: Option<[u8; 32]>,
}

impl Message for Proof {
    const COMMAND: Command = Command::Proof;
}
