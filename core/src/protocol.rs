//! The wire protocol between ranks, node agents, control clients and (later)
//! the coordinator.
//!
//! Every message travels in one frame over a stream socket:
//!
//! ```text
//!  0       4       6       8              12             16
//!  +-------+-------+-------+--------------+--------------+----------------+
//!  | magic |version|command|    flags     | payload len  | payload ...    |
//!  | CRYP  |  u16  |  u16  |     u32      |     u32      | (bincode)      |
//!  +-------+-------+-------+--------------+--------------+----------------+
//! ```
//!
//! All integers are little-endian. Command `0` is reserved as invalid, so a
//! zeroed buffer never parses as a message. The payload length is checked
//! against [`MAX_PAYLOAD`] before anything is allocated, and the payload is
//! decoded by [`crate::codec`], which has its own limit. Each command carries
//! exactly one message type ([`Message::COMMAND`]), so a peer that sends the
//! wrong kind of message gets a typed error, never a panic.
//!
//! The first frame on every connection is a [`Hello`], which carries the
//! protocol version and the job name, and says who is calling ([`Peer`]). A
//! rank's hello also carries its control-page memfd as `SCM_RIGHTS` ancillary
//! data (see [`send_message_with_fd`]). The server answers with a
//! [`Challenge`] holding a fresh random nonce, and the client proves it holds
//! the job token with a [`Proof`] bound to that nonce, its role and the job
//! (see [`crate::auth`]); the token itself never crosses the wire, so a
//! recorded handshake cannot be replayed.
//!
//! # The control page
//!
//! A rank shares one 4 KiB page ([`ControlPage`]) with its agent. To request
//! a checkpoint the agent stores the epoch number into
//! [`ControlPage::checkpoint_requested`]; the rank's safe point is a single
//! load of that word, and only when it is non-zero does the rank talk to the
//! agent.
//!
//! # A checkpoint epoch on one node
//!
//! ```text
//! control client        agent                         rank (app thread)
//!      | Checkpoint -------->|                               |
//!      |                     | page.checkpoint_requested = E |
//!      |                     |                    checkpoint_point(): load != 0
//!      |                     |<------------ Parked{E, regions, runtime fds}
//!      |                     | read /proc/pid/{maps,fd,fdinfo}               |
//!      |                     | process_vm_readv regions -> buffer pool       |
//!      |                     |-------------- Resume{E} ------------------->  |
//!      |                     | hash + zstd + write chunks (background)   app runs
//!      |                     | RankWriter::finish, commit_epoch              |
//!      |<-- Checkpoint(report)|                                              |
//! ```

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{self, CodecError};
use crate::manifest::{RegionKind, WriteStats};

/// Frame magic: the ASCII bytes `CRYP`.
pub const MAGIC: [u8; 4] = *b"CRYP";
/// The protocol version this build speaks. Version 2 replaced the token in
/// the hello with challenge-response ([`Challenge`], [`Proof`]); version 3
/// added write tracking (`copied_bytes`, `full`); version 4 added the
/// MPI library's fds and the rank's own warnings to `Parked`
/// (`library_fds`, `warnings`).
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build accepts. Version 4 changed the
/// layout of `Parked`, so a version 3 peer is refused by name rather than
/// misread.
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// Length of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest accepted payload (16 MiB). Checked before allocating.
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// Environment variable: path of the node agent's Unix socket.
pub const ENV_AGENT_SOCKET: &str = "CRYO_AGENT_SOCKET";
/// Environment variable: the job name.
pub const ENV_JOB: &str = "CRYO_JOB";
/// Environment variable: the rank (falls back to `PMI_RANK`,
/// `OMPI_COMM_WORLD_RANK`, `SLURM_PROCID`).
pub const ENV_RANK: &str = "CRYO_RANK";
/// Environment variable: the job token (optional for now).
pub const ENV_TOKEN: &str = "CRYO_TOKEN";
/// Environment variable: base address of the region reservation.
pub const ENV_REGION_BASE: &str = "CRYO_REGION_BASE";
/// Environment variable: `truncate` (default) or `keep` for files opened for
/// writing on restart.
pub const ENV_FILE_POLICY: &str = "CRYO_FILE_POLICY";
/// Environment variable: `auto` (default), `on` or `off`; whether a rank
/// tracks writes to its regions (see [`crate::dirty`]).
pub const ENV_DIRTY_TRACKING: &str = "CRYO_DIRTY_TRACKING";

