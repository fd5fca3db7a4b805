//! The agent's settings.

use std::path::PathBuf;
use std::time::Duration;

use cryo_core::token::JobToken;

use crate::procfs::mem_total_bytes;

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

/// Default copy budget: an eighth of the node's RAM.
pub fn default_copy_budget() -> u64 {
    mem_total_bytes().map_or(1 << 30, |total| total / 8)
}
