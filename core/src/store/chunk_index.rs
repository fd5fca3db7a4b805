//! The job's chunk index: `epochs/<epoch:020>.index`, every packed chunk the
//! committed epochs stored and where it is.
//!
//! Written after each commit (the previous index plus the new epoch's
//! chunks) and rewritten by GC, which knows where every live chunk ended up.
//! An agent reads the newest one when it starts an epoch, so that a chunk
//! any committed epoch stored is never written again, at the price of one
//! file read per agent and epoch: about 60 bytes per chunk, 60 MB at 10^6
//! chunks (1 TB of state in 1 MiB chunks). A reader whose reference names
//! a pack that a repack deleted finds the chunk here without opening every
//! pack. The index is a cache: it is written after the commit point, and
//! losing it costs a chunk written twice or a slower lookup, never data.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::format::chunk::ChunkHash;
use crate::format::header::FileKind;
use crate::format::manifest::{ChunkIndex, IndexedChunk, Manifest};
use crate::format::pack::ChunkPlace;
use crate::store::commit::CommitError;
use crate::store::durable::Durable;
use crate::store::fs::IoStepError;
use crate::store::meta::{encode_meta_file, load_meta_file, LoadError};
use crate::store::JobStore;

/// Chunk → its stored length and place.
pub(crate) type ChunkMap = HashMap<ChunkHash, (u32, ChunkPlace)>;

impl JobStore {
    /// Path of the chunk index written for `epoch`.
    pub fn chunk_index_path(&self, epoch: u64) -> PathBuf {
        self.epochs_dir().join(format!("{epoch:020}.index"))
    }

    /// Epochs that have a chunk index, oldest first.
    pub fn chunk_index_epochs(&self) -> Result<Vec<u64>, IoStepError> {
        self.list_epoch_entries(&self.epochs_dir(), ".index")
    }

    /// Loads the chunk index written for `epoch`.
    pub fn load_chunk_index(&self, epoch: u64) -> Result<ChunkIndex, LoadError> {
        load_meta_file(
            &*self.fs,
            FileKind::ChunkIndex,
            &self.chunk_index_path(epoch),
        )
    }

    /// The newest readable chunk index as a map; empty if there is none.
    pub(crate) fn newest_chunk_map(&self) -> ChunkMap {
        let mut map = ChunkMap::new();
        let epochs = self.chunk_index_epochs().unwrap_or_default();
        for epoch in epochs.into_iter().rev() {
            match self.load_chunk_index(epoch) {
                Ok(index) if index.job == self.name => {
                    for chunk in index.chunks {
                        map.insert(chunk.hash, (chunk.stored_len, chunk.place));
                    }
                    return map;
                }
                Ok(_) => continue,
                Err(err) => {
                    tracing::warn!(job = %self.name, epoch, error = %err, "chunk index unreadable");
                }
            }
        }
        map
    }

    /// Writes the chunk index of just-committed `manifest`: the newest
    /// earlier index plus the manifest's packed chunks. Older indexes are
    /// removed once it is durable.
    pub(crate) fn update_chunk_index(&self, manifest: &Manifest) -> Result<(), CommitError> {
        let mut map = self.newest_chunk_map();
        for (_, _, chunk) in manifest.chunk_refs() {
            if matches!(chunk.place, ChunkPlace::Pack { .. }) {
                map.insert(chunk.hash, (chunk.stored_len, chunk.place));
            }
        }
        self.write_chunk_index(manifest.epoch, &map)
    }

    /// Writes `map` as the chunk index of `epoch` and removes every other.
    pub(crate) fn write_chunk_index(&self, epoch: u64, map: &ChunkMap) -> Result<(), CommitError> {
        let index = ChunkIndex {
            job: self.name.clone(),
            epoch,
            chunks: map
                .iter()
                .map(|(hash, (stored_len, place))| IndexedChunk {
                    hash: *hash,
                    stored_len: *stored_len,
                    place: *place,
                })
                .collect(),
        };
        let file = encode_meta_file(FileKind::ChunkIndex, &index)?;
        self.fs
            .write_replace(&self.chunk_index_path(epoch), &[&file])?;
        self.remove_chunk_indexes_except(Some(epoch));
        if let Ok(mut cached) = self.packs.recorded.lock() {
            *cached = None;
        }
        Ok(())
    }

    /// Removes every chunk index but `keep`'s (best effort: a stale index
    /// is only a cache).
    pub(crate) fn remove_chunk_indexes_except(&self, keep: Option<u64>) {
        for epoch in self.chunk_index_epochs().unwrap_or_default() {
            if Some(epoch) != keep {
                let _ = self.fs.remove_file(&self.chunk_index_path(epoch));
            }
        }
    }
}
