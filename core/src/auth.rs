//! Challenge-response authentication of a connection to an agent or a
//! coordinator.
//!
//! ```text
//! client                                   server
//!   | Hello { version, job, peer } --------->|
//!   |<--------------- Challenge { nonce }    |  32 fresh random bytes
//!   | Proof { mac } ------------------------>|  mac = keyed_hash(K, nonce || role || job)
//!   |<------------ Welcome / Refused{reason} |
//! ```
//!
//! `K = blake3::derive_key(CONTEXT, token)`: the token never crosses the
//! wire, and a proof is only good for the nonce it answers, so a recorded
//! handshake cannot be replayed on another connection. The role (the peer's
//! identity, [`Peer::role`]) and the job are inside the MAC, so a proof made
//! for one rank or node does not vouch for another. Comparison is constant
//! time (`blake3::Hash`'s `PartialEq`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use crate::protocol::{
    read_frame, read_message, write_message_as, Challenge, FrameError, Hello, Peer, Proof,
};
use crate::store::fs::{IoStep, IoStepError};
use crate::token::JobToken;

/// Key-derivation context: binds keys to this use of the token.
const CONTEXT: &str = "cryo 2026-11 job token connection authentication v2";

/// Why a proof was not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    /// The client answered without a MAC (it has no token).
    #[error("presented no job token")]
    Missing,
    /// The MAC does not match this connection's challenge, role and job: a
    /// wrong token, or a proof recorded from another connection.
    #[error("wrong job token (its proof does not answer this connection's challenge)")]
    Wrong,
}

/// A fresh 32-byte nonce from the kernel.
pub fn fresh_nonce() -> Result<[u8; 32], IoStepError> {
    let path = Path::new("/dev/urandom");
    let mut nonce = [0u8; 32];
    File::open(path)
        .step("open", path)?
        .read_exact(&mut nonce)
        .step("read", path)?;
    Ok(nonce)
}

/// The MAC a holder of `token` sends to answer `nonce` as `peer` of `job`.
pub fn prove(token: &JobToken, nonce: &[u8; 32], peer: &Peer, job: &str) -> [u8; 32] {
    let key = blake3::derive_key(CONTEXT, token.expose().as_bytes());
    let role = peer.role();
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(nonce);
    // Length prefixes keep (role, job) pairs from running into each other.
    hasher.update(&(role.len() as u64).to_le_bytes());
    hasher.update(role.as_bytes());
    hasher.update(&(job.len() as u64).to_le_bytes());
    hasher.update(job.as_bytes());
    *hasher.finalize().as_bytes()
}

