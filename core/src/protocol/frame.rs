//! Frames: the fixed header, reading and writing one message, and passing
//! an fd with it (`SCM_RIGHTS`).
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    FRAME_HEADER_LEN, MAGIC, MAX_PAYLOAD, MIN_HELLO_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::format::codec::{self, CodecError};
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
        let raw_command = u16::from_le_bytes([bytes[6], bytes[7]]);
        // A newer peer's hello is read (its layout has not changed since
        // version 2) and answered in this build's version, which the peer
        // then speaks; any other frame of a version this build does not
        // know is refused.
        let newer_hello = version > PROTOCOL_VERSION && raw_command == Command::Hello as u16;
        if version < MIN_PROTOCOL_VERSION || (version > PROTOCOL_VERSION && !newer_hello) {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let command = Command::from_u16(raw_command)?;
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
        M::decode_from(self.header.version, &self.payload).map_err(|source| FrameError::Codec {
            command: M::COMMAND,
            source,
        })
    }
}

/// A message type with its frame command.
pub trait Message: Serialize + DeserializeOwned {
    /// The command that frames this message.
    const COMMAND: Command;

    /// Encodes the payload for a peer that speaks `version`. A message whose
    /// layout changed overrides this to write the older layout for an older
    /// peer (see `protocol::v4`).
    fn encode_for(&self, version: u16) -> Result<Vec<u8>, CodecError> {
        let _ = version;
        codec::encode(self)
    }

    /// Decodes a payload a peer of `version` sent, converting an older
    /// layout.
    fn decode_from(version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        let _ = version;
        codec::decode(payload)
    }
}

/// The version to speak with a peer that said it speaks `peer`: the older
/// of the two, so that a server answers an older client in its own layout.
pub fn negotiated(peer: u16) -> u16 {
    peer.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
}

/// Encodes `msg` into a complete frame of this build's version.
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    encode_frame_as(msg, PROTOCOL_VERSION)
}

/// Encodes `msg` into a complete frame for a peer of `version`.
pub fn encode_frame_as<M: Message>(msg: &M, version: u16) -> Result<Vec<u8>, FrameError> {
    let version = negotiated(version);
    let payload = msg
        .encode_for(version)
        .map_err(|source| FrameError::Codec {
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
        version,
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
    write_message_as(w, msg, PROTOCOL_VERSION)
}

/// Writes `msg` as one frame for a peer of `version`.
pub fn write_message_as<M: Message>(
    w: &mut impl Write,
    msg: &M,
    version: u16,
) -> Result<(), FrameError> {
    let frame = encode_frame_as(msg, version)?;
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
    send_message_with_fd_as(sock, msg, fd, PROTOCOL_VERSION)
}

/// Sends `msg` with `fd` attached, for a peer of `version`.
pub fn send_message_with_fd_as<M: Message>(
    sock: &UnixStream,
    msg: &M,
    fd: BorrowedFd<'_>,
    version: u16,
) -> Result<(), FrameError> {
    let frame = encode_frame_as(msg, version)?;
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