/// What a frame carries. `0` is reserved and never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum Command {
    /// A [`Hello`], first on every connection.
    Hello = 1,
    /// A [`RankToAgent`] message.
    RankToAgent = 2,
    /// An [`AgentToRank`] message.
    AgentToRank = 3,
    /// A [`ControlRequest`].
    ControlRequest = 4,
    /// A [`ControlResponse`].
    ControlResponse = 5,
    /// A [`CoordinatorToAgent`] message.
    CoordinatorToAgent = 6,
    /// An [`AgentToCoordinator`] message.
    AgentToCoordinator = 7,
    /// A [`JobRequest`] from a `cryo` client to a job's coordinator.
    JobRequest = 8,
    /// A [`JobResponse`] from a coordinator.
    JobResponse = 9,
    /// A [`Challenge`] from the server, answering a hello.
    Challenge = 10,
    /// A [`Proof`] from the client, answering a challenge.
    Proof = 11,
}

impl Command {
    /// Parses a command number; `0` and unknown numbers are refused.
    pub fn from_u16(value: u16) -> Result<Command, FrameError> {
        Ok(match value {
            1 => Command::Hello,
            2 => Command::RankToAgent,
            3 => Command::AgentToRank,
            4 => Command::ControlRequest,
            5 => Command::ControlResponse,
            6 => Command::CoordinatorToAgent,
            7 => Command::AgentToCoordinator,
            8 => Command::JobRequest,
            9 => Command::JobResponse,
            10 => Command::Challenge,
            11 => Command::Proof,
            other => return Err(FrameError::InvalidCommand(other)),
        })
    }
}

/// A frame could not be read, written or decoded.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A socket operation failed.
    #[error("{step}: {source}")]
    Io {
        /// The step that failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The frame does not start with `CRYP`.
    #[error("bad frame magic {0:02x?} (not a cryo peer?)")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version we do not accept.
    #[error("protocol version {found} is not supported (this build accepts {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
    },
    /// A hello of a protocol version that sent the job token itself.
    #[error("protocol version {found} sends the job token in its hello, which a recorded hello could replay; this build needs version {MIN_HELLO_VERSION} or newer (challenge-response)")]
    UnauthenticatedHello {
        /// The version in the hello.
        found: u16,
    },
    /// Command `0` or an unknown command.
    #[error("invalid frame command {0}")]
    InvalidCommand(u16),
    /// Flags this build does not know.
    #[error("unknown frame flags {0:#x}")]
    UnknownFlags(u32),
    /// The declared payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversized {
        /// Declared length.
        len: u64,
    },
    /// A valid frame, but not the message expected here.
    #[error("expected a {expected:?} frame, got {found:?}")]
    UnexpectedCommand {
        /// What was expected.
        expected: Command,
        /// What arrived.
        found: Command,
    },
    /// The payload does not decode.
    #[error("bad {command:?} payload: {source}")]
    Codec {
        /// The frame's command.
        command: Command,
        /// Why.
        source: CodecError,
    },
}

impl FrameError {
    fn io(step: &'static str, source: io::Error) -> FrameError {
        FrameError::Io { step, source }
    }

    /// Whether the peer went away (closed, reset, or mid-frame EOF).
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Closed | FrameError::Truncated { .. } => true,
            FrameError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// Whether a read timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the sender.
    pub version: u16,
    /// What the payload is.
    pub command: Command,
    /// Flags (none defined yet; must be zero).
    pub flags: u32,
    /// Payload length, at most [`MAX_PAYLOAD`].
    pub len: u32,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.command as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes and checks a header: magic, version, command, flags, length.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let command = Command::from_u16(u16::from_le_bytes([bytes[6], bytes[7]]))?;
        let flags = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if flags != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversized {
                len: u64::from(len),
            });
        }
        Ok(FrameHeader {
            version,
            command,
            flags,
            len,
        })
    }
}