/// Checks a proof against the challenge this server sent for `hello`.
pub fn verify(
    token: &JobToken,
    nonce: &[u8; 32],
    hello: &Hello,
    proof: &Proof,
) -> Result<(), AuthError> {
    let Some(mac) = proof.mac else {
        return Err(AuthError::Missing);
    };
    let expected = blake3::Hash::from(prove(token, nonce, &hello.peer, &hello.job));
    if expected == blake3::Hash::from(mac) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

/// The server's half after reading a hello: sends a challenge with a fresh
/// nonce and reads the answer. Returns the nonce and the proof to check.
pub fn challenge<S>(stream: &mut S) -> Result<([u8; 32], Proof), FrameError>
where
    S: Read + Write,
{
    challenge_as(stream, crate::protocol::PROTOCOL_VERSION)
}

/// [`challenge`] for a client that said it speaks protocol `version`.
pub fn challenge_as<S>(stream: &mut S, version: u16) -> Result<([u8; 32], Proof), FrameError>
where
    S: Read + Write,
{
    let nonce = fresh_nonce().map_err(|err| FrameError::Io {
        step: "draw a challenge nonce",
        source: std::io::Error::other(err.to_string()),
    })?;
    write_message_as(stream, &Challenge { nonce }, version)?;
    let proof: Proof = read_message(stream)?;
    Ok((nonce, proof))
}

/// How long a peer may take over the handshake's reads: one that stalls
/// holds only its own thread, and not for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket whose reads can time out (the agent's Unix socket, the
/// coordinator's TCP one).
pub trait TimedStream {
    /// `set_read_timeout` of the socket.
    fn read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl TimedStream for UnixStream {
    fn read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl TimedStream for TcpStream {
    fn read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// What a server learned from a peer's handshake, for it to decide on.
#[derive(Debug)]
pub struct Greeting<X> {
    /// The peer's hello.
    pub hello: Hello,
    /// What came with the hello (a rank's control-page fd).
    pub extra: X,
    /// The nonce this server sent.
    pub nonce: [u8; 32],
    /// The peer's answer, to [`verify`].
    pub proof: Proof,
}

/// A handshake that did not get as far as a proof.
#[derive(Debug, Error)]
#[error("{}{source}", role.as_ref().map(|r| format!("{r}: ")).unwrap_or_default())]
pub struct Rejected {
    /// Who the peer said it was, if its hello arrived.
    pub role: Option<String>,
    /// What went wrong.
    pub source: FrameError,
}

/// The server's side of every handshake: reads the hello with
/// `read_hello` (which may take ancillary data), challenges the peer and
/// reads its proof, all under [`HANDSHAKE_TIMEOUT`]. The caller checks the
/// version, the job and the proof, which differ between servers.
pub fn accept<S, X>(
    stream: &S,
    read_hello: impl FnOnce(&S) -> Result<(Hello, X), FrameError>,
) -> Result<Greeting<X>, Rejected>
where
    S: TimedStream,
    for<'a> &'a S: Read + Write,
{
    let _ = stream.read_timeout(Some(HANDSHAKE_TIMEOUT));
    let (hello, extra) = read_hello(stream).map_err(|source| Rejected { role: None, source })?;
    let (nonce, proof) = challenge_as(&mut &*stream, hello.version).map_err(|source| Rejected {
        role: Some(hello.peer.role()),
        source,
    })?;
    let _ = stream.read_timeout(None);
    Ok(Greeting {
        hello,
        extra,
        nonce,
        proof,
    })
}

/// The client's half after sending `hello`: reads the challenge and answers
/// it with a proof (none when there is no token). Returns the version the
/// server answered in, which the client speaks from then on: an older
/// server's own, this build's otherwise.
pub fn answer<S>(stream: &mut S, hello: &Hello, token: Option<&JobToken>) -> Result<u16, FrameError>
where
    S: Read + Write,
{
    let frame = read_frame(stream)?;
    let version = frame.header.version;
    let Challenge { nonce } = frame.decode()?;
    let mac = token.map(|token| prove(token, &nonce, &hello.peer, &hello.job));
    write_message_as(stream, &Proof { mac }, version)?;
    Ok(version)
}

/// Where a control client's handshake failed ([`greet_as_control`]).
#[derive(Debug, Error)]
pub enum ControlHandshakeError {
    /// Sending the hello.
    #[error("sending the hello: {0}")]
    Hello(#[source] FrameError),
    /// Reading the challenge or sending the proof.
    #[error("answering the coordinator's challenge: {0}")]
    Answer(#[source] FrameError),
}

/// A control client's whole handshake on a connected `stream` to a job's
/// coordinator (`cryo checkpoint`, an agent passing a warning on): turns
/// Nagle's algorithm off, which would otherwise hold the request that
/// follows the proof for the coordinator's delayed ACK (40 ms), says hello
/// as [`Peer::Control`] named `client`, and answers the challenge with
/// `token`. Returns the version to speak from then on.
pub fn greet_as_control(
    stream: &TcpStream,
    job: &str,
    client: String,
    token: &JobToken,
) -> Result<u16, ControlHandshakeError> {
    let _ = stream.set_nodelay(true);
    let hello = Hello {
        version: crate::protocol::PROTOCOL_VERSION,
        job: job.to_owned(),
        peer: Peer::Control { client },
    };
    crate::protocol::write_message(&mut &*stream, &hello).map_err(ControlHandshakeError::Hello)?;
    answer(&mut &*stream, &hello, Some(token)).map_err(ControlHandshakeError::Answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PROTOCOL_VERSION;

    fn hello(peer: Peer, job: &str) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            job: job.into(),
            peer,
        }
    }

    #[test]
    fn a_proof_answers_only_its_own_challenge_role_and_job() {
        let token = JobToken::generate().unwrap();
        let other = JobToken::generate().unwrap();
        let rank = Peer::Rank { rank: 1, pid: 10 };
        let nonce = fresh_nonce().unwrap();
        let good = Proof {
            mac: Some(prove(&token, &nonce, &rank, "heat")),
        };
        assert_eq!(
            verify(&token, &nonce, &hello(rank.clone(), "heat"), &good),
            Ok(())
        );
        // Replayed on a connection with another nonce.
        let next = fresh_nonce().unwrap();
        assert_ne!(nonce, next);
        assert_eq!(
            verify(&token, &next, &hello(rank.clone(), "heat"), &good),
            Err(AuthError::Wrong)
        );
        // Reused for another rank, node or job.
        let two = Peer::Rank { rank: 2, pid: 10 };
        assert_eq!(
            verify(&token, &nonce, &hello(two, "heat"), &good),
            Err(AuthError::Wrong)
        );
        let agent = Peer::Agent { node: "a".into() };
        assert_eq!(
            verify(&token, &nonce, &hello(agent, "heat"), &good),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            verify(&token, &nonce, &hello(rank.clone(), "heat2"), &good),
            Err(AuthError::Wrong)
        );
        // Another token, or none.
        let forged = Proof {
            mac: Some(prove(&other, &nonce, &rank, "heat")),
        };
        assert_eq!(
            verify(&token, &nonce, &hello(rank.clone(), "heat"), &forged),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            verify(&token, &nonce, &hello(rank, "heat"), &Proof { mac: None }),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn handshake_over_a_socket_pair() {
        use std::os::unix::net::UnixStream;
        let token = JobToken::generate().unwrap();
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let hi = hello(Peer::Agent { node: "n".into() }, "j");
        let client_token = token.clone();
        let sent = hi.clone();
        let t = std::thread::spawn(move || answer(&mut client, &sent, Some(&client_token)));
        let (nonce, proof) = challenge(&mut server).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(verify(&token, &nonce, &hi, &proof), Ok(()));
    }
}
