//! At a restart: cutting the files the ranks wrote and closed back to
//! their size at the checkpoint, before any rank writes again.
//!
//! Each rank sends its table's path keys and marks to all
//! ([`Peers::exchange`]). A file only one rank recorded goes back to its
//! size at that rank's checkpoint. The ranks of one checkpoint park and
//! resume at slightly different moments, so a file several ranks append
//! to goes back to the largest size right after a rank's last close
//! before the checkpoint ([`marks_to_try`]). Every rank that recorded a
//! file tries those sizes in turn and cuts the file to the first whose
//! tail still matches (two ranks that cut one file cut it to the same
//! length; a node-local file that only shares its path with another
//! node's matches its own rank's). Then all ranks wait at
//! [`Peers::barrier`], so that no rank's new output is cut away by a
//! slower one.
//!
//! The exchange also carries whether each rank's restore succeeded: one
//! that failed makes every rank fail with its number, instead of leaving
//! the others waiting in a collective it will never join.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;

use cryo_core::format::closed::{
    path_key, tail_hash, tail_start, ClosedFile, ClosedFiles, Mark, MAX_TABLE_BYTES,
};
use cryo_core::format::manifest::{RankRecord, RegionKind};
use cryo_core::store::JobStore;

use crate::error::RestoreError;

/// What the ranks of a job exchange at a restart.
pub(crate) trait Peers {
    /// Sends `words` to every rank; returns every rank's, in rank order.
    fn exchange(&mut self, words: &[u64]) -> Result<Vec<Vec<u64>>, String>;
    /// Waits until every rank has come here.
    fn barrier(&mut self) -> Result<(), String>;
}

/// A process without peers (the runtime without MPI).
pub(crate) struct Alone;