/// A received frame whose payload is not decoded yet.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decodes the payload as `M`, which must match the frame's command.
    pub fn decode<M: Message>(&self) -> Result<M, FrameError> {
        if self.header.command != M::COMMAND {
            return Err(FrameError::UnexpectedCommand {
                expected: M::COMMAND,
                found: self.header.command,
            });
        }
        codec::decode(&self.payload).map_err(|source| FrameError::Codec {
            command: M::COMMAND,
            source,
        })
    }
}

/// A message type with its frame command.
pub trait Message: Serialize + DeserializeOwned {
    /// The command that frames this message.
    const COMMAND: Command;
}

/// Encodes `msg` into a complete frame.
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let payload = codec::encode(msg).map_err(|source| FrameError::Codec {
        command: M::COMMAND,
        source,
    })?;
    let len = match u32::try_from(payload.len()) {
        Ok(len) if len <= MAX_PAYLOAD => len,
        _ => {
            return Err(FrameError::Oversized {
                len: payload.len() as u64,
            })
        }
    };
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        command: M::COMMAND,
        flags: 0,
        len,
    };
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&header.encode());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Writes `msg` as one frame.
pub fn write_message<M: Message>(w: &mut impl Write, msg: &M) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)
        .map_err(|e| FrameError::io("send frame", e))?;
    w.flush().map_err(|e| FrameError::io("flush frame", e))
}

/// Fills `buf`, telling a clean EOF at offset 0 (`Closed`) from a torn one.
fn read_full(r: &mut impl Read, buf: &mut [u8], already: usize) -> Result<(), FrameError> {
    let mut got = already;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(FrameError::io("receive frame", err)),
        }
    }
    Ok(())
}

fn read_payload(r: &mut impl Read, header: FrameHeader) -> Result<Frame, FrameError> {
    // The length was capped by FrameHeader::decode before this allocation.
    let mut payload = vec![0u8; header.len as usize];
    read_full(r, &mut payload, 0).map_err(|err| match err {
        FrameError::Closed => FrameError::Truncated {
            got: FRAME_HEADER_LEN,
            want: FRAME_HEADER_LEN + header.len as usize,
        },
        other => other,
    })?;
    Ok(Frame { header, payload })
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    read_full(r, &mut head, 0)?;
    let header = FrameHeader::decode(&head)?;
    read_payload(r, header)
}

/// Reads one frame and decodes it as `M`.
pub fn read_message<M: Message>(r: &mut impl Read) -> Result<M, FrameError> {
    read_frame(r)?.decode()
}

/// Sends `msg` with `fd` attached as `SCM_RIGHTS` to the frame's first byte.
pub fn send_message_with_fd<M: Message>(
    sock: &UnixStream,
    msg: &M,
    fd: BorrowedFd<'_>,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(FrameError::io("sendmsg frame with fd", errno.into())),
        }
    };
    let mut writer = sock;
    if sent < frame.len() {
        writer
            .write_all(&frame[sent..])
            .map_err(|e| FrameError::io("send frame", e))?;
        sent = frame.len();
    }
    debug_assert_eq!(sent, frame.len());
    Ok(())
}

