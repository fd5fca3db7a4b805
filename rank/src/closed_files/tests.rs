//! The table of closed files: noting, capturing, and settling at a
//! restart, on real files in a temporary directory.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;

use cryo_core::format::closed::{path_key, tail_hash, ClosedFile, ClosedFiles, Mark, TAIL_BYTES};

use super::settle::{first_recorder, marks_to_try, settle_file, Files, RealFiles, Settled};
use super::*;
use crate::test_support::SERIAL;

fn append_open(path: &std::path::Path) -> fs::File {
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap()
}

/// Appends `line` and closes the file as the runtime's fclose does.
fn append_and_close(path: &std::path::Path, line: &[u8]) {
    let mut file = append_open(path);
    file.write_all(line).unwrap();
    let closing = closing(file.as_raw_fd(), true);
    // Closed as the C library's fclose does, not through the runtime's
    // `close` (which `drop` would call in this binary).
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: the fd was just taken from its File.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    if let Some(closing) = closing {
        closing.done();
    }
}

fn mark(contents: &[u8]) -> Mark {
    let size = contents.len() as u64;
    let start = tail_start(size) as usize;
    Mark {
        size,
        tail: tail_hash(size, &contents[start..]),
    }
}

fn record(path: &str, at_checkpoint: &[u8], at_close: &[u8]) -> ClosedFile {
    ClosedFile {
        path: path.into(),
        at_checkpoint: mark(at_checkpoint),
        at_close: mark(at_close),
        appended: true,
    }
}

fn table_now(open: &HashSet<String>) -> Option<ClosedFiles> {
    let mut warnings = Vec::new();
    let table = capture(open, &mut warnings, None)
        .table
        .map(|b| ClosedFiles::decode(&b).unwrap());
    assert!(warnings.is_empty(), "{warnings:?}");
    table
}

#[test]
fn appended_files_are_noted_at_close_and_measured_at_the_checkpoint() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let log_path = log.to_str().unwrap().to_owned();
    append_and_close(&log, b"one\n");
    // Not O_APPEND: not noted when appending is asked; read-only: never.
    let plain = dir.path().join("plain");
    fs::write(&plain, b"x").unwrap();
    let other = fs::OpenOptions::new().write(true).open(&plain).unwrap();
    assert!(!matches!(
        closing(other.as_raw_fd(), true),
        Some(Closing::CutBack { .. })
    ));
    assert!(closing(other.as_raw_fd(), false).is_some());
    let reader = fs::File::open(&log).unwrap();
    assert!(!matches!(
        closing(reader.as_raw_fd(), false),
        Some(Closing::CutBack { .. })
    ));

    // Written through another fd after the close, before the checkpoint:
    // the checkpoint's mark counts it, the close's does not.
    let writer = fs::OpenOptions::new().write(true).open(&log).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&writer, b"raw\n", 4).unwrap();
    drop(writer);
    let table = table_now(&HashSet::new()).unwrap();
    assert_eq!(
        table.files,
        vec![record(&log_path, b"one\nraw\n", b"one\n")]
    );

    // Written after the checkpoint without a close: the record stays.
    let writer = fs::OpenOptions::new().write(true).open(&log).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&writer, b"two\n", 8).unwrap();
    drop(writer);
    assert_eq!(table_now(&HashSet::new()).unwrap(), table);
    // Held open for writing at a checkpoint: left to its fd record.
    let open: HashSet<String> = [log_path.clone()].into();
    assert_eq!(table_now(&open), None);
    // A checkpoint does not look again at files not closed since the last
    // one (a restart finds this one gone and leaves it).
    fs::remove_file(&log).unwrap();
    assert_eq!(table_now(&HashSet::new()).unwrap(), table);
    // One closed since and gone by the checkpoint is forgotten.
    append_and_close(&log, b"three\n");
    fs::remove_file(&log).unwrap();
    assert_eq!(table_now(&HashSet::new()), None);
    forget_all();
}

