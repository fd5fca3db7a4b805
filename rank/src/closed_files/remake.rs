//! At a restart: the files saved whole from a filesystem of the node the
//! rank ran on (`NodeFileContents`: written and closed, or mapped with no
//! fd saving them), made again from their saved contents where they are
//! missing (a restart on another node), before the application's mappings
//! come back and the ranks cut the files they recorded back (`settle.rs`).
//!
//! Several ranks of one node may have recorded one file (a log they all
//! append to, a table they all map), and several of them may land on one node again: each
//! writes its copy to a file of its own beside the path and links it to
//! the path only if nothing is there yet, so a file appears whole or not
//! at all, and the first rank's stands.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use cryo_core::format::manifest::{RankRecord, RegionKind, RegionRecord};
use cryo_core::store::reader::StreamError;
use cryo_core::store::JobStore;

use crate::error::RestoreError;

/// Makes again each file whose contents the checkpoint saved whole from a
/// filesystem of the node, where it is missing; returns their paths.
pub(crate) fn remake_missing(
    record: &RankRecord,
    store: &JobStore,
) -> Result<Vec<String>, RestoreError> {
    let mut made = Vec::new();
    for region in &record.regions {
        let RegionKind::NodeFileContents { path } = &region.kind else {
            continue;
        };
        match fs::symlink_metadata(path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Ok(_) => continue,
            Err(source) => return Err(failed(record.rank, path, "stat", source)),
        }
        if remake(record.rank, path, region, store)? {
            tracing::info!(rank = record.rank, path = %path, len = region.len, "closed_file.remade");
            made.push(path.clone());
        }
    }
    Ok(made)
}

/// Writes the file at `path` from `region`; false when another rank made
/// it first.
fn remake(
    rank: u32,
    path: &str,
    region: &RegionRecord,
    store: &JobStore,
) -> Result<bool, RestoreError> {
    let target = Path::new(path);
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(failed(
            rank,
            path,
            "name it",
            io::Error::other("the saved path has no directory and file name"),
        ));
    };
    fs::create_dir_all(dir).map_err(|err| failed(rank, path, "create its directory", err))?;
    let temp = dir.join(format!(
        ".{}.cryo-{}-{rank}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(&temp)
        .map_err(|err| failed(rank, path, "create a file beside it", err))?;
    let written = fill(rank, path, region, store, &file).and_then(|()| {
        match fs::hard_link(&temp, target) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // A filesystem without hard links: the last rank's copy stands.
            Err(_) => fs::rename(&temp, target)
                .map(|()| true)
                .map_err(|err| failed(rank, path, "move it into place", err)),
        }
    });
    let _ = fs::remove_file(&temp);
    written
}

fn fill(
    rank: u32,
    path: &str,
    region: &RegionRecord,
    store: &JobStore,
    file: &fs::File,
) -> Result<(), RestoreError> {
    crate::files::fill_file(store, region, file).map_err(|err| match err {
        StreamError::Read(source) => RestoreError::Contents {
            rank,
            what: format!("the contents of {path}, written and closed before the checkpoint"),
            source,
        },
        StreamError::Sink(source) => failed(rank, path, "write its contents", source),
    })
}

fn failed(rank: u32, path: &str, step: &'static str, source: io::Error) -> RestoreError {
    RestoreError::ClosedFileIo {
        rank,
        path: path.to_owned(),
        step,
        source,
    }
}