/// Receives one frame, collecting any fds sent with it (`SCM_RIGHTS`),
/// and decodes it as `M`. Received fds are close-on-exec.
pub fn recv_message_with_fd<M: Message>(
    sock: &UnixStream,
) -> Result<(M, Option<OwnedFd>), FrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let mut got = 0usize;
    let mut received: Vec<OwnedFd> = Vec::new();
    while got < FRAME_HEADER_LEN {
        let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut head[got..])];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => return Err(FrameError::io("recvmsg frame", errno.into())),
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        fds.extend(raw);
                    }
                }
            }
            (msg.bytes, fds)
        };
        for raw in fds {
            // SAFETY: the kernel just installed `raw` in our fd table for this
            // SCM_RIGHTS message; nothing else owns it.
            received.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated {
                    got,
                    want: FRAME_HEADER_LEN,
                }
            });
        }
        got += n;
    }
    let header = FrameHeader::decode(&head)?;
    let mut reader = sock;
    let frame = read_payload(&mut reader, header)?;
    let msg = frame.decode()?;
    // Extra fds (a confused or hostile peer) are closed by dropping them.
    let fd = if received.is_empty() {
        None
    } else {
        Some(received.swap_remove(0))
    };
    Ok((msg, fd))
}

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
    /// Checks the version carried in the hello.
    pub fn check_version(&self) -> Result<(), FrameError> {
        if (MIN_HELLO_VERSION..=PROTOCOL_VERSION).contains(&self.version) {
            Ok(())
        } else if self.version < MIN_HELLO_VERSION {
            Err(FrameError::UnauthenticatedHello {
                found: self.version,
            })
        } else {
            Err(FrameError::UnsupportedVersion {
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

/// How a rank starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartMode {
    /// A fresh start: nothing to restore.
    Fresh,
    /// A restart from a committed epoch.
    Restart {
        /// The epoch.
        epoch: u64,
        /// The store root directory.
        store: String,
        /// The job in the store.
        job: String,
    },
}

/// A region as the rank describes it when parked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Region name.
    pub name: String,
    /// Address in the rank.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// How its memory is provided.
    pub kind: RegionKind,
}

/// Messages from a rank to its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankToAgent {
    /// The rank is parked at a safe point for `epoch`.
    Parked {
        /// The epoch requested in the control page.
        epoch: u64,
        /// The rank's regions.
        regions: Vec<RegionInfo>,
        /// The runtime's own fds (socket, control page), never restored.
        runtime_fds: Vec<i32>,
        /// Fds that were open when the runtime started (`cryo_init`, after
        /// `MPI_Init`) and still refer to the same file: the MPI library's
        /// and the launcher's, not restored and not warned about (protocol
        /// version 4).
        library_fds: Vec<i32>,
        /// What the rank found it holds that a restart cannot give back (a
        /// mapping of a deleted file, a file written in place over its cap),
        /// for the manifest (protocol version 4).
        warnings: Vec<String>,
    },
    /// The rank finished restoring its files from `epoch`.
    Restored {
        /// The epoch.
        epoch: u64,
    },
    /// Restoring failed; the rank will exit.
    RestoreFailed {
        /// The epoch.
        epoch: u64,
        /// What went wrong.
        error: String,
    },
    /// The rank is finalizing.
    Goodbye,
    /// The ranks agreed on `epoch` but refused to park (MPI mode: a message
    /// was in flight at the safe point); the rank carries on.
    Refused {
        /// The epoch.
        epoch: u64,
        /// Why, naming the rank and the message.
        reason: String,
    },
}

impl Message for RankToAgent {
    const COMMAND: Command = Command::RankToAgent;
}

/// Messages from an agent to a rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToRank {
    /// Registration accepted.
    Welcome {
        /// Fresh start or restart.
        start: StartMode,
        /// The agent's node name.
        node: String,
    },
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// The rank's memory is copied; it may run again.
    Resume {
        /// The epoch.
        epoch: u64,
    },
    /// The checkpoint was abandoned; the rank may run again.
    Abort {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
}

impl Message for AgentToRank {
    const COMMAND: Command = Command::AgentToRank;
}

/// What to do when a checkpoint is requested while one is still draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusyPolicy {
    /// Refuse with [`ControlResponse::Busy`].
    Refuse,
    /// Wait for the previous one to finish.
    Wait,
}

/// When a checkpoint request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Completion {
    /// When every rank has resumed (data still draining).
    Resumed,
    /// When the epoch is committed.
    Committed,
}

/// Requests on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Checkpoint every registered rank.
    Checkpoint {
        /// The epoch number; default: one past the newest known.
        epoch: Option<u64>,
        /// What to do if a checkpoint is draining.
        if_busy: BusyPolicy,
        /// When to answer.
        until: Completion,
        /// Copy every chunk, even those write tracking reports unchanged.
        full: bool,
    },
    /// Make ranks that register from now on restart from an epoch.
    ArmRestart {
        /// The epoch; default: the newest committed.
        epoch: Option<u64>,
    },
    /// Report the agent's state.
    Status,
}