#[test]
fn files_closed_with_close_are_noted_without_allocating_and_drained_at_a_park() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let _ = close::drain_appended();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("raw.log");
    for _ in 0..3 {
        let file = append_open(&log);
        (&file).write_all(b"line\n").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: the fd was just taken from its File.
        assert_eq!(unsafe { close::close(fd) }, 0);
    }
    // Not O_APPEND: not noted.
    let plain =
        std::os::fd::IntoRawFd::into_raw_fd(fs::File::create(dir.path().join("plain")).unwrap());
    // SAFETY: as above.
    let closed = unsafe { close::close(plain) };
    assert_eq!(closed, 0);
    // A bad fd is closed (failing) as the C library would.
    // SAFETY: closing an fd that is not open only fails.
    assert_eq!(unsafe { close::close(-1) }, -1);
    let log_path = log.to_str().unwrap().to_owned();
    let mut link = [0u8; 32];
    close::proc_fd_path(1234, &mut link);
    assert_eq!(&link[..19], b"/proc/self/fd/1234\0");
    // (Other tests of this binary may close files of their own meanwhile.)
    let mine = |noted: Vec<(String, u64)>| -> Vec<(String, u64)> {
        let dir = dir.path().to_str().unwrap();
        noted
            .into_iter()
            .filter(|(p, _)| p.starts_with(dir))
            .collect()
    };
    // Once, with its size at the last close.
    assert_eq!(
        mine(close::drain_appended().0),
        vec![(log_path.clone(), 15)]
    );
    assert!(mine(close::drain_appended().0).is_empty());

    // More distinct files than slots: the rest are counted, and the park
    // that drains them warns.
    for n in 0..70 {
        let file = append_open(&dir.path().join(format!("f{n}")));
        // SAFETY: as above.
        unsafe { close::close(std::os::fd::IntoRawFd::into_raw_fd(file)) };
    }
    let mut warnings = Vec::new();
    let table =
        ClosedFiles::decode(&capture(&HashSet::new(), &mut warnings, None).table.unwrap()).unwrap();
    let noted = mine(table.files.iter().map(|f| (f.path.clone(), 0)).collect()).len();
    assert!(table
        .files
        .iter()
        .all(|f| f.appended && f.at_close == f.at_checkpoint));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let dropped: usize = warnings[0].split(' ').next().unwrap().parse().unwrap();
    // (Another test's close may land among them: at least ours are counted.)
    assert!(
        noted <= 64 && dropped >= 6 && noted + dropped >= 70,
        "{noted} noted, {warnings:?}"
    );

    // Closed at 15 bytes, then written up to 20 before the park (through
    // an fd without O_APPEND, not noted): one mark at each size.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(append_open(&log));
    // SAFETY: as above.
    unsafe { close::close(fd) };
    let writer = fs::OpenOptions::new().write(true).open(&log).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&writer, b"more\n", 15).unwrap();
    drop(writer);
    let table = table_now(&HashSet::new()).unwrap();
    let entry = table.files.iter().find(|f| f.path == log_path).unwrap();
    assert_eq!((entry.at_close.size, entry.at_checkpoint.size), (15, 20));
    forget_all();
}

#[test]
fn the_table_keeps_the_most_recently_closed_files() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    for n in 0..MAX_CLOSED_FILES + 10 {
        append_and_close(&dir.path().join(format!("step.{n}")), b"x");
        // The log is closed at every step, so it stays.
        append_and_close(&log, b"y");
    }
    let table = table_now(&HashSet::new()).unwrap();
    assert_eq!(table.files.len(), MAX_CLOSED_FILES);
    let paths: HashSet<&str> = table.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains(log.to_str().unwrap()));
    assert!(!paths.contains(dir.path().join("step.0").to_str().unwrap()));
    forget_all();
}

#[test]
fn a_file_is_cut_back_to_the_first_mark_whose_tail_matches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.log");
    let p = path.to_str().unwrap();
    let long: Vec<u8> = (0..3 * TAIL_BYTES).map(|i| (i % 251) as u8).collect();
    let latest = mark(&long[..2 * TAIL_BYTES as usize + 7]);
    let earlier = mark(&long[..100]);
    let marks = [latest, earlier];
    fs::write(&path, &long).unwrap();
    let settled = settle_file(p, &marks, &RealFiles);
    assert!(
        matches!(settled, Settled::Cut { from, to } if from == long.len() as u64 && to == latest.size),
        "{settled:?}"
    );
    assert_eq!(fs::read(&path).unwrap(), &long[..latest.size as usize]);
    // Settling again (another rank that recorded it) changes nothing.
    assert!(matches!(
        settle_file(p, &marks, &RealFiles),
        Settled::Unchanged
    ));

    // Another node's file of the same path: the first mark does not
    // match, the second does.
    let mut other = long.clone();
    other[2 * TAIL_BYTES as usize] ^= 1;
    fs::write(&path, &other).unwrap();
    let settled = settle_file(p, &marks, &RealFiles);
    assert!(
        matches!(settled, Settled::Cut { from, to: 100 } if from == other.len() as u64),
        "{settled:?}"
    );

    // Rewritten with other contents, or shorter than every mark: left.
    fs::write(&path, vec![b'z'; 9000]).unwrap();
    assert!(matches!(
        settle_file(p, &marks, &RealFiles),
        Settled::Changed { size: 9000 }
    ));
    fs::write(&path, b"ab").unwrap();
    assert!(matches!(
        settle_file(p, &marks, &RealFiles),
        Settled::Changed { size: 2 }
    ));
    fs::remove_file(&path).unwrap();
    assert!(matches!(settle_file(p, &marks, &RealFiles), Settled::Gone));
}

