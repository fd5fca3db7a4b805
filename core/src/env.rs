//! Every `CRYO_*` environment variable, named once. Where a command-line
//! option reads one (clap's `env = "…"` needs a literal), the literal is the
//! value of the constant here.
//!
//! Rank runtime (read by `cryo_init`):

/// Path of the node agent's Unix socket (set by the agent's launcher).
pub const ENV_AGENT_SOCKET: &str = "CRYO_AGENT_SOCKET";
/// The job name.
pub const ENV_JOB: &str = "CRYO_JOB";
/// The rank (falls back to `PMI_RANK`, `OMPI_COMM_WORLD_RANK`,
/// `PMIX_RANK`, `SLURM_PROCID`).
pub const ENV_RANK: &str = "CRYO_RANK";
/// The job token.
pub const ENV_TOKEN: &str = "CRYO_TOKEN";
/// Base address of the region reservation.
pub const ENV_REGION_BASE: &str = "CRYO_REGION_BASE";
/// Size of the region reservation.
pub const ENV_REGION_RESERVE: &str = "CRYO_REGION_RESERVE";
/// `truncate` (default) or `keep`: whether a restart sets files opened for
/// writing back to their state at the checkpoint.
pub const ENV_FILE_POLICY: &str = "CRYO_FILE_POLICY";
/// `auto` (default), `on` or `off`: whether a rank tracks writes to its
/// regions (see [`crate::dirty`]).
pub const ENV_DIRTY_TRACKING: &str = "CRYO_DIRTY_TRACKING";
/// Most bytes of unlinked files a rank saves per checkpoint (default 1 GiB);
/// beyond it the rank refuses the epoch.
pub const ENV_UNLINKED_CAP: &str = "CRYO_UNLINKED_CAP";
/// Most bytes of files open for writing in place a rank saves per
/// checkpoint (default 1 GiB); beyond it they are named in a warning.
pub const ENV_WRITABLE_CAP: &str = "CRYO_WRITABLE_CAP";
/// Where a restart recreates an unlinked file whose old directory is gone
/// (then `TMPDIR`, then `/tmp`).
pub const ENV_SCRATCH: &str = "CRYO_SCRATCH";
/// The lowest fd number the application's files get once the runtime is
/// connected (default 64; see `rank/src/floor.rs`).
pub const ENV_FD_FLOOR: &str = "CRYO_FD_FLOOR";
/// Slack of the MPI quiesce agreement, in safe points.
pub const ENV_QUIESCE_SLACK: &str = "CRYO_QUIESCE_SLACK";
/// Threads a restarting rank decodes its regions with (default: one per
/// core; see `rank/src/restore_threads.rs`).
pub const ENV_RESTORE_THREADS: &str = "CRYO_RESTORE_THREADS";
/// `0` turns off a restarting rank's prefetch of its chunks while it
/// starts (see `rank/src/prefetch.rs`); on by default.
pub const ENV_PREFETCH: &str = "CRYO_PREFETCH";
/// The libcryo_rank the Python package loads: the library, or the folder
/// holding the flavour of mpi4py's MPI (read by `python/cryo/_lib.py`).
pub const ENV_RANK_LIB: &str = "CRYO_RANK_LIB";

// Commands (`cryo`, `cryo-agent`) and the Slurm plugin:

/// The store (`--store`).
pub const ENV_STORE: &str = "CRYO_STORE";
/// Log filter for the lifecycle events (`info`, `debug`, …).
pub const ENV_LOG: &str = "CRYO_LOG";
/// Seconds between periodic checkpoints (`--interval`).
pub const ENV_INTERVAL: &str = "CRYO_INTERVAL";
/// Committed epochs to keep (`--keep`).
pub const ENV_KEEP: &str = "CRYO_KEEP";
/// The agent's copy budget (`--copy-budget`).
pub const ENV_COPY_BUDGET: &str = "CRYO_COPY_BUDGET";
/// Seconds after an agent's start before it pre-faults its copy budget, at
/// the latest.
pub const ENV_PREFAULT_DELAY: &str = "CRYO_PREFAULT_DELAY";
/// Whether an agent pre-faults sooner, once its ranks' start is over
/// (`cryo-agent --prefault-early`, on or off).
pub const ENV_PREFAULT_EARLY: &str = "CRYO_PREFAULT_EARLY";
/// Chunk size (`--chunk-size`).
pub const ENV_CHUNK_SIZE: &str = "CRYO_CHUNK_SIZE";
/// Size at which an agent starts a new pack (`cryo-agent --pack-size`).
pub const ENV_PACK_SIZE: &str = "CRYO_PACK_SIZE";
/// The agents' zstd level for chunks (`cryo-agent --zstd-level`; 0 stores
/// them uncompressed, negative levels are zstd's fast ones).
pub const ENV_ZSTD_LEVEL: &str = "CRYO_ZSTD_LEVEL";
/// When an agent captures a rank from a copy-on-write snapshot of it
/// (`auto`, `on`, `off`; the agent's `--snapshot`).
pub const ENV_SNAPSHOT: &str = "CRYO_SNAPSHOT";
/// Whether a parked rank copies its own memory into its agent's budget
/// (`on`, `off`; the agent's `--self-copy`).
pub const ENV_SELF_COPY: &str = "CRYO_SELF_COPY";
/// How long a rank may take to park (`--park-timeout`).
pub const ENV_PARK_TIMEOUT: &str = "CRYO_PARK_TIMEOUT";
/// More variables `cryo run` has Open MPI carry to other hosts,
/// comma-separated (`coordinator/src/export.rs`).
pub const ENV_EXPORT: &str = "CRYO_EXPORT";
/// The agent's node name (`cryo-agent --node`).
pub const ENV_NODE: &str = "CRYO_NODE";
/// The coordinator's address, for agents (`cryo-agent --coordinator`).
pub const ENV_COORDINATOR: &str = "CRYO_COORDINATOR";
/// The epoch an agent restarts its ranks from (`--restart-from`).
pub const ENV_RESTART_FROM: &str = "CRYO_RESTART_FROM";
/// The `cryo-agent` binary `cryo run` starts (`--agent`).
pub const ENV_AGENT_BIN: &str = "CRYO_AGENT_BIN";
/// Who starts the agents of a Slurm step (`plugin`, `srun`, `external`), so
/// that the plugin does not start a second one.
pub const ENV_AGENT_STARTER: &str = "CRYO_AGENT_STARTER";
/// Set by the Slurm plugin in the job's environment: the plugin is active.
pub const ENV_SPANK: &str = "CRYO_SPANK";
/// Fault injection for tests (see [`crate::fault`]).
pub const ENV_FAULT: &str = "CRYO_FAULT";
/// Seconds after which a silent coordinator-agent link counts as dead
/// (`cryo_core::liveness`; default 30).
pub const ENV_LINK_TIMEOUT: &str = "CRYO_LINK_TIMEOUT";