impl Peers for Alone {
    fn exchange(&mut self, words: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        Ok(vec![words.to_vec()])
    }
    fn barrier(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// This rank's table, read from the checkpoint (empty when it has none);
/// its files are noted again, for the next checkpoints.
pub(crate) fn load(record: &RankRecord, store: &JobStore) -> Result<ClosedFiles, RestoreError> {
    let rank = record.rank;
    let Some(region) = record
        .regions
        .iter()
        .find(|r| matches!(r.kind, RegionKind::ClosedFiles))
    else {
        return Ok(ClosedFiles::default());
    };
    let damaged = |why: String| RestoreError::ClosedFiles { rank, why };
    if region.len > MAX_TABLE_BYTES {
        return Err(damaged(format!(
            "its table is {} bytes, over the {MAX_TABLE_BYTES}-byte limit",
            region.len
        )));
    }
    let mut bytes = vec![0u8; usize::try_from(region.len).unwrap_or(0)];
    crate::restore_threads::restore(|| store.restore_region(region, &mut bytes)).map_err(
        |source| RestoreError::Contents {
            rank,
            what: "the table of files written and closed".into(),
            source,
        },
    )?;
    let table = ClosedFiles::decode(&bytes).map_err(|err| damaged(err.to_string()))?;
    // A restart cuts these files: none may lead out of where it was.
    if let Some(file) = table
        .files
        .iter()
        .find(|f| !cryo_core::format::manifest::is_clean_absolute_path(&f.path))
    {
        return Err(damaged(format!(
            "{:?} is not an absolute path without `..`",
            file.path
        )));
    }
    super::remember(&table);
    Ok(table)
}

/// Word 0 of a rank's words: whether its restore succeeded.
const RESTORED: u64 = 1;
/// Words per file: path key, then both marks' size and tail.
const FILE_WORDS: usize = 5;

/// Exchanges `own` (or this rank's failure) with the peers, cuts the files
/// back, and waits for every rank. Returns the paths cut back.
pub(crate) fn settle(
    rank: u32,
    own: Option<&ClosedFiles>,
    peers: &mut dyn Peers,
) -> Result<Vec<String>, RestoreError> {
    let mut words = vec![u64::from(own.is_some())];
    for file in own.map_or(&[][..], |t| &t.files[..]) {
        words.extend([
            path_key(&file.path),
            file.at_checkpoint.size,
            file.at_checkpoint.tail,
            file.at_close.size,
            file.at_close.tail,
        ]);
    }
    let exchange = |why| RestoreError::Peers { rank, why };
    let all = peers.exchange(&words).map_err(exchange)?;
    if let Some(failed) = all.iter().position(|w| w.first() != Some(&RESTORED)) {
        return Err(RestoreError::PeerFailed {
            rank,
            peer: u32::try_from(failed).unwrap_or(u32::MAX),
        });
    }
    let Some(own) = own else {
        // This rank's own error is reported by the caller.
        return Ok(Vec::new());
    };
    let recorded = recorded(&all);
    let mut cut = Vec::new();
    for file in &own.files {
        let marks = marks_to_try(file, recorded.get(&path_key(&file.path)));
        match settle_file(&file.path, &marks, &RealFiles) {
            Settled::Cut { from, to } => {
                tracing::info!(rank, path = %file.path, from, to, "restart.closed_file_cut");
                cut.push(file.path.clone());
            }
            Settled::Unchanged => {}
            // Named once, by the lowest rank that recorded it.
            Settled::Gone
                if file.at_checkpoint.size > 0
                    && first_recorder(&all, path_key(&file.path)) == usize::try_from(rank).ok() =>
            {
                cryo_core::say!(
                    "cryo: rank {rank}: {} was written and closed before the checkpoint ({} \
                     bytes) and is gone (moved or removed since): what the job wrote to it \
                     before the checkpoint is not in the file the restarted run writes there",
                    file.path,
                    file.at_checkpoint.size
                );
            }
            Settled::Gone => {}
            Settled::Changed { size } if file.appended => cryo_core::say!(
                "cryo: rank {rank}: {} was appended to and closed before the checkpoint \
                 ({} bytes), and has changed since (now {size} bytes) in a way a restart cannot \
                 undo: left as it is",
                file.path,
                file.at_checkpoint.size
            ),
            Settled::Changed { size } => tracing::info!(
                rank, path = %file.path, recorded = file.at_checkpoint.size, size,
                "restart.closed_file_changed"
            ),
            Settled::Failed(err) => cryo_core::say!(
                "cryo: rank {rank}: could not cut {} back to its size at the checkpoint ({err}); \
                 what was written to it after the checkpoint stays",
                file.path
            ),
        }
    }
    peers.barrier().map_err(exchange)?;
    Ok(cut)
}

/// The lowest rank whose table holds the path `key`.
pub(crate) fn first_recorder(all: &[Vec<u64>], key: u64) -> Option<usize> {
    all.iter().position(|words| {
        (words.get(1..).unwrap_or_default().chunks_exact(FILE_WORDS)).any(|entry| entry[0] == key)
    })
}

/// Every rank's marks after its last close, per path key, and how many
/// ranks recorded the path.
fn recorded(all: &[Vec<u64>]) -> HashMap<u64, (usize, Vec<Mark>)> {
    let mut out: HashMap<u64, (usize, Vec<Mark>)> = HashMap::new();
    for words in all {
        for entry in words.get(1..).unwrap_or_default().chunks_exact(FILE_WORDS) {
            let (ranks, marks) = out.entry(entry[0]).or_default();
            *ranks += 1;
            marks.push(Mark {
                size: entry[3],
                tail: entry[4],
            });
        }
    }
    out
}

/// The sizes to try for `file`, in order. A file only this rank recorded
/// goes back to its size at the checkpoint, which counts what the rank
/// wrote by any means before it parked. A file several ranks recorded
/// goes back to the largest size right after a rank's last close: every
/// rank closed it before parking, and lines a rank appended after it
/// resumed came later. Then the rank's own marks, for a node-local file
/// that only shares its path with other nodes' files.
pub(crate) fn marks_to_try(file: &ClosedFile, recorded: Option<&(usize, Vec<Mark>)>) -> Vec<Mark> {
    let mut out = Vec::new();
    if let Some((_, marks)) = recorded.filter(|(ranks, _)| *ranks > 1) {
        let mut marks = marks.clone();
        marks.sort_unstable_by(|a, b| b.size.cmp(&a.size).then(b.tail.cmp(&a.tail)));
        out.extend(marks);
    }
    out.extend([file.at_checkpoint, file.at_close]);
    out.dedup();
    out
}

/// What settling one file did.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Cut back.
    Cut { from: u64, to: u64 },
    /// Already at a recorded size.
    Unchanged,
    /// No file at the path.
    Gone,
    /// No recorded size fits: it shrank, or its bytes before each
    /// recorded size changed.
    Changed { size: u64 },
    /// Reading or cutting it failed.
    Failed(io::Error),
}

/// The file operations settling needs.
pub(crate) trait Files {
    /// The file's size; `None` when there is no regular file at `path`.
    fn size(&self, path: &str) -> io::Result<Option<u64>>;
    /// `len` bytes at `offset`.
    fn read_at(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Cuts the file to `len` bytes.
    fn cut(&self, path: &str, len: u64) -> io::Result<()>;
}

/// The real filesystem.
pub(crate) struct RealFiles;

impl Files for RealFiles {
    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }
    fn read_at(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        fs::File::open(path)?.read_exact_at(&mut out, offset)?;
        Ok(out)
    }
    fn cut(&self, path: &str, len: u64) -> io::Result<()> {
        fs::OpenOptions::new().write(true).open(path)?.set_len(len)
    }
}

/// Cuts the file at `path` back to the first of `marks` at which its tail
/// matches.
pub(crate) fn settle_file(path: &str, marks: &[Mark], files: &dyn Files) -> Settled {
    let now = match files.size(path) {
        Ok(Some(now)) => now,
        Ok(None) => return Settled::Gone,
        Err(err) => return Settled::Failed(err),
    };
    for mark in marks {
        if mark.size > now {
            continue;
        }
        let start = tail_start(mark.size);
        let matches = match files.read_at(path, start, mark.size - start) {
            Ok(bytes) => tail_hash(mark.size, &bytes) == mark.tail,
            Err(err) => return Settled::Failed(err),
        };
        if !matches {
            continue;
        }
        if mark.size == now {
            return Settled::Unchanged;
        }
        return match files.cut(path, mark.size) {
            Ok(()) => Settled::Cut {
                from: now,
                to: mark.size,
            },
            Err(err) => Settled::Failed(err),
        };
    }
    Settled::Changed { size: now }
}
