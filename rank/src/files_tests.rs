//! Unit tests of `files.rs`: restores into temporary files.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, Write};

use cryo_core::format::fds::contents_region_name;
use cryo_core::format::manifest::FdKind;

use super::*;

fn store() -> JobStore {
    let dir = tempfile::tempdir().unwrap().keep();
    cryo_core::Store::create(dir).unwrap().job("files").unwrap()
}

fn record(fds: Vec<FdRecord>) -> RankRecord {
    RankRecord {
        fds,
        ..RankRecord::new(2, "n", 1)
    }
}

fn fd_record(fd: i32, path: &str, flags: i32, offset: u64, size: u64) -> FdRecord {
    FdRecord {
        fd,
        kind: FdKind::Regular,
        path: path.into(),
        flags,
        offset,
        size_at_checkpoint: size,
        restore: FdRestore::Restore,
        shares_with: None,
    }
}

/// A record of rank 2 holding `fd`, with `contents` saved for it in
/// several chunks.
fn with_contents(job: &JobStore, fd: FdRecord, contents: &[u8]) -> RankRecord {
    let region = crate::test_support::store_small_chunks(
        job,
        2,
        &contents_region_name(fd.fd),
        RegionKind::FileContents { fd: fd.fd },
        contents,
    );
    let mut rec = record(vec![fd]);
    rec.regions.push(region);
    rec
}

#[test]
fn restores_truncates_and_seeks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    std::fs::write(&path, b"line1\nline2\nafter checkpoint\n").unwrap();
    let target = 777;
    let rec = record(vec![fd_record(
        target,
        path.to_str().unwrap(),
        libc::O_WRONLY | libc::O_APPEND,
        12,
        12,
    )]);
    let done = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
    assert_eq!(done.restored, vec![target]);
    assert_eq!(std::fs::read(&path).unwrap(), b"line1\nline2\n");
    // SAFETY: restore_files installed fd 777 for us; we own it now.
    let mut file = unsafe { std::fs::File::from_raw_fd(target) };
    file.write_all(b"line3\n").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"line1\nline2\nline3\n");
}

#[test]
fn read_only_file_keeps_its_size_and_gets_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input");
    std::fs::write(&path, b"0123456789").unwrap();
    let rec = record(vec![fd_record(
        778,
        path.to_str().unwrap(),
        libc::O_RDONLY,
        4,
        4,
    )]);
    restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
    // SAFETY: restore_files installed fd 778 for us; we own it now.
    let mut file = unsafe { std::fs::File::from_raw_fd(778) };
    assert_eq!(file.stream_position().unwrap(), 4);
    let mut rest = String::new();
    file.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "456789");
}

#[test]
fn vanished_and_shrunk_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.log");
    let rec = record(vec![fd_record(
        779,
        gone.to_str().unwrap(),
        libc::O_WRONLY,
        0,
        0,
    )]);
    let err = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("gone.log") && text.contains("rank 2") && text.contains("vanished"),
        "{text}"
    );

    let small = dir.path().join("small.log");
    std::fs::write(&small, b"abc").unwrap();
    let rec = record(vec![fd_record(
        780,
        small.to_str().unwrap(),
        libc::O_WRONLY,
        10,
        10,
    )]);
    let err = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            RestoreError::FileShrank {
                size: 3,
                offset: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn keep_policy_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    std::fs::write(&path, b"abcdef").unwrap();
    let rec = record(vec![fd_record(
        781,
        path.to_str().unwrap(),
        libc::O_WRONLY,
        3,
        3,
    )]);
    restore_files(&rec, &store(), FilePolicy::Keep, &[]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
    let _ = nix::unistd::close(781);
}

#[test]
fn a_dup_shares_the_offset_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.log");
    std::fs::write(&path, b"0123456789").unwrap();
    let mut leader = fd_record(782, path.to_str().unwrap(), libc::O_WRONLY, 4, 10);
    leader.restore = FdRestore::Restore;
    let mut dup = leader.clone();
    dup.fd = 783;
    dup.shares_with = Some(782);
    let rec = record(vec![leader, dup]);
    let done = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
    assert_eq!(done.restored, vec![782, 783]);
    // SAFETY: restore_files installed both fds for us; we own them now.
    let (mut a, mut b) = unsafe {
        (
            std::fs::File::from_raw_fd(782),
            std::fs::File::from_raw_fd(783),
        )
    };
    a.write_all(b"ab").unwrap();
    b.write_all(b"cd").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"0123abcd89");
}

