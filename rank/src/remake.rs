//! Making a saved file again where a restart does not find it (it was on
//! a filesystem of the node the rank ran on): the files a rank held open
//! whose contents were saved (`files.rs`), and those saved whole by path
//! (`NodeFileContents`: written and closed, or mapped with no fd saving
//! them), before fds, mappings and the settle of closed files
//! (`closed_files/settle.rs`) come back; and the modes of the directories
//! of the node a restart makes again.
//!
//! Several ranks of one node may hold one file (a log they all append to,
//! a table they all map), and several of them may land on one node again:
//! each writes its copy to a file of its own beside the path and links it
//! to the path only if nothing is there yet, so a file appears whole or not
//! at all. A rank that finds the file there and wrote it puts its saved
//! bytes back into it in place, where they are not there already
//! ([`put_back`]): a longer copy of a log several ranks append to (ranks
//! park at slightly different moments), or another node's file that a
//! restart placing the ranks otherwise finds at that path. A restart killed
//! halfway leaves no file the next one takes as the rank's: one made again
//! appears whole or not at all, and one put back is checked again.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use cryo_core::format::chunk::ChunkHash;
use cryo_core::format::manifest::{RankRecord, RegionKind, RegionRecord};
use cryo_core::format::process::NodeDir;
use cryo_core::store::reader::StreamError;
use cryo_core::store::JobStore;

use crate::error::RestoreError;
use crate::files::FilePolicy;

/// Makes again each file whose contents the checkpoint saved whole from a
/// filesystem of the node, where it is missing; and, under
/// [`FilePolicy::Truncate`], puts the saved bytes back into one the rank
/// wrote that is there but does not hold them ([`put_back`]). Returns
/// their paths.
pub(crate) fn remake_node_files(
    record: &RankRecord,
    store: &JobStore,
    policy: FilePolicy,
) -> Result<Vec<String>, RestoreError> {
    let rank = record.rank;
    let mut made = Vec::new();
    for region in &record.regions {
        let RegionKind::NodeFileContents { path } = &region.kind else {
            continue;
        };
        let written = policy == FilePolicy::Truncate && written_here(record, path);
        let wrote = match fs::symlink_metadata(path) {
            // Another rank of this node may make it first, from a shorter
            // copy (ranks park at slightly different moments).
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                whole(record, path, region, store)?
                    || (written && put_back(rank, path, region, store)?)
            }
            Ok(_) if written => put_back(rank, path, region, store)?,
            Ok(_) => continue,
            Err(source) => return Err(failed(rank, path, "stat", source)),
        };
        if wrote {
            tracing::info!(rank, path = %path, len = region.len, "file.remade");
            made.push(path.clone());
        }
    }
    Ok(made)
}

/// Whether the rank wrote the file at `path`, on a filesystem of its node
/// (an input it only read or mapped is the user's, never written over).
fn written_here(record: &RankRecord, path: &str) -> bool {
    (record.process.saved_file(path)).is_some_and(|file| file.on_node && file.written)
}

/// Puts the bytes `region` saved of a file the rank wrote into the file
/// that is at `path`, in place: other ranks of this node may hold it open
/// or mapped already, and must go on sharing it with this one.
/// * One that starts with them is the rank's own, maybe grown since (the
///   settle of closed files cuts it back): left, each whole chunk checked
///   by its hash without reading the store.
/// * A shorter copy (another rank of this node parked earlier): the saved
///   bytes past its end are added.
/// * Any other (another node's file at that path, after a restart that
///   placed the ranks otherwise; one rewritten since): the saved bytes
///   from the first that differs, and the cut to their length.
///
/// One it cannot open for writing is left as it is, and the settle says
/// whether it could be cut back. Returns whether it wrote.
fn put_back(
    rank: u32,
    path: &str,
    region: &RegionRecord,
    store: &JobStore,
) -> Result<bool, RestoreError> {
    let file = match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(err) => {
            tracing::warn!(rank, path = %path, error = %err, "file.not_writable");
            return Ok(false);
        }
    };
    let io = |step| move |source| failed(rank, path, step, source);
    let len = file.metadata().map_err(io("stat"))?.len();
    if len >= region.len && starts_with_chunks(&file, region).map_err(io("read"))? {
        return Ok(false);
    }
    let mut differs = false;
    let mut there = Vec::new();
    let mut reconcile = |offset: u64, saved: &[u8]| -> io::Result<()> {
        let mut from = 0;
        if !differs {
            let read = read_up_to(&file, offset, saved.len(), &mut there)?;
            if there[..read] == saved[..read] {
                from = read;
            } else {
                differs = true;
            }
        }
        file.write_all_at(&saved[from..], offset + from as u64)
    };
    crate::restore_threads::restore(|| store.stream_region(region, 16 << 20, &mut reconcile))
        .map_err(|err| match err {
            StreamError::Read(source) => RestoreError::Contents {
                rank,
                what: format!("the saved contents of {path}"),
                source,
            },
            StreamError::Sink(source) => failed(rank, path, "write its contents", source),
        })?;
    if differs {
        file.set_len(region.len).map_err(io("cut it"))?;
    }
    Ok(true)
}