impl Message for ControlRequest {
    const COMMAND: Command = Command::ControlRequest;
}

/// What one rank's capture cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankCaptureReport {
    /// The rank.
    pub rank: u32,
    /// Its pid.
    pub pid: u32,
    /// Region bytes captured.
    pub bytes: u64,
    /// Of those, the bytes copied; the rest were not written since the
    /// previous epoch, whose chunks were reused.
    pub copied_bytes: u64,
    /// From `Parked` received to `Resume` sent, in nanoseconds.
    pub pause_ns: u64,
    /// Time spent copying memory (`process_vm_readv`), in nanoseconds.
    pub copy_ns: u64,
    /// Whether the state exceeded the copy budget and was streamed while
    /// the rank stayed parked.
    pub streamed: bool,
    /// Fds that will be restored.
    pub fds_restored: u32,
    /// Fds listed as not restored.
    pub fds_not_restored: u32,
}

/// The result of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The job.
    pub job: String,
    /// The node.
    pub node: String,
    /// The epoch.
    pub epoch: u64,
    /// Whether the epoch is committed (false when answered at `Resumed`).
    pub committed: bool,
    /// Per-rank figures.
    pub ranks: Vec<RankCaptureReport>,
    /// From the request to every rank resumed, in nanoseconds.
    pub resumed_ns: u64,
    /// From the request to the commit, in nanoseconds (0 if not committed).
    pub total_ns: u64,
    /// What was written.
    pub stats: WriteStats,
    /// The agent's peak RSS (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// The copy budget, in bytes.
    pub copy_budget: u64,
}

/// The agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The job.
    pub job: String,
    /// The node.
    pub node: String,
    /// The store root.
    pub store: String,
    /// Registered ranks and their pids.
    pub ranks: Vec<(u32, u32)>,
    /// The epoch being captured or drained, if any.
    pub busy: Option<u64>,
    /// The newest committed epoch.
    pub last_committed: Option<u64>,
    /// The epoch that registering ranks will restart from, if armed.
    pub armed_restart: Option<u64>,
    /// The copy budget, in bytes.
    pub copy_budget: u64,
    /// Bytes of the copy budget already pre-faulted (ready for a pause
    /// bounded by memory bandwidth).
    pub copy_budget_warm: u64,
    /// The agent's peak RSS, in bytes.
    pub peak_rss_bytes: u64,
}

/// Responses on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// The hello was accepted.
    Welcome {
        /// The agent's node.
        node: String,
        /// Its job.
        job: String,
    },
    /// The hello or request was refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// A checkpoint finished (or all ranks resumed, see [`Completion`]).
    Checkpoint(CheckpointReport),
    /// A checkpoint is still draining and the request said not to wait.
    Busy {
        /// The epoch in progress.
        epoch: u64,
        /// A message for the user.
        reason: String,
    },
    /// The checkpoint failed; nothing was committed.
    Failed {
        /// The epoch, if one was chosen.
        epoch: Option<u64>,
        /// Why.
        reason: String,
    },
    /// Ranks that register from now on will restart from `epoch`.
    RestartArmed {
        /// The epoch.
        epoch: u64,
        /// Ranks in its manifest.
        ranks: u32,
    },
    /// The agent's state.
    Status(AgentStatus),
}

impl Message for ControlResponse {
    const COMMAND: Command = Command::ControlResponse;
}

/// Length of the control page shared by a rank and its agent.
pub const CONTROL_PAGE_LEN: usize = 4096;
/// Magic in [`ControlPage::magic`]: `CRYOCTL1`.
pub const CONTROL_PAGE_MAGIC: u64 = u64::from_le_bytes(*b"CRYOCTL1");