#[test]
fn directories_and_dev_null_come_back_and_a_taken_fd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inside"), b"x").unwrap();
    let mut dirfd = fd_record(
        784,
        dir.path().to_str().unwrap(),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        0,
    );
    dirfd.kind = FdKind::Directory;
    let mut null = fd_record(785, "/dev/null", libc::O_WRONLY, 0, 0);
    null.kind = FdKind::CharDevice;
    restore_files(
        &record(vec![dirfd.clone(), null]),
        &store(),
        FilePolicy::Truncate,
        &[],
    )
    .unwrap();
    let inside = nix::fcntl::openat(Some(784), "inside", OFlag::O_RDONLY, Mode::empty()).unwrap();
    let _ = nix::unistd::close(inside);
    // SAFETY: restore_files installed fd 785; it stays open for this test.
    let null_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(785) };
    assert_eq!(nix::unistd::write(null_fd, b"gone").unwrap(), 4);

    // fd 785 is /dev/null now: restoring a file there is refused, and
    // nothing else of that restart is done.
    let other = dir.path().join("other");
    std::fs::write(&other, b"abc").unwrap();
    let mut fresh = fd_record(786, other.to_str().unwrap(), libc::O_RDONLY, 0, 3);
    fresh.restore = FdRestore::Restore;
    let taken = fd_record(785, other.to_str().unwrap(), libc::O_RDONLY, 0, 3);
    let err = restore_files(
        &record(vec![fresh, taken]),
        &store(),
        FilePolicy::Truncate,
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(err, RestoreError::FdTaken { fd: 785, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/dev/null"), "{err}");
    assert!(
        nix::fcntl::fcntl(786, FcntlArg::F_GETFD).is_err(),
        "fd 786 was restored"
    );

    // A directory where a file was is a clear error.
    let mut changed = fd_record(787, dir.path().to_str().unwrap(), libc::O_RDONLY, 0, 0);
    changed.kind = FdKind::Regular;
    let err =
        restore_files(&record(vec![changed]), &store(), FilePolicy::Truncate, &[]).unwrap_err();
    assert!(
        matches!(err, RestoreError::FileChanged { fd: 787, .. }),
        "{err}"
    );
    for fd in [784, 785] {
        let _ = nix::unistd::close(fd);
    }
}

#[test]
fn a_missing_file_whose_contents_were_saved_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node-local/scratch/out.log");
    let mut rec = record(vec![fd_record(
        790,
        path.to_str().unwrap(),
        libc::O_WRONLY | libc::O_APPEND,
        0,
        0,
    )]);
    rec.regions.push(RegionRecord {
        name: "cryo:file:790".into(),
        addr: 0,
        len: 0,
        kind: RegionKind::FileContents { fd: 790 },
        chunks: Vec::new(),
    });
    // Under `keep` too: a file made again must get its contents.
    let done = restore_files(&rec, &store(), FilePolicy::Keep, &[]).unwrap();
    assert_eq!(done.recreated, [path.display().to_string()]);
    assert_eq!(done.restored, [790]);
    assert!(path.is_file());
    let flags = fcntl(790, FcntlArg::F_GETFL).unwrap();
    assert_ne!(flags & libc::O_APPEND, 0, "restored with its flags");
    nix::unistd::close(790).unwrap();

    // A file that is there is opened, not made again.
    let done = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap();
    assert!(done.recreated.is_empty());
    nix::unistd::close(790).unwrap();

    // Without saved contents a missing file is still an error naming it.
    std::fs::remove_file(&path).unwrap();
    rec.regions.clear();
    let err = restore_files(&rec, &store(), FilePolicy::Truncate, &[]).unwrap_err();
    assert!(
        matches!(err, RestoreError::FileVanished { fd: 790, .. }),
        "{err}"
    );
}

/// Saved contents go back chunk by chunk at their offsets through a fresh
/// open: `pwrite` through the restored `O_APPEND` fd would append them,
/// after whatever the file holds.
#[test]
fn saved_contents_go_back_in_place_for_an_append_only_fd() {
    use cryo_core::format::limits::MIN_CHUNK_SIZE;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch/out.log");
    let job = store();
    // Five chunks, each of its own byte.
    let contents: Vec<u8> = (0..5u8)
        .flat_map(|c| std::iter::repeat_n(b'a' + c, MIN_CHUNK_SIZE))
        .collect();
    let size = contents.len() as u64;
    let fd = fd_record(
        791,
        path.to_str().unwrap(),
        libc::O_WRONLY | libc::O_APPEND,
        size,
        size,
    );
    let rec = with_contents(&job, fd, &contents);
    assert_eq!(rec.regions[0].chunks.len(), 5);
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert_eq!(done.recreated, [path.display().to_string()]);
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "contents out of place"
    );
    // The restored fd appends after them.
    // SAFETY: restore_files installed fd 791 for us; we own it now.
    let mut file = unsafe { std::fs::File::from_raw_fd(791) };
    file.write_all(b"next\n").unwrap();
    let now = std::fs::read(&path).unwrap();
    assert_eq!(now.len() as u64, size + 5);
    assert!(now.ends_with(b"eeeenext\n"));
    drop(file);

    // Still there (a restart on the same node), overwritten since: its
    // contents go back over the bytes written after the checkpoint.
    std::fs::write(&path, vec![b'z'; contents.len()]).unwrap();
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert!(done.recreated.is_empty());
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "contents not written back in place"
    );
    nix::unistd::close(791).unwrap();

    // Cut shorter than its offset since (a job script's `>`): refilled,
    // under `keep` too, where a file not saved is refused (FileShrank).
    std::fs::write(&path, b"abc").unwrap();
    let done = restore_files(&rec, &job, FilePolicy::Keep, &[]).unwrap();
    assert_eq!(done.refilled, [path.display().to_string()]);
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "a file cut short not refilled"
    );
    nix::unistd::close(791).unwrap();
}

