//! Retention and garbage collection of a job's store: committed manifests
//! beyond the newest `keep` are deleted, then every chunk no committed
//! manifest names is freed, under the job's exclusive lock, so never while
//! an epoch is being written: format 1 chunk files here, packs in
//! `repack.rs`.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::format::chunk::ChunkHash;
use crate::store::fs::{IoStep, IoStepError};
use crate::store::{JobStore, LoadError, LockError};

impl JobStore {
    /// Deletes committed manifests beyond the newest `keep` (not counting
    /// those a restart noted damaged, [`JobStore::mark_damaged`]). Chunks are freed
    /// by the next [`JobStore::gc`]. Returns the epochs removed.
    pub fn apply_retention(&self, keep: usize) -> Result<Vec<u64>, IoStepError> {
        let epochs = self.committed_epochs()?;
        let damaged = self.damaged_epochs()?;
        let keep = keep.max(1);
        // Epochs a restart found damaged are not counted among those kept:
        // the newest `keep` sound ones stay, with any damaged one newer.
        let sound: Vec<u64> = (epochs.iter().copied())
            .filter(|epoch| !damaged.contains(epoch))
            .collect();
        if sound.len() <= keep {
            return Ok(Vec::new());
        }
        let oldest_kept = sound[sound.len() - keep];
        let doomed: Vec<u64> = (epochs.iter().copied())
            .filter(|epoch| *epoch < oldest_kept)
            .collect();
        for epoch in &doomed {
            for path in [self.manifest_path(*epoch), self.damaged_path(*epoch)] {
                match self.fs.remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(IoStepError::new("remove manifest", path, err)),
                }
            }
        }
        self.fs.sync_dir(&self.epochs_dir())?;
        Ok(doomed)
    }

    /// Where the note that `epoch` failed a restart's verification lives.
    pub fn damaged_path(&self, epoch: u64) -> PathBuf {
        self.epochs_dir().join(format!("{epoch:020}.damaged"))
    }

    /// Notes that the committed `epoch` failed a restart's verification
    /// (`why`), so that retention does not count it among the epochs it
    /// keeps: a damaged newest epoch must not push out the sound ones a
    /// restart falls back to.
    pub fn mark_damaged(&self, epoch: u64, why: &str) -> Result<(), IoStepError> {
        self.fs
            .write_file(&self.damaged_path(epoch), &[why.as_bytes(), b"\n"], true)?;
        self.fs.sync_dir(&self.epochs_dir())
    }

    /// The epochs noted damaged.
    pub fn damaged_epochs(&self) -> Result<Vec<u64>, IoStepError> {
        self.list_epoch_entries(&self.epochs_dir(), ".damaged")
    }

    /// Retention then mark-and-sweep of chunks with the default repack
    /// threshold. See [`GcReport`].
    pub fn gc(&self, keep: Option<usize>) -> Result<GcReport, GcError> {
        self.gc_with(GcOptions {
            keep,
            ..GcOptions::default()
        })
    }

    /// Retention then mark-and-sweep of chunks and packs.
    pub fn gc_with(&self, options: GcOptions) -> Result<GcReport, GcError> {
        let keep = options.keep;
        let mut report = GcReport {
            job: self.name().to_owned(),
            ..GcReport::default()
        };
        // Retention and the sweep delete: never through a link out of the
        // store.
        if self.fs.exists(&self.chunks_dir()) || self.fs.exists(&self.packs_dir()) {
            self.check_layout()?;
        }
        if let Some(keep) = keep {
            report.removed_epochs = self.apply_retention(keep)?;
        }
        let _lock = match self.try_lock_exclusive() {
            Ok(lock) => lock,
            Err(LockError::Busy { .. }) => {
                report.skipped = Some("an epoch is being written; chunks were not swept".into());
                return Ok(report);
            }
            Err(LockError::Io(err)) => return Err(err.into()),
        };
        // Mark: every chunk named by a committed manifest or a pending part.
        let mut live: HashSet<ChunkHash> = HashSet::new();
        for epoch in self.committed_epochs()? {
            let manifest = self.load_manifest(epoch).map_err(GcError::Unreadable)?;
            live.extend(manifest.chunk_refs().map(|(_, _, c)| c.hash));
        }
        // No writer holds the lock, so pending epochs are abandoned: their
        // parts can never be committed by a live writer. Drop them.
        for (epoch, _) in self.partial_epochs()? {
            self.discard_pending(epoch)?;
            report.removed_partial_epochs.push(epoch);
        }
        self.sweep_loose(&live, &mut report)?;
        self.collect_packs(&live, options.repack_below, &mut report)?;
        tracing::info!(job = %self.name(), removed = report.removed_chunks, removed_packs = report.removed_packs, repacked = report.repacked_packs, freed = report.freed_bytes, "gc.done");
        Ok(report)
    }

    /// Removes every format 1 chunk file not in `live`, and stale temp files.
    fn sweep_loose(&self, live: &HashSet<ChunkHash>, report: &mut GcReport) -> Result<(), GcError> {
        let chunks_dir = self.chunks_dir();
        let fanouts = match self.fs.list_dir(&chunks_dir) {
            Ok(names) => names,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(IoStepError::new("list", chunks_dir, err).into()),
        };
        for fanout in fanouts {
            let fanout = chunks_dir.join(fanout);
            if !self.fs.is_dir(&fanout) {
                continue;
            }
            let mut changed = false;
            for name in self.fs.list_dir(&fanout).step("list", &fanout)? {
                let path = fanout.join(&name);
                let name = name.to_string_lossy();
                let remove = if name.starts_with(".tmp-") {
                    report.removed_temp_files += 1;
                    true
                } else if let Ok(hash) = name.parse::<ChunkHash>() {
                    !live.contains(&hash)
                } else {
                    false
                };
                if !remove {
                    report.live_chunks += 1;
                    continue;
                }
                let len = self.fs.stat(&path).map(|stat| stat.len).unwrap_or(0);
                self.fs.remove_file(&path).step("remove chunk", &path)?;
                if !name.starts_with(".tmp-") {
                    report.removed_chunks += 1;
                }
                report.freed_bytes += len;
                changed = true;
            }
            if changed {
                self.fs.sync_dir(&fanout)?;
            }
        }
        Ok(())
    }
}