/// The page a rank shares with its agent (a memfd mapped `MAP_SHARED` by
/// both). Only atomics, so either side may touch it at any time.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ControlPage {
    /// [`CONTROL_PAGE_MAGIC`], written by the rank before sending the fd.
    pub magic: AtomicU64,
    /// Non-zero: the epoch the agent wants captured. The rank's safe point
    /// loads this word and nothing else.
    pub checkpoint_requested: AtomicU64,
    /// The epoch the rank last parked for (written by the rank).
    pub parked_epoch: AtomicU64,
    /// The last epoch the agent resumed the rank from.
    pub resumed_epoch: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<ControlPage>() <= CONTROL_PAGE_LEN);

/// Messages from a job's coordinator to a node agent (TCP, after a
/// [`Hello`] with [`Peer::Agent`] and the job token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorToAgent {
    /// Accepted: the job and its world size.
    Welcome {
        /// The job.
        job: String,
        /// Ranks in the whole job.
        world_size: u32,
    },
    /// Refused (bad token, unknown job, duplicate node).
    Refused {
        /// Why.
        reason: String,
    },
    /// Capture every local rank for `epoch` and make its part durable; do
    /// not commit (the coordinator does, once every rank of every node is
    /// durable).
    Checkpoint {
        /// The epoch.
        epoch: u64,
        /// Milliseconds the agent may wait for its ranks to park.
        park_timeout_ms: u64,
    },
    /// Give up `epoch`: resume parked ranks, discard local parts.
    Abort {
        /// The epoch.
        epoch: u64,
        /// Why (logged by the agent).
        reason: String,
    },
    /// The epoch was committed (for the agent's log and status).
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// Ranks registering from now on restart from `epoch`.
    ArmRestart {
        /// The epoch.
        epoch: u64,
    },
    /// The job is over: exit.
    Shutdown,
}

impl Message for CoordinatorToAgent {
    const COMMAND: Command = Command::CoordinatorToAgent;
}

/// Messages from a node agent to its job's coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToCoordinator {
    /// A rank registered with this agent.
    RankRegistered {
        /// The rank.
        rank: u32,
        /// Its pid.
        pid: u32,
        /// Restarted from this epoch, if any.
        restored_epoch: Option<u64>,
    },
    /// A rank left (exited, killed or finalized).
    RankLeft {
        /// The rank.
        rank: u32,
        /// Why.
        why: String,
    },
    /// A rank's memory was copied and it resumed.
    Copied {
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
        /// Bytes copied.
        bytes: u64,
        /// How long it was paused, in microseconds.
        pause_us: u64,
    },
    /// A rank's chunks and part are durable in the store.
    Durable {
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
        /// Stored bytes newly written.
        written: u64,
    },
    /// The agent could not complete `epoch`.
    Failed {
        /// The epoch.
        epoch: u64,
        /// Why, naming the rank or file.
        reason: String,
    },
}

impl Message for AgentToCoordinator {
    const COMMAND: Command = Command::AgentToCoordinator;
}

/// Requests from a `cryo` client (`checkpoint`, `preempt`, `status`) to a
/// job's coordinator (after a [`Hello`] with [`Peer::Control`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Checkpoint now and keep running; answer when committed or aborted.
    Checkpoint,
    /// Checkpoint, then stop the job.
    Preempt,
    /// Describe the job.
    Status,
}

impl Message for JobRequest {
    const COMMAND: Command = Command::JobRequest;
}

/// A node's view in [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Ranks registered there.
    pub ranks: Vec<u32>,
    /// Whether its agent is connected.
    pub connected: bool,
}

/// A checkpoint in progress, in [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// The epoch.
    pub epoch: u64,
    /// Phase name.
    pub phase: String,
    /// Ranks copied.
    pub ranks_copied: u32,
    /// Ranks durable.
    pub ranks_durable: u32,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Milliseconds since it was requested.
    pub elapsed_ms: u64,
}

/// What `cryo status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job: String,
    /// World size.
    pub world_size: u32,
    /// Nodes and their ranks.
    pub nodes: Vec<NodeStatus>,
    /// Newest committed epoch.
    pub last_committed: Option<u64>,
    /// The checkpoint in progress.
    pub in_progress: Option<EpochProgress>,
    /// The epoch the job restarted from.
    pub restarted_from: Option<u64>,
}

