//! Format 1's chunk layout, one file per chunk, still written on request
//! (`ChunkLayout::Loose`) so that `cryo bench store` can set its metadata
//! costs beside the packs' in the same run.
//!
//! Each new chunk goes to a temp file with no fsync; [`LooseBatch::publish`]
//! makes the whole batch durable with one `syncfs(2)`, renames every temp
//! file to its final name and fsyncs the fan-out directories. A final chunk
//! name therefore always means durable bytes.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::format::chunk::ChunkHash;
use crate::store::durable::Durable;
use crate::store::fs::{IoStep, IoStepError, StoreFs};
use crate::store::JobStore;

/// One rank writer's unsynced chunk files.
#[derive(Debug)]
pub(crate) struct LooseBatch {
    /// The chunks directory, opened before the first unsynced write so that
    /// `syncfs` on it reports any writeback error of the batch.
    anchor: OnceLock<File>,
    temps: Mutex<StagedFiles>,
    dirty: Mutex<[bool; 256]>,
}

impl LooseBatch {
    pub(crate) fn new(fs: Arc<dyn StoreFs>) -> LooseBatch {
        LooseBatch {
            anchor: OnceLock::new(),
            temps: Mutex::new(StagedFiles {
                fs,
                files: Vec::new(),
            }),
            dirty: Mutex::new([false; 256]),
        }
    }

    /// Writes chunk `hash` to a temp file next to its final name.
    pub(crate) fn write(
        &self,
        job: &JobStore,
        hash: &ChunkHash,
        parts: &[&[u8]],
    ) -> Result<(), IoStepError> {
        let path = job.chunk_path(hash);
        self.anchor(job)?;
        let temp = job.fs.write_temp_unsynced(&path, parts)?;
        self.temps
            .lock()
            .map_err(|_| IoStepError::panicked("publish", job.chunks_dir()))?
            .files
            .push((temp, path));
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty[usize::from(hash.0[0])] = true;
        }
        Ok(())
    }

    fn anchor(&self, job: &JobStore) -> Result<&File, IoStepError> {
        if let Some(file) = self.anchor.get() {
            return Ok(file);
        }
        let dir = job.chunks_dir();
        let file = job.fs.open_dir(&dir).step("open directory", &dir)?;
        Ok(self.anchor.get_or_init(|| file))
    }

    /// Makes every chunk of the batch durable, gives each its final name
    /// and syncs the fan-out directories that changed.
    pub(crate) fn publish(&self, job: &JobStore) -> Result<(), IoStepError> {
        let temps = std::mem::take(
            &mut self
                .temps
                .lock()
                .map_err(|_| IoStepError::panicked("publish", job.chunks_dir()))?
                .files,
        );
        if temps.is_empty() {
            return Ok(());
        }
        let fs = &*job.fs;
        let chunks_dir = job.chunks_dir();
        let published = self
            .anchor(job)
            .and_then(|anchor| {
                fs.sync_filesystem(anchor, &chunks_dir)
                    .step("syncfs", &chunks_dir)
            })
            .and_then(|()| {
                temps
                    .par_iter()
                    .try_for_each(|(temp, path)| fs.publish_replace(temp, path))
            });
        if published.is_err() {
            for (temp, _) in &temps {
                let _ = fs.remove_file(temp);
            }
            return published;
        }
        let dirty = self.dirty.lock().map(|d| *d).unwrap_or([true; 256]);
        (0..256usize)
            .filter(|i| dirty[*i])
            .map(|i| chunks_dir.join(format!("{i:02x}")))
            .collect::<Vec<_>>()
            .par_iter()
            .try_for_each(|dir| fs.sync_dir(dir))
    }
}

impl JobStore {
    /// Creates the 256 format 1 chunk fan-outs, for a loose-layout writer.
    pub(crate) fn ensure_loose_layout(&self) -> Result<(), IoStepError> {
        if self.fs.is_dir(&self.chunks_dir().join("ff")) {
            return Ok(());
        }
        for byte in 0..=255u8 {
            self.fs
                .create_dir_all(&self.chunks_dir().join(format!("{byte:02x}")))?;
        }
        self.fs.sync_dir(&self.chunks_dir())?;
        self.fs.sync_dir(&self.dir)
    }
}

/// Unsynced temp files and the names they get once durable. Dropped before
/// they are published (a failed epoch), it removes them; GC would too, but
/// only once it runs.
#[derive(Debug)]
struct StagedFiles {
    fs: Arc<dyn StoreFs>,
    files: Vec<(PathBuf, PathBuf)>,
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (temp, _) in self.files.drain(..) {
            let _ = self.fs.remove_file(&temp);
        }
    }
}