/// Whether `file` starts with the bytes `region` saved, each chunk checked
/// by its hash.
fn starts_with_chunks(file: &fs::File, region: &RegionRecord) -> io::Result<bool> {
    let mut bytes = Vec::new();
    for chunk in &region.chunks {
        bytes.resize(usize::try_from(chunk.len).unwrap_or(usize::MAX), 0);
        file.read_exact_at(&mut bytes, chunk.offset)?;
        if ChunkHash::of(&bytes) != chunk.hash {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads up to `len` bytes of `file` at `offset` into `into`; fewer at its
/// end. Returns how many.
fn read_up_to(file: &fs::File, offset: u64, len: usize, into: &mut Vec<u8>) -> io::Result<usize> {
    into.resize(len, 0);
    let mut read = 0;
    while read < len {
        match file.read_at(&mut into[read..], offset + read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(read)
}

/// Writes the file at `path` from `region`, with its directories and the
/// mode `record` gives it (a new file's, 0666 less the umask, when it gives
/// none), beside the path first and linked to it only if nothing is there
/// yet; false when another rank made it first.
pub(crate) fn whole(
    record: &RankRecord,
    path: &str,
    region: &RegionRecord,
    store: &JobStore,
) -> Result<bool, RestoreError> {
    let rank = record.rank;
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
    let mode = record.process.mode_of(path);
    let written = fill(rank, path, region, store, &file)
        .and_then(|()| match mode {
            // Set on the open file: a mode without write bits does not
            // stop this write, and the umask does not apply.
            Some(mode) => file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|err| failed(rank, path, "set its mode", err)),
            None => Ok(()),
        })
        .and_then(|()| match fs::hard_link(&temp, target) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // A filesystem without hard links: the last rank's copy stands.
            Err(_) => fs::rename(&temp, target)
                .map(|()| true)
                .map_err(|err| failed(rank, path, "move it into place", err)),
        });
    let _ = fs::remove_file(&temp);
    written
}

/// The directories of the node (`ProcessAttrs::node_dirs`) that are
/// missing here, deepest first. One that cannot be looked at is left to the
/// fd or working directory that names it, whose restore says why.
pub(crate) fn missing_dirs(record: &RankRecord) -> Vec<&NodeDir> {
    let mut missing: Vec<&NodeDir> = (record.process.node_dirs.iter())
        .filter(|dir| {
            fs::symlink_metadata(&dir.path).is_err_and(|err| err.kind() == io::ErrorKind::NotFound)
        })
        .collect();
    missing.sort_by_key(|dir| std::cmp::Reverse(dir.path.len()));
    missing
}

/// Gives each directory of the node the restart made again (`made`, from
/// [`missing_dirs`]) the mode it had, once what lies under it is made (a
/// mode without write permission would have stopped that): until now the
/// umask shaped it.
pub(crate) fn directory_modes(rank: u32, made: &[&NodeDir]) -> Result<(), RestoreError> {
    for dir in made {
        let Some(mode) = dir.mode else { continue };
        match fs::set_permissions(&dir.path, fs::Permissions::from_mode(mode)) {
            Ok(()) => tracing::debug!(rank, path = %dir.path, mode, "restart.dir_mode"),
            // Not made after all: the fd or working directory that named it
            // was refused, and said so.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(failed(rank, &dir.path, "set its mode", source)),
        }
    }
    Ok(())
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
            what: format!("the saved contents of {path}"),
            source,
        },
        StreamError::Sink(source) => failed(rank, path, "write its contents", source),
    })
}

