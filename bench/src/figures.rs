//! The figures of one agent benchmark configuration: what `cryo-bench agent`
//! measures and writes with `--json`, and what the suite reads back into
//! `report.json` (`sizes` and `ranks`). One type for both, so a figure the
//! driver adds reaches the report.

use serde::{Deserialize, Serialize};

/// An incremental checkpoint after the ranks changed part of their state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncrementalRun {
    /// Steps rank 0 had taken since the previous checkpoint when the
    /// incremental one was requested (each changes one 256 KiB block of the
    /// changing chunks, in turn).
    pub steps: u64,
    /// Region bytes of all ranks.
    pub bytes: u64,
    /// Of those, bytes copied (written since the previous checkpoint).
    pub copied_bytes: u64,
    /// Worst rank's pause.
    pub pause_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
}

/// One restart with a set number of restore threads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ThreadsRestart {
    /// `CRYO_RESTORE_THREADS`.
    pub threads: usize,
    /// Process start to every region restored.
    pub restart_ns: u64,
}

/// The figures of one configuration, all measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRun {
    /// Ranks on the node.
    pub procs: u32,
    /// State bytes per rank (the region; the counter adds a 4 KiB header).
    pub size: u64,
    /// The agent's copy budget.
    pub copy_budget: u64,
    /// Bytes captured per rank.
    pub rank_bytes: Vec<u64>,
    /// Each rank's job-visible pause.
    pub pause_ns: Vec<u64>,
    /// Each rank's copy time inside its pause.
    pub copy_ns: Vec<u64>,
    /// Whether each rank streamed (over the copy budget); empty in suite
    /// reports made before the suite kept it.
    #[serde(default)]
    pub streamed: Vec<bool>,
    /// Single-threaded memcpy of one rank's bytes into warm memory.
    pub memcpy_ns: u64,
    /// memcpy of all ranks' bytes (scaled from at most 1 GiB).
    pub node_memcpy_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Request to every rank resumed.
    pub resumed_ns: u64,
    /// `zstd -1 -T0` on the same bytes (from tmpfs, written beside the store).
    pub zstd_ns: Option<u64>,
    /// `zstd -d -T0` of that output (to tmpfs).
    pub zstd_d_ns: Option<u64>,
    /// Process start to every region restored.
    pub restart_ns: u64,
    /// The raw-image baseline: the same number of bytes written
    /// uncompressed to one file (as a whole-process checkpointer without
    /// compression does) and read back into fresh memory, in the same run.
    #[serde(default)]
    pub raw_image_ns: Option<u64>,
    /// The restart again with each count of restore threads
    /// (`CRYO_RESTORE_THREADS`), page cache as warm as for `restart_ns`.
    #[serde(default)]
    pub restart_by_threads: Vec<ThreadsRestart>,
    /// Agent CPU seconds during the checkpoint (0 in suite reports made
    /// before the suite kept it).
    #[serde(default)]
    pub agent_cpu_s: f64,
    /// Raw bytes checkpointed.
    pub raw_bytes: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
    /// Agent peak RSS.
    pub peak_rss_bytes: u64,
    /// The worst rank's pause in each full checkpoint (`pause_ns` is the
    /// sample with the smallest).
    #[serde(default)]
    pub pause_samples_ns: Vec<u64>,
    /// The incremental checkpoint after the ranks changed 5% of their
    /// chunks, if measured.
    #[serde(default)]
    pub incremental: Option<IncrementalRun>,
}

/// `a / b`, with `b` at least 1.
pub(crate) fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

impl AgentRun {
    /// Incremental checkpoint time over the first (full) checkpoint's.
    pub fn incremental_time_ratio(&self) -> Option<f64> {
        self.incremental
            .as_ref()
            .map(|i| ratio(i.checkpoint_ns, self.checkpoint_ns))
    }
    /// Bytes the incremental checkpoint wrote over the full one's.
    pub fn incremental_bytes_ratio(&self) -> Option<f64> {
        self.incremental
            .as_ref()
            .map(|i| ratio(i.stored_bytes, self.stored_bytes))
    }
    /// The worst rank's pause.
    pub fn worst_pause_ns(&self) -> u64 {
        self.pause_ns.iter().copied().max().unwrap_or(0)
    }
    /// The worst pause over memcpy of all ranks' bytes.
    pub fn pause_ratio(&self) -> f64 {
        ratio(self.worst_pause_ns(), self.node_memcpy_ns)
    }
    /// Checkpoint time over `zstd -1 -T0`'s.
    pub fn checkpoint_ratio(&self) -> Option<f64> {
        self.zstd_ns.map(|z| ratio(self.checkpoint_ns, z))
    }
    /// Restart time over `zstd -d -T0`'s.
    pub fn restart_ratio(&self) -> Option<f64> {
        self.zstd_d_ns.map(|z| ratio(self.restart_ns, z))
    }
    /// Agent peak RSS less the copy budget, in bytes.
    pub fn rss_over_budget(&self) -> i64 {
        i64::try_from(self.peak_rss_bytes).unwrap_or(i64::MAX)
            - i64::try_from(self.copy_budget).unwrap_or(i64::MAX)
    }
}
