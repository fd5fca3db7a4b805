//! The agent's settings, and why it could not start with them.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use cryo_core::store::StoreError;
use cryo_core::token::JobToken;
use thiserror::Error;

use crate::link::LinkError;
use crate::pool::PoolError;
use crate::self_copy::SelfCopy;
use crate::snapshot::SnapshotPolicy;

/// Which epoch to restart from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFrom {
    /// The newest committed epoch.
    Latest,
    /// This epoch.
    Epoch(u64),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Unix socket for ranks and control clients.
    pub socket: PathBuf,
    /// The store root.
    pub store: PathBuf,
    /// The job.
    pub job: String,
    /// This node's name.
    pub node: String,
    /// Copy budget in bytes.
    pub copy_budget: u64,
    /// How long after start the copy budget begins to be pre-faulted, at
    /// the latest.
    pub prefault_delay: Duration,
    /// Whether it begins sooner, once every rank of the node has passed a
    /// safe point (their start is over).
    pub prefault_early: bool,
    /// When to capture ranks from copy-on-write snapshots.
    pub snapshot: SnapshotPolicy,
    /// Whether a parked rank copies its own memory into the budget.
    pub self_copy: SelfCopy,
    /// Expected number of local ranks (default: those registered).
    pub ranks: Option<u32>,
    /// Restart ranks that register from this epoch.
    pub restart_from: Option<RestartFrom>,
    /// How long to wait for every rank to reach a safe point.
    pub park_timeout: Duration,
    /// Chunk size.
    pub chunk_size: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// Size at which a new pack file is started.
    pub pack_size: u64,
    /// Threads used to copy rank memory.
    pub copy_threads: usize,
    /// Threads hashing, compressing and writing chunks.
    pub store_threads: usize,
    /// Coordinated mode: the job's coordinator, `HOST:PORT`. `None`:
    /// standalone (the agent commits epochs itself).
    pub coordinator: Option<String>,
    /// How long to keep trying to reach the coordinator at start.
    pub coordinator_wait: Duration,
    /// The job token. When set, ranks must present it (always set in
    /// coordinated mode).
    pub token: Option<JobToken>,
}

/// Default copy budget: an eighth of the node's RAM, at most half of what
/// is available and an eighth of the cgroup's limit (see [`crate::memory`]).
pub fn default_copy_budget() -> u64 {
    crate::memory::MemoryView::read().default_budget()
}

/// The agent could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The buffer pool could not be created.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The socket could not be bound.
    #[error("binding {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The socket's folder is not private to the job's user.
    #[error("the agent's socket folder: {0}")]
    SocketFolder(#[from] cryo_core::private_dir::PrivateDirError),
    /// Another agent is serving on the socket.
    #[error("another agent is already serving on {}", .0.display())]
    InUse(PathBuf),
    /// Arming the restart failed.
    #[error("cannot restart: {0}")]
    Restart(String),
    /// Thread pool creation failed.
    #[error("creating copy threads: {0}")]
    Threads(String),
    /// Coordinated mode without a job token.
    #[error("coordinated mode needs the job token: pass --token-file or set CRYO_TOKEN")]
    NoToken,
    /// The coordinator could not be reached or refused this agent.
    #[error(transparent)]
    Coordinator(#[from] LinkError),
}
