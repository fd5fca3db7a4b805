//! Files of the node read, or written other than by appending, and closed
//! (`node_files.rs`): noted at their close, carried by renames, and kept
//! by a capture, on real files in a temporary directory.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;

use cryo_core::format::closed::ClosedFiles;

use super::*;
use crate::test_support::SERIAL;

/// A store on a network filesystem, for files of this machine's disk to
/// be the node's.
fn store_elsewhere() -> Option<Filesystem> {
    Some(Filesystem {
        magic: cryo_core::locality::NFS_MAGIC,
        dev: u64::MAX,
    })
}

/// The files of the node a capture keeps, among those under `dir`.
fn node_files_under(dir: &std::path::Path, store: Option<Filesystem>) -> Vec<(String, u64, bool)> {
    let mut warnings = Vec::new();
    let captured = capture(&HashSet::new(), &mut warnings, store);
    let dir = dir.to_str().unwrap();
    assert!(!warnings.iter().any(|w| w.contains(dir)), "{warnings:?}");
    (captured.node_local.into_iter())
        .filter(|file| file.path.starts_with(dir))
        .map(|file| (file.path, file.size, file.written))
        .collect()
}

#[test]
fn files_of_the_node_read_or_written_and_closed_are_kept_to_be_made_again() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let (snapshot, input, raw) = (
        dir.path().join("snap.dat"),
        dir.path().join("input.nml"),
        dir.path().join("raw.dat"),
    );
    // Staged by someone else: the closes of this binary's writes are
    // not the rank's.
    fs::write(&input, b"&params n=3 /\n").unwrap();
    fs::write(&raw, b"0123456789").unwrap();
    let _ = close::drain_node();
    // Written from the start and closed as fclose does.
    let file = fs::File::create(&snapshot).unwrap();
    (&file).write_all(b"snapshot").unwrap();
    let written = closing(file.as_raw_fd(), true);
    drop(file);
    written.unwrap().done();
    // Only read, and closed as a Fortran CLOSE does.
    let file = fs::File::open(&input).unwrap();
    let read = closing(file.as_raw_fd(), false);
    drop(file);
    read.unwrap().done();
    // Written in place and closed with close(2).
    let file = fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: the fd was just taken from its File.
    assert_eq!(unsafe { close::close(fd) }, 0);

    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let kept = node_files_under(dir.path(), store_elsewhere());
    assert_eq!(
        kept,
        [
            (path(&input), 14, false),
            (path(&raw), 10, true),
            (path(&snapshot), 8, true),
        ]
    );
    // None of them is cut back: the table does not have them.
    let table = capture(&HashSet::new(), &mut Vec::new(), store_elsewhere()).table;
    let tabled = table.map(|t| ClosedFiles::decode(&t).unwrap().files);
    assert!(!tabled
        .unwrap_or_default()
        .iter()
        .any(|f| f.path.starts_with(&path(dir.path()))));
    // A file open for writing at the checkpoint is its fd's to save.
    let open = HashSet::from([path(&raw)]);
    let captured = capture(&open, &mut Vec::new(), store_elsewhere());
    assert!(!captured.node_local.iter().any(|f| f.path == path(&raw)));
    // One gone is forgotten; with the store on the same filesystem, none
    // is the node's, and they are forgotten too.
    fs::remove_file(&snapshot).unwrap();
    assert_eq!(node_files_under(dir.path(), store_elsewhere()).len(), 2);
    let here = Filesystem::of(dir.path()).ok();
    assert_eq!(node_files_under(dir.path(), here), []);
    assert_eq!(node_files_under(dir.path(), store_elsewhere()), []);
    forget_all();
}

#[test]
fn files_of_the_system_and_the_oldest_past_the_limit_are_not_kept() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    // A binding notes paths as they open; the system's are left out.
    note_node_file("/etc/hostname".into(), false);
    note_node_file("relative.dat".into(), true);
    let total = node_files::MAX_NODE_FILES + 3;
    let file = |n: usize| dir.path().join(format!("f{n:03}"));
    for n in 0..total {
        fs::write(file(n), b"x").unwrap();
    }
    let _ = close::drain_node();
    for n in 0..total {
        note_node_file(file(n).to_str().unwrap().to_owned(), true);
    }
    let mut warnings = Vec::new();
    let captured = capture(&HashSet::new(), &mut warnings, store_elsewhere());
    let names: Vec<&str> = (captured.node_local.iter())
        .map(|file| file.path.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names.len(), node_files::MAX_NODE_FILES, "{names:?}");
    assert_eq!(names.first(), Some(&"f003"));
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("3 files of this node read or written and closed")),
        "{warnings:?}"
    );
    forget_all();
}

