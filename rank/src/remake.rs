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
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use cryo_core::format::chunk::ChunkHash;
use cryo_core::format::fds::{CLOSED_CONTENTS_PREFIX, CLOSED_READ_PREFIX};
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
        // Closed at the checkpoint: noted again, so that the next
        // checkpoints save it too (it may not be closed again).
        if region.name.starts_with(CLOSED_READ_PREFIX) {
            crate::closed_files::note_node_file(path.clone(), false);
        } else if region.name.starts_with(CLOSED_CONTENTS_PREFIX) {
            crate::closed_files::note_node_file(path.clone(), true);
        }
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
/// One that does not start with them and cannot be written (another
/// user's, a read-only filesystem) fails the restart, naming it. One whose
/// mode no longer lets the rank write it (a finished output made read-only)
/// is written through the owner's write permission, lent for the time of
/// the writing. Returns whether it wrote.
fn put_back(
    rank: u32,
    path: &str,
    region: &RegionRecord,
    store: &JobStore,
) -> Result<bool, RestoreError> {
    let io = |step| move |source| failed(rank, path, step, source);
    let unwritable = |source| RestoreError::PutBack {
        rank,
        path: path.to_owned(),
        source,
    };
    {
        let file = fs::File::open(path).map_err(unwritable)?;
        let len = file.metadata().map_err(io("stat"))?.len();
        if len >= region.len && starts_with_chunks(&file, region).map_err(io("read"))? {
            return Ok(false);
        }
    }
    let (file, lent) = open_to_put_back(path).map_err(unwritable)?;
    let wrote = put_back_into(rank, path, &file, region, store);
    if let Some(mode) = lent {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io("restore its mode"))?;
    }
    wrote
}

/// Opens the file at `path` for reading and writing. One whose mode does
/// not let its owner write it, when the rank is its owner, is opened
/// through the owner's write permission, lent: the mode to put back is
/// returned with it.
fn open_to_put_back(path: &str) -> io::Result<(fs::File, Option<u32>)> {
    let open = || fs::OpenOptions::new().read(true).write(true).open(path);
    let err = match open() {
        Ok(file) => return Ok((file, None)),
        Err(err) => err,
    };
    let meta = fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    let owner = meta.uid() == nix::unistd::geteuid().as_raw();
    if err.kind() != io::ErrorKind::PermissionDenied || !owner || mode & 0o200 != 0 {
        return Err(err);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))?;
    match open() {
        Ok(file) => Ok((file, Some(mode))),
        Err(err) => {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
            Err(err)
        }
    }
}

/// Writes the bytes of `region` into `file` (see [`put_back`]) where they
/// differ from what is there.
fn put_back_into(
    rank: u32,
    path: &str,
    file: &fs::File,
    region: &RegionRecord,
    store: &JobStore,
) -> Result<bool, RestoreError> {
    let io = |step| move |source| failed(rank, path, step, source);
    let mut differs = false;
    let mut there = Vec::new();
    let mut reconcile = |offset: u64, saved: &[u8]| -> io::Result<()> {
        let mut from = 0;
        if !differs {
            let read = read_up_to(file, offset, saved.len(), &mut there)?;
            if there[..read] == saved[..read] {
                from = read;
            } else {
                differs = true;
            }
        }
        file.write_all_at(&saved[from..], offset + from as u64)
    };
    crate::restore_threads::restore(|| store.stream_region(region, 16 << 20, &mut reconcile))
        .map_err(|err| streaming_failed(rank, path, err))?;
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
    crate::files::fill_file(store, region, file).map_err(|err| streaming_failed(rank, path, err))
}

/// Writing a file from its saved contents failed: reading them, or writing.
fn streaming_failed(rank: u32, path: &str, err: StreamError<io::Error>) -> RestoreError {
    match err {
        StreamError::Read(source) => RestoreError::Contents {
            rank,
            what: format!("the saved contents of {path}"),
            source,
        },
        StreamError::Sink(source) => failed(rank, path, "write its contents", source),
    }
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

    /// A file the rank wrote whose mode no longer lets it write (a finished
    /// output made read-only) is opened through its owner's write
    /// permission, lent; one of another user is not, and fails the
    /// restart naming it. Run as another user in a child (root writes
    /// whatever the mode).
    #[test]
    fn a_read_only_file_it_owns_is_written_through_a_lent_permission() {
        if !nix::unistd::geteuid().is_root() {
            cryo_core::say!("skipped: needs root to run a child as another user");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let (own, other) = (root.path().join("own.out"), root.path().join("other.out"));
        for path in [&own, &other] {
            fs::write(path, b"there").unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(0o444)).unwrap();
        }
        let nobody = nix::unistd::Uid::from_raw(65534);
        let nogroup = nix::unistd::Gid::from_raw(65534);
        nix::unistd::chown(&own, Some(nobody), Some(nogroup)).unwrap();
        let (own, other) = (own.to_str().unwrap(), other.to_str().unwrap());
        // SAFETY: the child only makes system calls and exits with `_exit`;
        // glibc's fork handlers leave its allocator usable.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    nix::unistd::setgid(nogroup).ok()?;
                    nix::unistd::setuid(nobody).ok()?;
                    let (file, lent) = open_to_put_back(own).ok()?;
                    let mode = fs::metadata(own).ok()?.permissions().mode() & 0o7777;
                    file.write_all_at(b"saved", 0).ok()?;
                    fs::set_permissions(own, fs::Permissions::from_mode(lent?)).ok()?;
                    let refused = open_to_put_back(other).err()?;
                    let ok = lent == Some(0o444)
                        && mode == 0o644
                        && refused.kind() == io::ErrorKind::PermissionDenied;
                    Some(if ok { 0 } else { 3 })
                })()
                .unwrap_or(2);
                // SAFETY: ends the child at once, running nothing of the
                // parent's (no atexit handlers, no test harness).
                unsafe { nix::libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        assert_eq!(fs::read(own).unwrap(), b"saved");
        let mode = fs::metadata(own).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o444, "the lent permission is taken back");
        assert_eq!(fs::read(other).unwrap(), b"there");
        let err = RestoreError::PutBack {
            rank: 3,
            path: other.into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(err.to_string().starts_with(&format!(
            "rank 3: {other}, a file of its node it wrote, is here with other bytes"
        )));
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
