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
//! decoded by [`crate::format::codec`], which has its own limit. Each command carries
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

mod control;
mod coordinator;
mod departure;
mod frame;
mod hello;
mod job;
mod rank;
mod reason;
#[cfg(test)]
mod tests;
mod v13;
mod v4;

pub use control::*;
pub use coordinator::*;
pub use departure::*;
pub use frame::*;
pub use hello::*;
pub use job::*;
pub use rank::*;
pub use reason::*;
// The variables the runtime and the agent agree on, named in one place.
pub use crate::env::{
    ENV_AGENT_SOCKET, ENV_DIRTY_TRACKING, ENV_FILE_POLICY, ENV_JOB, ENV_RANK, ENV_REGION_BASE,
    ENV_TOKEN,
};

/// Frame magic: the ASCII bytes `CRYP`.
pub const MAGIC: [u8; 4] = *b"CRYP";
/// The protocol version this build speaks. Version 2 replaced the token in
/// the hello with challenge-response ([`Challenge`], [`Proof`]); version 3
/// added write tracking (`copied_bytes`, `full`); version 4 added the
/// MPI library's fds and the rank's own warnings to `Parked`
/// (`library_fds`, `warnings`); version 5 made epoch failures typed
/// ([`AbortReason`]); version 6 added the copy-on-write snapshot of a
/// parked rank ([`AgentToRank::Snapshot`], [`RankToAgent::Snapshot`]),
/// which an agent asks only of a rank of version 6 or newer; version 7 let
/// a parked rank copy its own memory into the agent's copy budget
/// ([`AgentToRank::CopyInto`], [`RankToAgent::Copied`]), which an agent
/// asks only of a rank of version 7 or newer; version 8 added the
/// checkpoint before the job stops ([`CoordinatorToAgent::FinalCheckpoint`]),
/// sent to an older agent as a plain `Checkpoint`; version 9 let an agent
/// tell a rank which slots of the budget its next parked copy goes to
/// ([`AgentToRank::FillView`]), sent only to a rank of version 9 or newer;
/// version 10 told a rank held at its safe point by others from one that
/// never reached it ([`AbortReason::WaitedForOthers`]), which an older
/// peer reads as [`AbortReason::ParkTimeout`]; version 11 let an agent
/// send `FillView` between checkpoints too (epoch 0), before a rank's
/// first parked copy, sent only to a rank of version 11 or newer, and a
/// rank publish the bytes of its regions in the control page
/// ([`ControlPage::region_bytes`], zero from an older rank); version 12
/// let a rank mark that it has passed its first safe point
/// ([`ControlPage::computing`], zero from an older rank), after which its
/// agent warms the copy budget without waiting out the pre-fault delay;
/// version 13 let a rank that exits before finalizing tell its agent the
/// status it exits with ([`RankToAgent::Exiting`]), sent only to an agent
/// of version 13 or newer; version 14 made how a rank left a typed
/// [`Departure`] (`AgentToCoordinator::RankLeft`), text before (`v13.rs`);
/// version 15 let a rank pass on a warning of the job's end that reached
/// it (`SIGUSR1`: [`RankToAgent::Warned`], sent only to an agent of version
/// 15 or newer) and an agent pass it on to the coordinator
/// ([`JobRequest::Warning`], sent only to a coordinator of version 15 or
/// newer); version 16 let an agent say it is alive between reports
/// ([`AgentToCoordinator::Alive`], sent only to a coordinator of version 16
/// or newer, which counts a silent agent of version 16 or newer lost);
/// version 17 let a rank take a `SIGTERM` as a warning too
/// ([`RankToAgent::Warned`], sent only to an agent of version 17 or
/// newer), an agent pass it on ([`JobRequest::Terminated`], sent only to a
/// coordinator of version 17 or newer), and an agent tell a rank held to
/// the stop that its part is durable ([`AgentToRank::Held`], sent only to
/// a rank of version 17 or newer).
pub const PROTOCOL_VERSION: u16 = 17;
/// The first version whose ranks, agents and coordinators take a rank's
/// `SIGTERM` as a checkpoint and a stop.
pub const TERMINATION_VERSION: u16 = 17;
/// The first version whose agents send, and coordinators take, heartbeats.
pub const HEARTBEAT_VERSION: u16 = 16;
/// The first version whose agents and coordinators take a rank's warning.
pub const WARNING_VERSION: u16 = 15;
/// The first version whose `RankLeft` carries a typed [`Departure`].
pub const TYPED_DEPARTURE_VERSION: u16 = 14;
/// The first version whose agents take [`RankToAgent::Exiting`].
pub const EXIT_STATUS_VERSION: u16 = 13;
/// The first version whose ranks take a snapshot when asked.
pub const SNAPSHOT_VERSION: u16 = 6;
/// The first version whose ranks copy their own memory when asked.
pub const SELF_COPY_VERSION: u16 = 7;
/// The first version whose agents take `FinalCheckpoint`.
pub const FINAL_CHECKPOINT_VERSION: u16 = 8;
/// The first version whose ranks take `FillView`.
pub const FILL_VIEW_VERSION: u16 = 9;
/// The first version whose ranks take `FillView` while they run.
pub const EARLY_FILL_VERSION: u16 = 11;
/// The oldest protocol version this build accepts. Version 4 changed the
/// layout of `Parked`, so a version 3 peer is refused by name rather than
/// misread. A version 4 peer is read, and answered, in its own layouts
/// (`v4.rs`): a server answers every client at the client's version
/// ([`negotiated`]).
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// Length of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest accepted payload (16 MiB). Checked before allocating.
pub const MAX_PAYLOAD: u32 = 16 << 20;