fn failed(rank: u32, path: &str, step: &'static str, source: io::Error) -> RestoreError {
    RestoreError::RemakeIo {
        rank,
        path: path.to_owned(),
        step,
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use cryo_core::format::fds::closed_contents_region_name;
    use cryo_core::format::limits::MIN_CHUNK_SIZE;
    use cryo_core::format::process::{ProcessAttrs, SavedFile};

    use super::*;

    #[test]
    fn a_missing_closed_file_is_made_again_whole_and_once() {
        let root = tempfile::tempdir().unwrap();
        let job = cryo_core::Store::create(root.path().join("store"))
            .unwrap()
            .job("closed")
            .unwrap();
        let path = root.path().join("scratch/run/steps.log");
        let contents: Vec<u8> = (0..3 * MIN_CHUNK_SIZE + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let kind = RegionKind::NodeFileContents {
            path: path.to_str().unwrap().into(),
        };
        let region = crate::test_support::store_small_chunks(
            &job,
            0,
            &closed_contents_region_name(0),
            kind,
            &contents,
        );
        // Read-only: the mode is set on the open file, which is written.
        let process = ProcessAttrs {
            saved_files: vec![SavedFile {
                path: path.to_str().unwrap().into(),
                mode: Some(0o444),
                on_node: true,
                written: true,
                dev: 0,
                ino: 0,
            }],
            ..ProcessAttrs::default()
        };
        let rank = |rank: u32| RankRecord {
            regions: vec![region.clone()],
            process: process.clone(),
            ..RankRecord::new(rank, "n", 1)
        };
        // Missing (another node): made with its directories, whole.
        let made = remake_node_files(&rank(0), &job, FilePolicy::Truncate).unwrap();
        assert_eq!(made, [path.to_str().unwrap()]);
        assert!(fs::read(&path).unwrap() == contents, "contents differ");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o444);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        // A second rank of the node finds it there, grown since, and leaves
        // it to the settle; nothing is left beside it.
        let grown = [&contents[..], b"grown since\n"].concat();
        fs::write(&path, &grown).unwrap();
        assert!(remake_node_files(&rank(1), &job, FilePolicy::Truncate)
            .unwrap()
            .is_empty());
        assert!(
            fs::read(&path).unwrap() == grown,
            "a grown file was changed"
        );
        let beside: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(beside.len(), 1, "{beside:?}");

        // Another node's file at that path (a restart that placed the ranks
        // otherwise), longer or shorter, or a shorter copy: the saved bytes
        // are put back in place, so an fd another rank of the node holds
        // on it already sees them.
        let other_node = b"another node's log, longer than ours ".repeat(MIN_CHUNK_SIZE / 4);
        for there in [other_node, b"other\n".to_vec(), contents[..100].to_vec()] {
            fs::write(&path, &there).unwrap();
            let held = fs::File::open(&path).unwrap();
            let made = remake_node_files(&rank(1), &job, FilePolicy::Truncate).unwrap();
            assert_eq!(made, [path.to_str().unwrap()]);
            assert!(fs::read(&path).unwrap() == contents, "not put back");
            let mut seen = Vec::new();
            std::io::Read::read_to_end(&mut &held, &mut seen).unwrap();
            assert!(seen == contents, "not in place");
        }
        // Left under `CRYO_FILE_POLICY=keep`, and when the rank only read
        // it (an input staged on the node is the user's).
        fs::write(&path, b"another node's log\n").unwrap();
        let mut reader = rank(1);
        reader.process.saved_files[0].written = false;
        assert!(remake_node_files(&rank(1), &job, FilePolicy::Keep)
            .unwrap()
            .is_empty());
        assert!(remake_node_files(&reader, &job, FilePolicy::Truncate)
            .unwrap()
            .is_empty());
        assert_eq!(fs::read(&path).unwrap(), b"another node's log\n");
        let beside: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(beside.len(), 1, "{beside:?}");
    }

    #[test]
    fn the_directories_of_the_node_made_again_get_their_modes_deepest_first() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str, mode| NodeDir {
            path: root.path().join(name).to_str().unwrap().into(),
            mode,
        };
        let mut record = RankRecord::new(0, "n", 1);
        record.process.node_dirs = vec![
            dir("run", Some(0o700)),
            dir("run/out", Some(0o750)),
            dir("run/unknown", None),
            dir("there", Some(0o700)),
        ];
        fs::create_dir(root.path().join("there")).unwrap();
        fs::set_permissions(root.path().join("there"), fs::Permissions::from_mode(0o755)).unwrap();
        let missing = missing_dirs(&record);
        let names: Vec<&str> = missing.iter().map(|d| d.path.as_str()).collect();
        let path = |name: &str| root.path().join(name).to_str().unwrap().to_owned();
        assert_eq!(names, [path("run/unknown"), path("run/out"), path("run")]);
        // A file under one is made after the working directory: the modes
        // come last, and one named but never made is passed over.
        fs::create_dir_all(root.path().join("run/out")).unwrap();
        fs::write(root.path().join("run/out/result"), b"x").unwrap();
        directory_modes(0, &missing).unwrap();
        let mode = |name: &str| {
            fs::metadata(root.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!((mode("run"), mode("run/out")), (0o700, 0o750));
        assert!(!root.path().join("run/unknown").exists());
        assert_eq!(mode("there"), 0o755, "it was there: left alone");
    }
}