/// An input the rank only reads, on a filesystem of its node: made again
/// from its saved contents where it is missing, refilled where it was cut
/// short, and left alone where it is there whole.
#[test]
fn a_saved_input_read_only_is_made_again_but_never_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("staged/input.mesh");
    let job = store();
    let contents: Vec<u8> = (0..3 * cryo_core::format::limits::MIN_CHUNK_SIZE + 5)
        .map(|i| (i % 253) as u8)
        .collect();
    let size = contents.len() as u64;
    let fd = fd_record(792, path.to_str().unwrap(), libc::O_RDONLY, 100, size);
    let rec = with_contents(&job, fd, &contents);
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert_eq!(done.recreated, [path.display().to_string()]);
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "input not made again whole"
    );
    // SAFETY: restore_files installed fd 792 for us; we own it now.
    let mut file = unsafe { std::fs::File::from_raw_fd(792) };
    let mut next = [0u8; 4];
    file.read_exact(&mut next).unwrap();
    assert_eq!(next, contents[100..104], "read from its offset");
    assert_eq!(
        fcntl(792, FcntlArg::F_GETFL).unwrap() & libc::O_ACCMODE,
        libc::O_RDONLY
    );
    drop(file);

    // There, as the user left it (another version of the input): not
    // written over, under `truncate` too.
    std::fs::write(&path, vec![b'v'; contents.len()]).unwrap();
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert!(done.recreated.is_empty() && done.refilled.is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), vec![b'v'; contents.len()]);
    nix::unistd::close(792).unwrap();

    // Cut shorter than the rank's offset: refilled.
    std::fs::write(&path, b"ab").unwrap();
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert_eq!(done.refilled, [path.display().to_string()]);
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "input cut short not refilled"
    );
    nix::unistd::close(792).unwrap();
}

/// A file saved under an fd open only for reading while another fd writes
/// it in place: bytes overwritten since the checkpoint are still put back.
#[test]
fn contents_saved_under_a_reading_fd_go_back_when_another_fd_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch/table.dat");
    let job = store();
    let contents: Vec<u8> = (0..2 * cryo_core::format::limits::MIN_CHUNK_SIZE + 3)
        .map(|i| (i % 241) as u8)
        .collect();
    let size = contents.len() as u64;
    let reading = fd_record(793, path.to_str().unwrap(), libc::O_RDONLY, 0, size);
    let mut rec = with_contents(&job, reading, &contents);
    rec.fds.push(fd_record(
        794,
        path.to_str().unwrap(),
        libc::O_RDWR,
        8,
        size,
    ));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![b'x'; contents.len()]).unwrap();
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert!(done.recreated.is_empty() && done.refilled.is_empty());
    assert!(
        std::fs::read(&path).unwrap() == contents,
        "bytes written in place since the checkpoint stayed"
    );
    for fd in [793, 794] {
        nix::unistd::close(fd).unwrap();
    }
}

/// A directory held open on a filesystem of the old node comes back when
/// what it holds is made again; one that holds nothing saved is still an
/// error naming it.
#[test]
fn a_missing_directory_holding_a_saved_file_is_made_again() {
    let root = tempfile::tempdir().unwrap();
    let (dir, log) = (root.path().join("run"), root.path().join("run/out.log"));
    let job = store();
    let mut rec = with_contents(
        &job,
        fd_record(
            795,
            log.to_str().unwrap(),
            libc::O_WRONLY | libc::O_APPEND,
            4,
            4,
        ),
        b"one\n",
    );
    rec.fds.push(FdRecord {
        kind: FdKind::Directory,
        ..fd_record(796, dir.to_str().unwrap(), libc::O_RDONLY, 0, 0)
    });
    let done = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap();
    assert!(
        done.recreated.contains(&dir.display().to_string()),
        "{done:?}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), b"one\n");
    let meta = nix::sys::stat::fstat(796).unwrap();
    assert_eq!(meta.st_mode & libc::S_IFMT, libc::S_IFDIR);
    for fd in [795, 796] {
        nix::unistd::close(fd).unwrap();
    }

    // Nothing saved under it: the restart names it.
    std::fs::remove_dir_all(&dir).unwrap();
    rec.fds.remove(0);
    rec.regions.clear();
    let err = restore_files(&rec, &job, FilePolicy::Truncate, &[]).unwrap_err();
    assert!(
        matches!(err, RestoreError::FileVanished { fd: 796, .. }),
        "{err}"
    );
}