#[test]
fn own_files_go_back_to_the_checkpoint_and_shared_ones_to_the_last_close() {
    let own = record("/w/log", b"a\nraw\n", b"a\n");
    // Only this rank recorded it: its checkpoint mark first.
    let alone = (1, vec![own.at_close]);
    assert_eq!(
        marks_to_try(&own, Some(&alone)),
        vec![own.at_checkpoint, own.at_close]
    );
    // Three ranks did: their close marks, largest first, then its own.
    let later = mark(b"a\nb\nc\n");
    let shared = (3, vec![own.at_close, later, mark(b"a\nb\n")]);
    assert_eq!(
        marks_to_try(&own, Some(&shared)),
        vec![
            later,
            mark(b"a\nb\n"),
            own.at_close,
            own.at_checkpoint,
            own.at_close
        ]
    );
}

/// A filesystem whose cut fails (a read-only mount, a full quota).
struct CannotCut;

impl Files for CannotCut {
    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        RealFiles.size(path)
    }
    fn read_at(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        RealFiles.read_at(path, offset, len)
    }
    fn cut(&self, _: &str, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
}

#[test]
fn a_cut_that_fails_is_reported_and_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    fs::write(&path, b"one\ntwo\n").unwrap();
    let settled = settle_file(path.to_str().unwrap(), &[mark(b"one\n")], &CannotCut);
    assert!(matches!(settled, Settled::Failed(ref e) if e.raw_os_error() == Some(libc::EROFS)));
    assert_eq!(fs::read(&path).unwrap(), b"one\ntwo\n");
}

/// Peers that answer with fixed tables.
struct Fixed {
    others: Vec<Vec<u64>>,
    barriers: u32,
}

impl Peers for Fixed {
    fn exchange(&mut self, words: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        let mut all = vec![words.to_vec()];
        all.extend(self.others.iter().cloned());
        Ok(all)
    }
    fn barrier(&mut self) -> Result<(), String> {
        self.barriers += 1;
        Ok(())
    }
}

#[test]
fn settling_takes_the_peers_marks_and_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let p = path.to_str().unwrap();
    // This rank closed after "a", parked after "b" (another rank's line),
    // and another rank resumed early and appended "c" before a kill.
    fs::write(&path, b"a\nb\nc\n").unwrap();
    let own = ClosedFiles {
        files: vec![record(p, b"a\nb\n", b"a\n")],
    };
    let peer = mark(b"a\nb\n");
    let peer_words = |at_checkpoint: Mark| {
        vec![
            1,
            path_key(p),
            at_checkpoint.size,
            at_checkpoint.tail,
            peer.size,
            peer.tail,
        ]
    };
    let mut peers = Fixed {
        others: vec![peer_words(mark(b"a\nb\nc\n"))],
        barriers: 0,
    };
    let cut = settle(0, Some(&own), &mut peers).unwrap();
    assert_eq!(cut, vec![p.to_owned()]);
    assert_eq!(fs::read(&path).unwrap(), b"a\nb\n");
    assert_eq!(peers.barriers, 1);

    // A peer whose restore failed fails every rank, before any cut.
    fs::write(&path, b"a\nb\nc\n").unwrap();
    let mut peers = Fixed {
        others: vec![vec![1], vec![0]],
        barriers: 0,
    };
    let err = settle(0, Some(&own), &mut peers).unwrap_err();
    assert!(matches!(
        err,
        crate::RestoreError::PeerFailed { rank: 0, peer: 2 }
    ));
    assert_eq!(fs::read(&path).unwrap(), b"a\nb\nc\n");
    assert_eq!(peers.barriers, 0);
}

