//! GC of packs: a pack no committed epoch references is deleted; a pack
//! whose live share is under the threshold is repacked.
//!
//! Repacking copies the live chunks of the packs it empties into new packs,
//! as stored (no decoding), after checking each one's stored checksum. The
//! new packs are sealed, synced and their directories fsynced before any old
//! pack is deleted, so a crash at any point leaves every live chunk in at
//! least one pack. References that name a deleted pack are resolved through
//! the chunk index, which GC rewrites from what it read and copied, without
//! reading the packs again. A pack whose index cannot be read is kept
//! and reported: what it holds is unknown.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use crate::format::chunk::{check_stored, ChunkHash};
use crate::format::pack::{ChunkPlace, IndexEntry, PackId, DEFAULT_PACK_SIZE, ENTRY_HEADER_LEN};
use crate::store::chunk_index::ChunkMap;
use crate::store::gc::{GcError, GcReport};
use crate::store::pack_read::{BlobError, PackIndex, PackReadError};
use crate::store::packs::PackSet;
use crate::store::JobStore;

/// One pack as GC sees it.
struct PackUse {
    id: PackId,
    index: PackIndex,
    live_bytes: u64,
    total_bytes: u64,
}

impl JobStore {
    /// Deletes dead packs and repacks those whose live share of bytes is
    /// below `repack_below`. Runs under the job's exclusive lock.
    pub(crate) fn collect_packs(
        &self,
        live: &HashSet<ChunkHash>,
        repack_below: f64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut uses = Vec::new();
        for id in self.list_packs()? {
            let index = match self.pack_index(&id) {
                Ok(index) => index,
                Err(PackReadError::Missing(_)) => continue,
                Err(PackReadError::Io(err)) => return Err(err.into()),
                Err(err) => {
                    report.unreadable_packs.push(err.to_string());
                    continue;
                }
            };
            let size = |e: &IndexEntry| ENTRY_HEADER_LEN as u64 + u64::from(e.blob_len);
            let total_bytes = index.entries.iter().map(size).sum();
            let live_bytes = index
                .entries
                .iter()
                .filter(|e| live.contains(&e.hash))
                .map(size)
                .sum();
            uses.push(PackUse {
                id,
                index,
                live_bytes,
                total_bytes,
            });
        }
        let keeps = |u: &PackUse| {
            u.live_bytes > 0 && (u.live_bytes as f64) >= repack_below * u.total_bytes as f64
        };
        // Live chunks that stay where they are need no copy.
        let mut placed: HashSet<ChunkHash> = HashSet::new();
        for u in uses.iter().filter(|u| keeps(u)) {
            report.live_packs += 1;
            for entry in &u.index.entries {
                if live.contains(&entry.hash) && placed.insert(entry.hash) {
                    report.live_chunks += 1;
                }
            }
        }
        let mut doomed: Vec<PackId> = Vec::new();
        let mut to_move: Vec<(PackId, IndexEntry)> = Vec::new();
        for u in uses.iter().filter(|u| !keeps(u)) {
            let before = to_move.len();
            for entry in &u.index.entries {
                if live.contains(&entry.hash) && placed.insert(entry.hash) {
                    to_move.push((u.id, *entry));
                }
            }
            // A pack whose live chunks all have a copy elsewhere (a repack
            // interrupted before its deletions) is simply removed.
            if to_move.len() > before {
                report.repacked_packs += 1;
            } else {
                report.removed_packs += 1;
            }
            doomed.push(u.id);
        }
        let mut index = ChunkMap::new();
        if !to_move.is_empty() {
            let kept = self.copy_live(&to_move, report, &mut index)?;
            doomed.retain(|id| !kept.contains(id));
        }
        // Where every live chunk now is: the copies, and the packs that stay.
        let gone: HashSet<PackId> = doomed.iter().copied().collect();
        for u in uses.iter().filter(|u| !gone.contains(&u.id)) {
            for entry in u.index.entries.iter().filter(|e| live.contains(&e.hash)) {
                let place = ChunkPlace::Pack {
                    pack: u.id,
                    offset: entry.offset,
                };
                index.entry(entry.hash).or_insert((entry.blob_len, place));
            }
        }
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        for id in &doomed {
            let path = self.pack_path(id);
            let len = self.fs.stat(&path).map(|stat| stat.len).unwrap_or(0);
            match self.fs.remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(crate::store::fs::IoStepError::new("remove pack", path, err).into())
                }
            }
            report.freed_bytes += len;
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_owned());
            }
        }
        for dir in dirs {
            self.fs.sync_dir(&dir)?;
        }
        self.packs.forget();
        self.rewrite_chunk_index(&index)
    }

    /// Writes `map`, every live chunk where it now is, as the chunk index
    /// of the newest committed epoch.
    fn rewrite_chunk_index(&self, map: &ChunkMap) -> Result<(), GcError> {
        let Some(latest) = self.latest_committed()? else {
            self.remove_chunk_indexes_except(None);
            return Ok(());
        };
        if let Err(err) = self.write_chunk_index(latest, map) {
            tracing::warn!(job = %self.name(), epoch = latest, error = %err, "chunk index not rewritten");
        }
        Ok(())
    }

    /// Copies chunks into new packs, records their new places in `index`
    /// and makes the packs durable. Returns the packs that must be kept
    /// because a chunk of theirs could not be copied (damaged or
    /// unreadable).
    fn copy_live(
        &self,
        to_move: &[(PackId, IndexEntry)],
        report: &mut GcReport,
        index: &mut ChunkMap,
    ) -> Result<HashSet<PackId>, GcError> {
        let set = PackSet::new(self, DEFAULT_PACK_SIZE);
        let mut kept = HashSet::new();
        let mut buf = Vec::new();
        for (id, entry) in to_move {
            let read = self.read_entry(id, entry.offset, &entry.hash, entry.blob_len, &mut buf);
            let problem = match read {
                Ok(_) => check_stored(&buf[ENTRY_HEADER_LEN..], u64::from(entry.raw_len))
                    .err()
                    .map(|err| err.to_string()),
                Err(BlobError::Io(err)) => return Err(err.into()),
                Err(BlobError::Missing(path)) => Some(format!("{} vanished", path.display())),
                Err(BlobError::Bad { source, .. }) => Some(source.to_string()),
            };
            if let Some(problem) = problem {
                report.unreadable_packs.push(format!(
                    "pack {id}: chunk {} at {} not copied ({problem}); the pack is kept",
                    entry.hash, entry.offset
                ));
                kept.insert(*id);
                continue;
            }
            let place = set.append(&entry.hash, entry.raw_len, &[&buf[ENTRY_HEADER_LEN..]])?;
            index.insert(entry.hash, (entry.blob_len, place));
            report.moved_chunks += 1;
            report.live_chunks += 1;
        }
        report.new_packs = set.seal()? as u64;
        set.make_durable()?;
        Ok(kept)
    }
}