/// Answers from a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobResponse {
    /// Refused (bad token, busy).
    Refused {
        /// Why.
        reason: String,
    },
    /// The checkpoint committed.
    Committed {
        /// The epoch.
        epoch: u64,
        /// Longest pause of any rank, microseconds.
        max_pause_us: u64,
        /// From the request to the last rank parked, microseconds.
        quiesce_us: u64,
        /// Bytes copied.
        bytes: u64,
        /// Stored bytes written.
        written: u64,
        /// From request to commit, milliseconds.
        elapsed_ms: u64,
    },
    /// The checkpoint aborted; the previous epoch stands.
    Aborted {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// The job's status.
    Status(JobStatus),
}

impl Message for JobResponse {
    const COMMAND: Command = Command::JobResponse;
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::os::fd::AsFd;

    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            job: "heat".into(),
            peer: Peer::Rank { rank: 3, pid: 77 },
        }
    }

    #[test]
    fn round_trip_all_messages() {
        let mut buf = Vec::new();
        write_message(&mut buf, &hello()).unwrap();
        let parked = RankToAgent::Parked {
            epoch: 4,
            regions: vec![RegionInfo {
                name: "grid".into(),
                addr: 0x5a00_0000_0000,
                len: 4096,
                kind: RegionKind::Anonymous,
            }],
            runtime_fds: vec![1000, 1001],
            library_fds: vec![0, 1, 2, 5],
            warnings: vec!["a mapping of a deleted file".into()],
        };
        write_message(&mut buf, &parked).unwrap();
        let resume = AgentToRank::Resume { epoch: 4 };
        write_message(&mut buf, &resume).unwrap();
        let request = ControlRequest::Checkpoint {
            full: false,
            epoch: None,
            if_busy: BusyPolicy::Wait,
            until: Completion::Committed,
        };
        write_message(&mut buf, &request).unwrap();
        let mut r = Cursor::new(buf);
        assert_eq!(read_message::<Hello>(&mut r).unwrap(), hello());
        assert_eq!(read_message::<RankToAgent>(&mut r).unwrap(), parked);
        assert_eq!(read_message::<AgentToRank>(&mut r).unwrap(), resume);
        assert_eq!(read_message::<ControlRequest>(&mut r).unwrap(), request);
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    fn header_bytes(version: u16, command: u16, flags: u32, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&command.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut bytes = encode_frame(&hello()).unwrap();
        bytes[0] = b'X';
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, FrameError::BadMagic(_)), "{err}");
    }

    #[test]
    fn command_zero_and_unknown_commands_are_refused() {
        for command in [0u16, 12, u16::MAX] {
            let bytes = header_bytes(PROTOCOL_VERSION, command, 0, 0);
            let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
            assert!(
                matches!(err, FrameError::InvalidCommand(c) if c == command),
                "{err}"
            );
        }
    }

    #[test]
    fn unsupported_versions_are_refused() {
        for version in [0u16, PROTOCOL_VERSION + 1] {
            let bytes = header_bytes(version, 1, 0, 0);
            let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
            assert!(
                matches!(err, FrameError::UnsupportedVersion { .. }),
                "{err}"
            );
        }
        let mut newer = hello();
        newer.version = PROTOCOL_VERSION + 1;
        assert!(matches!(
            newer.check_version(),
            Err(FrameError::UnsupportedVersion { .. })
        ));
        assert!(hello().check_version().is_ok());
        // Version 1 hellos carried the token itself: refused, and said why.
        let mut v1 = hello();
        v1.version = 1;
        let err = v1.check_version().unwrap_err();
        assert!(
            matches!(err, FrameError::UnauthenticatedHello { found: 1 }),
            "{err}"
        );
        assert!(err.to_string().contains("challenge-response"), "{err}");
    }

    #[test]
    fn unknown_flags_are_refused() {
        let bytes = header_bytes(PROTOCOL_VERSION, 1, 4, 0);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, FrameError::UnknownFlags(4)), "{err}");
    }

    #[test]
    fn oversized_frame_is_refused_before_allocating() {
        // No payload follows: a reader that allocated and read would report
        // truncation instead.
        let bytes = header_bytes(PROTOCOL_VERSION, 1, 0, u32::MAX);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, FrameError::Oversized { len } if len == u64::from(u32::MAX)),
            "{err}"
        );
        let bytes = header_bytes(PROTOCOL_VERSION, 1, 0, MAX_PAYLOAD + 1);
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes)),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn truncated_frames_are_refused() {
        let bytes = encode_frame(&hello()).unwrap();
        for cut in [1, FRAME_HEADER_LEN - 1, FRAME_HEADER_LEN, bytes.len() - 1] {
            let err = read_frame(&mut Cursor::new(bytes[..cut].to_vec())).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
            assert!(err.is_disconnect());
        }
        assert!(matches!(
            read_frame(&mut Cursor::new(Vec::new())),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn wrong_message_kind_is_refused() {
        let bytes = encode_frame(&hello()).unwrap();
        let err = read_message::<ControlRequest>(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::UnexpectedCommand {
                    expected: Command::ControlRequest,
                    found: Command::Hello
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_payload_is_refused() {
        let mut bytes = header_bytes(PROTOCOL_VERSION, Command::RankToAgent as u16, 0, 8);
        bytes.extend_from_slice(&[0xff; 8]);
        let err = read_message::<RankToAgent>(&mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, FrameError::Codec { .. }), "{err}");

        // A payload whose string length prefix is hostile.
        let mut bytes = header_bytes(PROTOCOL_VERSION, Command::Hello as u16, 0, 10);
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = read_message::<Hello>(&mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, FrameError::Codec { .. }), "{err}");
    }

    #[test]
    fn header_round_trip() {
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            command: Command::ControlResponse,
            flags: 0,
            len: 1234,
        };
        assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = read_frame(&mut Cursor::new(bytes.clone()));
            let _ = read_message::<Hello>(&mut Cursor::new(bytes.clone()));
            let _ = read_message::<ControlResponse>(&mut Cursor::new(bytes));
        }

        #[test]
        fn valid_header_with_arbitrary_payload_never_panics(
            command in 1u16..=5,
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let mut bytes = header_bytes(PROTOCOL_VERSION, command, 0, payload.len() as u32);
            bytes.extend_from_slice(&payload);
            let frame = read_frame(&mut Cursor::new(bytes)).unwrap();
            let _ = frame.decode::<Hello>();
            let _ = frame.decode::<RankToAgent>();
            let _ = frame.decode::<AgentToRank>();
            let _ = frame.decode::<ControlRequest>();
            let _ = frame.decode::<ControlResponse>();
        }

        #[test]
        fn parked_round_trips(
            epoch in 1u64..,
            names in proptest::collection::vec("[a-z]{1,12}", 0..8),
            addr in proptest::num::u64::ANY,
        ) {
            let msg = RankToAgent::Parked {
                epoch,
                regions: names
                    .iter()
                    .map(|name| RegionInfo { name: name.clone(), addr, len: 4096, kind: RegionKind::Protected })
                    .collect(),
                runtime_fds: vec![1000, 1001],
                library_fds: vec![],
                warnings: vec![],
            };
            let bytes = encode_frame(&msg).unwrap();
            proptest::prop_assert_eq!(read_message::<RankToAgent>(&mut Cursor::new(bytes)).unwrap(), msg);
        }
    }

    #[test]
    fn fd_passing_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send_message_with_fd(&a, &hello(), file.as_fd()).unwrap();
        write_message(&mut &a, &RankToAgent::Goodbye).unwrap();
        let (msg, fd) = recv_message_with_fd::<Hello>(&b).unwrap();
        assert_eq!(msg, hello());
        assert!(fd.is_some());
        assert_eq!(
            read_message::<RankToAgent>(&mut &b).unwrap(),
            RankToAgent::Goodbye
        );
        // no fd on a plain frame
        write_message(&mut &a, &hello()).unwrap();
        let (_, fd) = recv_message_with_fd::<Hello>(&b).unwrap();
        assert!(fd.is_none());
        drop(a);
        assert!(matches!(
            recv_message_with_fd::<Hello>(&b),
            Err(FrameError::Closed)
        ));
    }
}
