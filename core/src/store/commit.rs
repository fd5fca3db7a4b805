//! Committing an epoch: each rank's part made durable, then the manifest
//! assembled from every part and published with `link(2)`, the commit point.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::durable::{Durable, Published};
use super::fs::IoStepError;
use super::meta::{encode_meta_file, LoadError};
use super::JobStore;
use crate::format::codec::CodecError;
use crate::format::header::FileKind;
use crate::format::manifest::{Manifest, ManifestError, RankRecord};

/// Commit of an epoch failed.
#[derive(Debug, Error)]
pub enum CommitError {
    /// A rank's part is missing.
    #[error("job {job:?} epoch {epoch}: rank {rank} has no durable part")]
    MissingRank {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
        /// The rank.
        rank: u32,
    },
    /// A part is unreadable or invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A part says it is another rank.
    #[error("{}: part claims rank {found}", path.display())]
    RankMismatch {
        /// The part.
        path: PathBuf,
        /// Rank inside.
        found: u32,
    },
    /// The assembled manifest is invalid.
    #[error("job {job:?} epoch {epoch}: {source}")]
    Invalid {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
        /// What is wrong.
        source: ManifestError,
    },
    /// The epoch is already committed.
    #[error("job {job:?} epoch {epoch} is already committed")]
    AlreadyCommitted {
        /// The job.
        job: String,
        /// The epoch.
        epoch: u64,
    },
    /// Encoding failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An I/O step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
}

impl JobStore {
    /// Durably writes a rank's part of a pending epoch, replacing an earlier
    /// attempt. The caller has made the part's chunks durable first.
    pub fn write_part(&self, epoch: u64, record: &RankRecord) -> Result<(), CommitError> {
        let dir = self.pending_epoch_dir(epoch);
        self.fs.create_dir_all(&dir)?;
        let file = encode_meta_file(FileKind::RankPart, record)?;
        self.fs
            .write_replace(&self.part_path(epoch, record.rank), &[&file])?;
        self.fs.sync_dir(&dir)?;
        self.fs.sync_dir(&self.pending_dir())?;
        Ok(())
    }

    /// Assembles the parts of ranks `0..world_size` into a manifest and
    /// publishes it. This is the commit point of the epoch. Holds the job
    /// lock shared so GC cannot sweep the epoch's chunks meanwhile.
    pub fn commit_epoch(
        &self,
        epoch: u64,
        world_size: u32,
        chunk_size: u32,
    ) -> Result<Manifest, CommitError> {
        let _lock = self.lock_shared()?;
        if self.fs.exists(&self.manifest_path(epoch)) {
            return Err(CommitError::AlreadyCommitted {
                job: self.name.clone(),
                epoch,
            });
        }
        let mut ranks = Vec::with_capacity(world_size as usize);
        for rank in 0..world_size {
            let path = self.part_path(epoch, rank);
            if !self.fs.exists(&path) {
                return Err(CommitError::MissingRank {
                    job: self.name.clone(),
                    epoch,
                    rank,
                });
            }
            let record = self.load_part(epoch, rank)?;
            if record.rank != rank {
                return Err(CommitError::RankMismatch {
                    path,
                    found: record.rank,
                });
            }
            ranks.push(record);
        }
        let manifest = Manifest {
            job: self.name.clone(),
            epoch,
            created_unix_ms: now_unix_ms(),
            world_size,
            chunk_size,
            ranks,
        };
        manifest
            .validate(&self.name, epoch)
            .map_err(|source| CommitError::Invalid {
                job: self.name.clone(),
                epoch,
                source,
            })?;
        let file = encode_meta_file(FileKind::Manifest, &manifest)?;
        self.fs.create_dir_all(&self.epochs_dir())?;
        match self.fs.write_new(&self.manifest_path(epoch), &[&file])? {
            Published::Created => {}
            Published::AlreadyExists => {
                return Err(CommitError::AlreadyCommitted {
                    job: self.name.clone(),
                    epoch,
                })
            }
        }
        tracing::info!(job = %self.name, epoch, ranks = world_size, "epoch.committed");
        // After the commit point: the index is a cache, and an epoch whose
        // index was not written is still whole.
        if let Err(err) = self.update_chunk_index(&manifest) {
            tracing::warn!(job = %self.name, epoch, error = %err, "chunk index not written");
        }
        // The pending parts are now redundant; losing this cleanup to a crash
        // only leaves a directory that GC removes.
        let _ = self.discard_pending(epoch);
        Ok(manifest)
    }

    /// Removes a pending epoch's parts (after commit, or to abort it).
    pub fn discard_pending(&self, epoch: u64) -> Result<(), IoStepError> {
        let dir = self.pending_epoch_dir(epoch);
        match self.fs.remove_dir_all(&dir) {
            Ok(()) => self.fs.sync_dir(&self.pending_dir()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(IoStepError::new("remove pending epoch", dir, err)),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
