//! What `cryo ls` shows of an epoch: its sizes, deduplication and
//! compression, computed from its manifest.

use std::collections::HashMap;

use super::meta::LoadError;
use super::JobStore;
use crate::format::chunk::ChunkHash;
use crate::format::manifest::Manifest;

impl JobStore {
    /// Per-epoch sizes for listing; reads the manifest.
    pub fn summarize(&self, epoch: u64) -> Result<EpochSummary, LoadError> {
        let manifest = self.load_manifest(epoch)?;
        Ok(EpochSummary::of(&manifest))
    }
}

/// Sizes of one committed epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: u64,
    /// Commit time.
    pub created_unix_ms: u64,
    /// Ranks.
    pub ranks: u32,
    /// Logical bytes of all regions of all ranks.
    pub logical_bytes: u64,
    /// Raw bytes of the distinct chunks referenced.
    pub unique_raw_bytes: u64,
    /// Stored bytes of the distinct chunks referenced.
    pub unique_stored_bytes: u64,
    /// Stored bytes newly written by this epoch.
    pub new_stored_bytes: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
}

impl EpochSummary {
    /// Computes the summary of a manifest.
    pub fn of(manifest: &Manifest) -> EpochSummary {
        let mut unique: HashMap<ChunkHash, (u64, u64)> = HashMap::new();
        let mut logical = 0u64;
        for (_, _, chunk) in manifest.chunk_refs() {
            logical += u64::from(chunk.len);
            unique
                .entry(chunk.hash)
                .or_insert((u64::from(chunk.len), u64::from(chunk.stored_len)));
        }
        let stats = manifest.stats();
        EpochSummary {
            epoch: manifest.epoch,
            created_unix_ms: manifest.created_unix_ms,
            ranks: manifest.world_size,
            logical_bytes: logical,
            unique_raw_bytes: unique.values().map(|v| v.0).sum(),
            unique_stored_bytes: unique.values().map(|v| v.1).sum(),
            new_stored_bytes: stats.new_stored_bytes,
            unique_chunks: unique.len() as u64,
        }
    }

    /// Raw over stored bytes of the distinct chunks.
    pub fn compression_ratio(&self) -> f64 {
        if self.unique_stored_bytes == 0 {
            return 1.0;
        }
        self.unique_raw_bytes as f64 / self.unique_stored_bytes as f64
    }

    /// Fraction of logical bytes saved by deduplication within the epoch.
    pub fn dedup_savings(&self) -> f64 {
        if self.logical_bytes == 0 {
            return 0.0;
        }
        1.0 - self.unique_raw_bytes as f64 / self.logical_bytes as f64
    }
}
