//! A control client: `cryo-agent checkpoint`, `restart` and `status`, and
//! the tests and the benchmark, talk to an agent through this.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use cryo_core::auth;
use cryo_core::protocol::{
    read_message, write_message, write_message_as, ControlRequest, ControlResponse, FrameError,
    Hello, Peer, PROTOCOL_VERSION,
};
use cryo_core::token::JobToken;
use thiserror::Error;

/// A control request failed to get an answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The agent's socket could not be reached.
    #[error("cannot reach the cryo agent at {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to the cryo agent at {}: {source}", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: FrameError,
    },
    /// The agent refused the connection.
    #[error("the cryo agent at {} refused: {reason}", path.display())]
    Refused {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A connection to an agent's control channel.
#[derive(Debug)]
pub struct ControlClient {
    sock: UnixStream,
    path: PathBuf,
    /// The version the agent answered in (an older agent's own).
    version: u16,
}

impl ControlClient {
    /// Connects and says hello. `job` may be empty (any job).
    pub fn connect(path: &Path, job: &str) -> Result<ControlClient, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let mut client = ControlClient {
            sock,
            path: path.to_owned(),
            version: PROTOCOL_VERSION,
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            job: job.to_owned(),
            peer: Peer::Control {
                client: format!("cryo-agent-cli/{}", std::process::id()),
            },
        };
        let token = std::env::var(cryo_core::protocol::ENV_TOKEN)
            .ok()
            .and_then(|text| JobToken::parse(&text, cryo_core::protocol::ENV_TOKEN).ok());
        write_message(&mut client.sock, &hello).map_err(|source| client.proto(source))?;
        client.version = auth::answer(&mut client.sock, &hello, token.as_ref())
            .map_err(|source| client.proto(source))?;
        match read_message::<ControlResponse>(&mut client.sock)
            .map_err(|source| client.proto(source))?
        {
            ControlResponse::Welcome { .. } => Ok(client),
            ControlResponse::Refused { reason } => Err(ClientError::Refused {
                path: path.to_owned(),
                reason,
            }),
            other => Err(ClientError::Refused {
                path: path.to_owned(),
                reason: format!("unexpected {other:?}"),
            }),
        }
    }

    fn proto(&self, source: FrameError) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends a request and waits for its answer.
    pub fn request(&mut self, request: &ControlRequest) -> Result<ControlResponse, ClientError> {
        write_message_as(&mut self.sock, request, self.version)
            .map_err(|source| self.proto(source))?;
        read_message(&mut self.sock).map_err(|source| self.proto(source))
    }
}

/// Connects, sends one request and returns the answer.
pub fn request(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ClientError> {
    ControlClient::connect(path, "")?.request(request)
}