#[test]
fn a_file_of_the_node_renamed_after_its_close_is_kept_at_its_new_name() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let c_path = |name: &str| std::ffi::CString::new(path(name)).unwrap();
    // Written and closed with close(2) under a temporary name, renamed
    // into place before the checkpoint drains the close.
    fs::write(path("out.tmp"), b"output").unwrap();
    let (from, to) = (c_path("out.tmp"), c_path("out.dat"));
    // SAFETY: two NUL-terminated paths.
    let renamed = unsafe { rename::rename(from.as_ptr(), to.as_ptr()) };
    assert_eq!(renamed, 0);
    // Noted from an fclose, then renamed through renameat with a relative
    // name in a directory fd.
    let file = fs::File::create(path("snap.tmp")).unwrap();
    (&file).write_all(b"snapshot").unwrap();
    let closed = closing(file.as_raw_fd(), true).unwrap();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: the fd was just taken from its File.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    closed.done();
    let dir_fd = fs::File::open(dir.path()).unwrap();
    // SAFETY: two NUL-terminated paths and an open directory fd.
    let renamed = unsafe {
        rename::renameat(
            dir_fd.as_raw_fd(),
            c"snap.tmp".as_ptr(),
            dir_fd.as_raw_fd(),
            c"snap.dat".as_ptr(),
        )
    };
    assert_eq!(renamed, 0);
    // A rename that fails carries nothing.
    let (missing, other) = (c_path("missing"), c_path("x"));
    // SAFETY: as above.
    let failed = unsafe { rename::rename(missing.as_ptr(), other.as_ptr()) };
    assert_eq!(failed, -1);
    assert_eq!(
        node_files_under(dir.path(), store_elsewhere()),
        [(path("out.dat"), 6, true), (path("snap.dat"), 8, true)]
    );
    forget_all();
}

/// A binding that sees renames only before they are made
/// (`cryo_note_renamed`: Python's audit hook) notes the new name beside the
/// old; each checkpoint keeps whichever is there.
#[test]
fn a_rename_told_before_it_is_made_keeps_the_name_that_is_there() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for name in ["a.tmp", "b.tmp"] {
        fs::write(path(name), b"snapshot").unwrap();
    }
    let _ = close::drain_node();
    note_node_file(path("a.tmp"), true);
    note_node_file(path("b.tmp"), true);
    // Made: only the new name is there.
    node_files::renaming(&path("a.tmp"), &path("a.npy"));
    fs::rename(path("a.tmp"), path("a.npy")).unwrap();
    // Failed (the directory is missing): the old name stays.
    node_files::renaming(&path("b.tmp"), &path("gone/b.npy"));
    assert!(fs::rename(path("b.tmp"), path("gone/b.npy")).is_err());
    // A file never noted is not carried.
    node_files::renaming(&path("other"), &path("c.npy"));
    fs::write(path("c.npy"), b"c").unwrap();
    let _ = close::drain_node();
    assert_eq!(
        node_files_under(dir.path(), store_elsewhere()),
        [(path("a.npy"), 8, true), (path("b.tmp"), 8, true)]
    );
    forget_all();
}

/// A directory renamed (results written to `run.tmp/`, renamed `run/`)
/// carries the notes of the files under it, those closed with `close(2)`
/// since the last checkpoint and those already in the table, and leaves
/// a sibling whose name only starts alike.
#[test]
fn a_directory_renamed_carries_the_files_noted_under_it() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    fs::create_dir_all(path("run.tmp/sub")).unwrap();
    fs::create_dir(path("run.tmp2")).unwrap();
    fs::write(path("run.tmp2/other"), b"other").unwrap();
    // In the table already (a checkpoint drained its close).
    fs::write(path("run.tmp/old"), b"old").unwrap();
    let _ = capture(&HashSet::new(), &mut Vec::new(), store_elsewhere());
    // Closed with close(2) since: still in its slot.
    fs::write(path("run.tmp/sub/new"), b"newer").unwrap();
    let (from, to) = (
        std::ffi::CString::new(path("run.tmp/")).unwrap(),
        std::ffi::CString::new(path("run")).unwrap(),
    );
    // SAFETY: two NUL-terminated paths.
    assert_eq!(unsafe { rename::rename(from.as_ptr(), to.as_ptr()) }, 0);
    assert_eq!(
        node_files_under(dir.path(), store_elsewhere()),
        [
            (path("run.tmp2/other"), 5, true),
            (path("run/old"), 3, true),
            (path("run/sub/new"), 5, true),
        ]
    );
    forget_all();
}