#[test]
fn a_closed_file_in_node_memory_is_kept_to_be_made_again() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let (in_memory, on_disk) = (shm.path().join("log"), disk.path().join("log"));
    append_and_close(&in_memory, b"one\n");
    append_and_close(&on_disk, b"one\n");
    // The store on the disk: the tmpfs file is kept, the other is not.
    let store = Filesystem::of(disk.path()).ok();
    let mut warnings = Vec::new();
    let captured = capture(&HashSet::new(), &mut warnings, store);
    // (Another test's close may land among them: only ours are looked at.)
    let ours = |path: &str| {
        path.starts_with(shm.path().to_str().unwrap())
            || path.starts_with(disk.path().to_str().unwrap())
    };
    let files = ClosedFiles::decode(&captured.table.unwrap()).unwrap().files;
    assert_eq!(
        files.iter().filter(|f| ours(&f.path)).count(),
        2,
        "{files:?}"
    );
    assert!(!warnings.iter().any(|w| ours(w)), "{warnings:?}");
    let kept: Vec<&NodeLocal> = captured
        .node_local
        .iter()
        .filter(|f| ours(&f.path))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].path, in_memory.to_str().unwrap());
    assert_eq!(kept[0].size, 4);
    assert!(
        kept[0].why.starts_with("is in this node's memory (tmpfs)"),
        "{kept:?}"
    );
    forget_all();
}

#[test]
fn files_of_a_restored_table_and_files_noted_by_a_binding_are_measured_at_the_next_checkpoint() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    forget_all();
    let dir = tempfile::tempdir().unwrap();
    let (restored, noted) = (dir.path().join("restored.log"), dir.path().join("py.log"));
    fs::write(&restored, b"one\ntwo\n").unwrap();
    fs::write(&noted, b"py\n").unwrap();
    // The restarted run neither opens nor closes the first; a binding
    // (Python) tells of the second at its open.
    remember(&ClosedFiles {
        files: vec![record(restored.to_str().unwrap(), b"one\ntwo\n", b"one\n")],
    });
    note_appended(noted.to_str().unwrap().to_owned());
    let table = table_now(&HashSet::new()).unwrap();
    let find = |path: &std::path::Path| {
        table
            .files
            .iter()
            .find(|f| f.path == path.to_str().unwrap())
            .cloned()
    };
    let restored = find(&restored).expect("the restored table's file is forgotten");
    assert_eq!(restored.at_checkpoint, mark(b"one\ntwo\n"));
    assert_eq!(restored.at_close, mark(b"one\n"));
    let noted = find(&noted).expect("the noted file is missing");
    assert!(noted.appended);
    assert_eq!(noted.at_checkpoint, mark(b"py\n"));
    assert_eq!(noted.at_close, noted.at_checkpoint);
    forget_all();
}

#[test]
fn a_table_naming_a_path_that_leads_elsewhere_is_refused_as_damaged() {
    use cryo_core::format::closed::CLOSED_FILES_REGION;
    use cryo_core::format::manifest::{RankRecord, RegionKind};

    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let root = tempfile::tempdir().unwrap();
    let job = cryo_core::Store::create(root.path().join("store"))
        .unwrap()
        .job("closed")
        .unwrap();
    let mark = Mark { size: 1, tail: 0 };
    let table = ClosedFiles {
        files: vec![ClosedFile {
            path: "/work/run/../../etc/motd".into(),
            at_checkpoint: mark,
            at_close: mark,
            appended: true,
        }],
    };
    let region = crate::test_support::store_small_chunks(
        &job,
        0,
        CLOSED_FILES_REGION,
        RegionKind::ClosedFiles,
        &table.encode().unwrap(),
    );
    let record = RankRecord {
        regions: vec![region],
        ..RankRecord::new(0, "n", 1)
    };
    let err = super::settle::load(&record, &job).unwrap_err();
    assert!(
        matches!(&err, crate::error::RestoreError::ClosedFiles { why, .. } if why.contains("/etc/motd")),
        "{err}"
    );
}

#[test]
fn a_gone_file_is_named_by_the_lowest_rank_that_recorded_it() {
    // Each rank's words: restored, then five per file (key first).
    let entry = |key: u64| [key, 10, 1, 10, 1];
    let all = vec![
        vec![1],
        [&[1][..], &entry(7)[..], &entry(9)[..]].concat(),
        [&[1][..], &entry(9)[..]].concat(),
    ];
    assert_eq!(first_recorder(&all, 9), Some(1));
    assert_eq!(first_recorder(&all, 7), Some(1));
    assert_eq!(first_recorder(&all, 8), None);
}