/// What GC does beyond freeing dead chunks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcOptions {
    /// Keep only the newest `keep` committed epochs.
    pub keep: Option<usize>,
    /// Repack a pack whose live share of bytes is below this fraction:
    /// its live chunks are copied to a new pack and it is deleted. 0 never
    /// repacks; 1 repacks every pack with any dead chunk.
    pub repack_below: f64,
}

/// Default [`GcOptions::repack_below`]: a pack is repacked once more than
/// half of it is dead. restic repacks at 5% unused (little waste, much
/// copying); a checkpoint store turns over most of its data every few
/// epochs, so packs mostly die whole and are deleted without copying, and
/// copying a half-live 1 GiB pack to free the other half is a fair trade.
pub const DEFAULT_REPACK_BELOW: f64 = 0.5;

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            keep: None,
            repack_below: DEFAULT_REPACK_BELOW,
        }
    }
}

/// GC could not run.
#[derive(Debug, Error)]
pub enum GcError {
    /// A committed manifest could not be read, so what it references is
    /// unknown; no chunk is removed rather than risk removing a live one.
    #[error("refusing to sweep chunks: {0}")]
    Unreadable(LoadError),
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

/// What a GC run did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    /// The job.
    pub job: String,
    /// Epochs removed by retention.
    pub removed_epochs: Vec<u64>,
    /// Abandoned pending epochs removed.
    pub removed_partial_epochs: Vec<u64>,
    /// Chunks removed.
    pub removed_chunks: u64,
    /// Stale temp files removed.
    pub removed_temp_files: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Chunks kept.
    pub live_chunks: u64,
    /// Packs with no live chunk, deleted.
    pub removed_packs: u64,
    /// Packs below the live threshold, whose live chunks were copied to
    /// new packs before they were deleted.
    pub repacked_packs: u64,
    /// Packs written by repacking.
    pub new_packs: u64,
    /// Chunks copied by repacking.
    pub moved_chunks: u64,
    /// Packs kept.
    pub live_packs: u64,
    /// Packs whose index could not be read: kept, since what they hold is
    /// unknown.
    pub unreadable_packs: Vec<String>,
    /// Why the sweep was skipped, if it was.
    pub skipped: Option<String>,
}
