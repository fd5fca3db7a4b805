//! The store on a filesystem that fails ([`FaultFs`]): a full disk while an
//! epoch's chunks are written, while a rank's part is made durable and while
//! the manifest is published, a failed `syncfs`, and a failing read at
//! restore. Each failure must come back as a typed error that names the
//! cause, the step and the path; nothing may panic; the failed epoch must not
//! be committed; and the previous committed epoch must still verify and
//! restore byte for byte, through a fresh store on the real filesystem (as
//! a restarted job would open it). No root needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::fault_fs::{FaultFs, FsOp};
use super::fs::{IoStepError, ReadCappedError};
use super::reader::ChunkReadError;
use super::writer::{ChunkLayout, WriteError, WriterConfig};
use super::{CommitError, EpochState, JobStore, LoadProblem, Store, StoreError};
use crate::format::chunk::{ChunkCodec, ChunkHash};
use crate::format::limits::MIN_CHUNK_SIZE;
use crate::format::manifest::{Manifest, RankRecord, RegionKind};
use crate::format::pack::ChunkPlace;

const CHUNK: usize = MIN_CHUNK_SIZE;
const JOB: &str = "heat";
const REGION: &str = "state";

fn config() -> WriterConfig {
    WriterConfig {
        chunk_size: CHUNK,
        codec: ChunkCodec::default(),
        layout: ChunkLayout::default(),
    }
}

/// Eight chunks of bytes that differ from chunk to chunk and from seed to
/// seed, so that no chunk of one epoch deduplicates against another.
fn state(seed: u64) -> Vec<u8> {
    super::test_support::noise(seed, CHUNK * 8)
}

fn record() -> RankRecord {
    super::test_support::empty_record(0)
}

/// A store with epoch 1 committed through the real filesystem.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    epoch1: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let epoch1 = state(1);
        let job = Store::create(&root).unwrap().job(JOB).unwrap();
        write_epoch(&job, 1, &epoch1).unwrap();
        job.commit_epoch(1, 1, CHUNK as u32).unwrap();
        Fixture {
            _dir: dir,
            root,
            epoch1,
        }
    }

    /// The job, every file operation going through `fs`.
    fn job_on(&self, fs: &Arc<FaultFs>) -> JobStore {
        Store::open_with_fs(&self.root, Arc::clone(fs) as _)
            .unwrap()
            .job(JOB)
            .unwrap()
    }

    /// The job on the real filesystem, opened afresh.
    fn real_job(&self) -> JobStore {
        Store::open(&self.root).unwrap().job(JOB).unwrap()
    }

    /// Epoch 1 is the newest committed epoch, verifies, and restores
    /// exactly; the failure left no temp file behind; and the store takes
    /// a new epoch.
    fn assert_epoch1_intact(&self) {
        let job = self.real_job();
        assert_eq!(job.latest_committed().unwrap(), Some(1));
        let manifest = job.load_manifest(1).unwrap();
        assert!(job.verify_manifest(&manifest).is_ok());
        assert!(
            restore(&job, &manifest) == self.epoch1,
            "epoch 1 restored other bytes"
        );
        assert_eq!(temp_files(job.dir()), Vec::<PathBuf>::new());

        let epoch3 = state(3);
        write_epoch(&job, 3, &epoch3).unwrap();
        let manifest = job.commit_epoch(3, 1, CHUNK as u32).unwrap();
        assert!(
            restore(&job, &manifest) == epoch3,
            "epoch 3 restored other bytes"
        );
    }
}

/// Writes rank 0 of `epoch` holding `data`, up to its durable part.
fn write_epoch(job: &JobStore, epoch: u64, data: &[u8]) -> Result<(), WriteError> {
    write_epoch_as(job, epoch, data, config())
}

/// [`write_epoch`] with another configuration.
fn write_epoch_as(
    job: &JobStore,
    epoch: u64,
    data: &[u8],
    config: WriterConfig,
) -> Result<(), WriteError> {
    let writer = job.begin_epoch(epoch, config).unwrap();
    let rank = writer.rank(0);
    let mut record = record();
    record.regions.push(rank.store_region(
        REGION,
        0x7f00_0000_0000,
        RegionKind::Anonymous,
        data,
    )?);
    rank.finish(record).map(|_| ())
}

/// Rank 0's one region of `manifest`, restored.
fn restore(job: &JobStore, manifest: &Manifest) -> Vec<u8> {
    let region = &manifest.ranks[0].regions[0];
    let mut restored = vec![0u8; region.len as usize];
    job.restore_region(region, &mut restored).unwrap();
    restored
}

/// Every `.tmp-` file under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(temp_files(&path));
        } else if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp-")
        {
            out.push(path);
        }
    }
    out
}

/// Whether `path` is a temp file for a final name starting with `prefix`.
fn is_temp_for(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(&format!(".tmp-{prefix}"))
}

fn assert_disk_full(err: &IoStepError, step: &str) {
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(err.step, step, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{step} {}", err.path.display())),
        "{text}"
    );
    assert!(text.contains("No space left on device"), "{text}");
}

#[test]
fn full_disk_while_writing_chunks_fails_the_rank_and_keeps_epoch_1() {
    let fixture = Fixture::new();
    // The pack header is the first write, so this is the second chunk.
    let fs = Arc::new(FaultFs::real().fail_nth(FsOp::WriteAt, 3, Errno::ENOSPC));
    let job = fixture.job_on(&fs);

    let err = write_epoch(&job, 2, &state(2)).unwrap_err();
    let WriteError::Chunk { rank: 0, source } = &err else {
        panic!("expected a chunk write error, got {err:?}");
    };
    assert_disk_full(source, "write pack");
    assert!(source.path.starts_with(job.packs_dir()), "{err}");
    assert!(err.to_string().contains("(the store is full)"), "{err}");
    assert_eq!(fs.injected(), 1);

    // The epoch cannot be committed: its rank has no part.
    assert!(matches!(
        job.commit_epoch(2, 1, CHUNK as u32),
        Err(CommitError::MissingRank { rank: 0, .. })
    ));
    fixture.assert_epoch1_intact();
}

#[test]
fn a_failed_pack_sync_fails_the_rank_before_its_part_is_written() {
    let fixture = Fixture::new();
    let fs = Arc::new(FaultFs::real().fail_nth(FsOp::SyncData, 1, Errno::EIO));
    let job = fixture.job_on(&fs);

    let err = write_epoch(&job, 2, &state(2)).unwrap_err();
    let WriteError::Chunk { rank: 0, source } = &err else {
        panic!("expected a chunk write error, got {err:?}");
    };
    assert_eq!(source.step, "fdatasync pack", "{err}");
    assert!(source.path.starts_with(job.packs_dir()), "{err}");
    assert_eq!(source.source.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(!job.part_path(2, 0).exists(), "a part named unsynced bytes");
    assert!(matches!(
        job.commit_epoch(2, 1, CHUNK as u32),
        Err(CommitError::MissingRank { rank: 0, .. })
    ));
    fixture.assert_epoch1_intact();
}

#[test]
fn failed_syncfs_gives_no_loose_chunk_its_final_name() {
    let fixture = Fixture::new();
    let fs = Arc::new(FaultFs::real().fail_nth(FsOp::SyncFs, 1, Errno::EIO));
    let job = fixture.job_on(&fs);
    let epoch2 = state(2);
    let loose = WriterConfig {
        layout: ChunkLayout::Loose,
        ..config()
    };

    let err = write_epoch_as(&job, 2, &epoch2, loose).unwrap_err();
    let WriteError::Chunk { rank: 0, source } = &err else {
        panic!("expected a chunk write error, got {err:?}");
    };
    assert_eq!(source.step, "syncfs", "{err}");
    assert_eq!(source.path, job.chunks_dir(), "{err}");
    assert_eq!(source.source.raw_os_error(), Some(libc::EIO), "{err}");

    // A final chunk name means durable bytes, and other writers skip a
    // chunk the store has: so none of this batch may have been published.
    for raw in epoch2.chunks(CHUNK) {
        let path = job.chunk_path(&ChunkHash::of(raw));
        assert!(
            !path.exists(),
            "{} published without syncfs",
            path.display()
        );
    }
    fixture.assert_epoch1_intact();
}

#[test]
fn full_disk_while_making_the_part_durable_fails_the_rank_and_keeps_epoch_1() {
    let fixture = Fixture::new();
    let fs = Arc::new(FaultFs::real().fail_matching(
        FsOp::SyncFile,
        |path| is_temp_for(path, "rank-000000.part"),
        Errno::ENOSPC,
    ));
    let job = fixture.job_on(&fs);

    let err = write_epoch(&job, 2, &state(2)).unwrap_err();
    let WriteError::Part {
        rank: 0,
        source: CommitError::Io(source),
    } = &err
    else {
        panic!("expected a part write error, got {err:?}");
    };
    assert_disk_full(source, "sync_all");
    assert!(source.path.starts_with(job.pending_epoch_dir(2)), "{err}");
    assert!(err
        .to_string()
        .starts_with("rank 0: writing its part failed: sync_all "));
    assert_eq!(fs.injected(), 1);

    assert!(!job.part_path(2, 0).exists());
    assert_eq!(
        job.epochs().unwrap().get(&2),
        Some(&EpochState::Partial { parts: 0 })
    );
    assert!(matches!(
        job.commit_epoch(2, 1, CHUNK as u32),
        Err(CommitError::MissingRank { rank: 0, .. })
    ));
    fixture.assert_epoch1_intact();
}

#[test]
fn full_disk_while_publishing_the_manifest_keeps_epoch_1_and_the_parts() {
    // The manifest's temp file fails to be written, to be synced, or to be
    // linked to its final name: each is the same failed commit.
    for (op, step) in [
        (FsOp::Write, "write"),
        (FsOp::SyncFile, "sync_all"),
        (FsOp::Link, "link"),
    ] {
        let fixture = Fixture::new();
        let fs = Arc::new(FaultFs::real().fail_matching(
            op,
            |path| path.to_string_lossy().contains(".manifest"),
            Errno::ENOSPC,
        ));
        let job = fixture.job_on(&fs);
        let epoch2 = state(2);
        write_epoch(&job, 2, &epoch2).unwrap();

        let err = job.commit_epoch(2, 1, CHUNK as u32).unwrap_err();
        let CommitError::Io(source) = &err else {
            panic!("{step}: expected an I/O error, got {err:?}");
        };
        assert_disk_full(source, step);
        assert!(source.path.starts_with(job.epochs_dir()), "{err}");
        assert_eq!(fs.injected(), 1, "{step}");

        assert!(!job.manifest_path(2).exists(), "{step}");
        assert_eq!(
            job.epochs().unwrap().get(&2),
            Some(&EpochState::Partial { parts: 1 }),
            "{step}"
        );
        let missing = job.load_manifest(2).unwrap_err();
        assert!(
            matches!(
                missing.problem,
                LoadProblem::Read(ReadCappedError::Missing(_))
            ),
            "{step}: {missing}"
        );

        // Once there is room again, the same parts commit.
        let real = fixture.real_job();
        let manifest = real.commit_epoch(2, 1, CHUNK as u32).unwrap();
        assert!(
            restore(&real, &manifest) == epoch2,
            "{step}: epoch 2 restored other bytes"
        );

        // Epoch 1 was never touched.
        let job = fixture.real_job();
        let manifest = job.load_manifest(1).unwrap();
        assert!(job.verify_manifest(&manifest).is_ok(), "{step}");
        assert_eq!(temp_files(job.dir()), Vec::<PathBuf>::new(), "{step}");
    }
}

#[test]
fn failing_reads_at_restore_name_the_pack_and_leave_the_epoch_restorable() {
    let fixture = Fixture::new();
    let manifest = fixture.real_job().load_manifest(1).unwrap();
    let region = manifest.ranks[0].regions[0].clone();
    let ChunkPlace::Pack { pack, .. } = region.chunks[0].place else {
        panic!("epoch 1 is not packed: {:?}", region.chunks[0]);
    };
    let pack_path = fixture.real_job().pack_path(&pack);
    let manifest_path = fixture.real_job().manifest_path(1);

    // The manifest cannot be read.
    let fs = Arc::new(FaultFs::real().fail_nth(FsOp::Read, 1, Errno::EIO));
    let err = fixture.job_on(&fs).load_manifest(1).unwrap_err();
    assert_eq!(err.path, manifest_path);
    let LoadProblem::Read(ReadCappedError::Io(source)) = &err.problem else {
        panic!("expected a read error, got {err:?}");
    };
    assert_eq!(source.step, "read");
    assert_eq!(source.source.raw_os_error(), Some(libc::EIO));
    assert!(err.to_string().contains("Input/output error"), "{err}");

    // The pack cannot be read: restore and streaming name the region, the
    // first chunk's offset, the step and the pack; verify reports every
    // chunk of the region.
    let fs = Arc::new(FaultFs::real().fail_matching(
        FsOp::ReadAt,
        {
            let pack_path = pack_path.clone();
            move |path| path == pack_path
        },
        Errno::EIO,
    ));
    let job = fixture.job_on(&fs);
    let mut dest = vec![0u8; region.len as usize];
    let err = job.restore_region(&region, &mut dest).unwrap_err();
    assert_eq!(err.region, REGION);
    assert_eq!(err.offset, 0);
    let ChunkReadError::Io(source) = &err.source else {
        panic!("expected a chunk I/O error, got {err:?}");
    };
    assert_eq!(source.step, "read pack");
    assert_eq!(source.path, pack_path);
    assert_eq!(source.source.raw_os_error(), Some(libc::EIO));
    assert!(
        err.to_string()
            .starts_with(&format!("region \"{REGION}\" at offset 0: read pack ")),
        "{err}"
    );

    let streamed = job.stream_region(&region, CHUNK * 2, |_, _| Ok::<(), ()>(()));
    assert!(matches!(
        streamed,
        Err(super::reader::StreamError::Read(ref err)) if err.offset == 0
    ));

    let report = job.verify_manifest(&manifest);
    assert_eq!(report.bad.len(), region.chunks.len(), "{report:?}");
    assert!(report.bad[0].problem.contains("Input/output error"));

    fixture.assert_epoch1_intact();
}

/// The one pack of epoch 1 and its index as sealed.
fn epoch1_pack(
    job: &JobStore,
) -> (
    crate::format::pack::PackId,
    Vec<crate::format::pack::IndexEntry>,
) {
    let packs = job.list_packs().unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let index = job.pack_index(&packs[0]).unwrap();
    assert!(index.sealed);
    (packs[0], index.entries)
}

#[test]
fn a_pack_whose_writer_died_before_sealing_restores_and_is_indexed_by_scan() {
    let fixture = Fixture::new();
    let job = fixture.real_job();
    let (pack, entries) = epoch1_pack(&job);
    let end = entries.iter().map(|e| e.end()).max().unwrap();
    // Cut the index and footer off, as a writer killed before `seal`.
    std::fs::OpenOptions::new()
        .write(true)
        .open(job.pack_path(&pack))
        .unwrap()
        .set_len(end)
        .unwrap();
    let job = fixture.real_job();
    let index = job.pack_index(&pack).unwrap();
    assert!(!index.sealed);
    assert_eq!(index.scan_stopped, None);
    let mut scanned = index.entries.clone();
    scanned.sort_by_key(|e| e.offset);
    assert_eq!(scanned, entries);
    fixture.assert_epoch1_intact();
}

/// A writer killed between creating a pack and writing its header (a node
/// lost mid-epoch) leaves an empty file: it is a pack that was never
/// sealed and holds nothing, not a damaged one, so `cryo verify` does not
/// fail on it, and epoch 1 stays whole.
#[test]
fn a_pack_whose_writer_died_before_its_header_is_an_empty_unsealed_pack() {
    let fixture = Fixture::new();
    let job = fixture.real_job();
    for len in [0, 17] {
        let id = super::packs::new_pack_id();
        let path = job.pack_path(&id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let index = job.pack_index(&id).unwrap();
        assert!(!index.sealed && index.entries.is_empty(), "{index:?}");
        assert!(index.scan_stopped.is_some());
        assert_eq!(index.len, len as u64);
    }
    fixture.assert_epoch1_intact();
}

/// Two committed epochs whose packs GC will repack: epoch 2 keeps one
/// chunk of epoch 1's pack alive, and epoch 1 is retired.
fn repack_fixture() -> (Fixture, Vec<u8>) {
    let fixture = Fixture::new();
    let job = fixture.real_job();
    let mut epoch2 = state(2);
    epoch2[..CHUNK].copy_from_slice(&fixture.epoch1[..CHUNK]);
    write_epoch(&job, 2, &epoch2).unwrap();
    job.commit_epoch(2, 1, CHUNK as u32).unwrap();
    job.apply_retention(1).unwrap();
    (fixture, epoch2)
}

fn restores_epoch2(fixture: &Fixture, epoch2: &[u8]) {
    let job = fixture.real_job();
    let manifest = job.load_manifest(2).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
    assert!(
        restore(&job, &manifest) == epoch2,
        "epoch 2 restored other bytes"
    );
}

#[test]
fn gc_that_cannot_delete_the_old_pack_loses_nothing_and_finishes_later() {
    let (fixture, epoch2) = repack_fixture();
    let fs = Arc::new(FaultFs::real().fail_matching(
        FsOp::Remove,
        |path| path.extension().is_some_and(|e| e == "pack"),
        Errno::EIO,
    ));
    let job = fixture.job_on(&fs);
    let err = job.gc(None).unwrap_err();
    assert!(err.to_string().contains("remove pack"), "{err}");
    // The copy is durable and the old pack still there: both hold the chunk.
    assert_eq!(fixture.real_job().list_packs().unwrap().len(), 3);
    restores_epoch2(&fixture, &epoch2);
    let report = fixture.real_job().gc(None).unwrap();
    assert_eq!(report.removed_packs, 1, "{report:?}");
    assert_eq!(fixture.real_job().list_packs().unwrap().len(), 2);
    restores_epoch2(&fixture, &epoch2);
}

#[test]
fn gc_that_cannot_write_the_new_pack_keeps_the_old_one() {
    let (fixture, epoch2) = repack_fixture();
    let fs = Arc::new(FaultFs::real().fail_nth(FsOp::WriteAt, 2, Errno::ENOSPC));
    let job = fixture.job_on(&fs);
    let err = job.gc(None).unwrap_err();
    assert!(err.to_string().contains("write pack"), "{err}");
    restores_epoch2(&fixture, &epoch2);
    let report = fixture.real_job().gc(None).unwrap();
    assert_eq!(report.repacked_packs, 1, "{report:?}");
    assert_eq!(report.moved_chunks, 1, "{report:?}");
    restores_epoch2(&fixture, &epoch2);
}

/// Threads that meet the same chunk at once (zero pages, ranks with the same
/// state written in parallel) store it once, and every reference names
/// where it went, even when the first write is slow to land.
#[test]
fn identical_chunks_met_at_once_are_stored_once_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    Store::create(&root).unwrap();
    let fs = Arc::new(FaultFs::real().slow(FsOp::WriteAt, std::time::Duration::from_millis(20)));
    let job = Store::open_with_fs(&root, Arc::clone(&fs) as _)
        .unwrap()
        .job(JOB)
        .unwrap();
    let zeros = vec![0u8; CHUNK * 16];
    let shared = state(4);
    let writer = job.begin_epoch(1, config()).unwrap();
    std::thread::scope(|scope| {
        for rank in 0..4u32 {
            let (writer, zeros, shared) = (&writer, &zeros, &shared);
            scope.spawn(move || {
                let rank_writer = writer.rank(rank);
                let mut record = record();
                for (name, data) in [("zeros", zeros), ("shared", shared)] {
                    record.regions.push(
                        rank_writer
                            .store_region(name, 0x7f00_0000_0000, RegionKind::Anonymous, data)
                            .unwrap(),
                    );
                }
                rank_writer.finish(record).unwrap();
            });
        }
    });
    drop(writer);
    let manifest = job.commit_epoch(1, 4, CHUNK as u32).unwrap();
    assert_eq!(manifest.stats().new_chunks, 1 + 8);
    for (_, _, chunk) in manifest.chunk_refs() {
        assert!(matches!(chunk.place, ChunkPlace::Pack { .. }), "{chunk:?}");
    }
    let job = Store::open(&root).unwrap().job(JOB).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
    for rank in &manifest.ranks {
        let mut out = vec![0u8; zeros.len()];
        job.restore_region(&rank.regions[0], &mut out).unwrap();
        assert!(out == zeros);
        let mut out = vec![0u8; shared.len()];
        job.restore_region(&rank.regions[1], &mut out).unwrap();
        assert!(out == shared);
    }
}

/// One chunk per pack (a pack size of one byte): hundreds of packs are
/// indexed and verified with a bounded number of them open.
#[test]
fn many_packs_are_read_with_few_open_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = Store::create(dir.path().join("store"))
        .unwrap()
        .job(JOB)
        .unwrap();
    let data: Vec<u8> = (0..25).flat_map(|seed| state(seed + 10)).collect();
    let tiny = WriterConfig {
        layout: ChunkLayout::Packs { max_bytes: 1 },
        ..config()
    };
    write_epoch_as(&job, 1, &data, tiny).unwrap();
    let manifest = job.commit_epoch(1, 1, CHUNK as u32).unwrap();
    let packs = job.list_packs().unwrap().len();
    assert_eq!(packs, 200);
    assert_eq!(job.load_job_index().unwrap().chunks.len(), 200);
    assert!(job.verify_manifest(&manifest).is_ok());
    assert!(restore(&job, &manifest) == data);
    assert!(
        job.packs.open_files() <= 128,
        "{} packs open",
        job.packs.open_files()
    );
}

#[test]
fn another_users_job_is_named_as_such_not_as_missing() {
    let fixture = Fixture::new();
    let theirs = fixture.root.join(JOB).join("epochs");
    let fs = Arc::new(FaultFs::real().fail_matching(
        FsOp::Stat,
        move |path| path == theirs,
        Errno::EACCES,
    ));
    let store = Store::open_with_fs(&fixture.root, Arc::clone(&fs) as _).unwrap();
    let err = store.existing_job(JOB).unwrap_err();
    assert!(matches!(err, StoreError::NotYours { .. }), "{err:?}");
    assert!(err.to_string().contains("is another user's"), "{err}");
    // A job that is not there at all is still told as missing.
    let err = store.existing_job("absent").unwrap_err();
    assert!(matches!(err, StoreError::UnknownJob { .. }), "{err:?}");
}

/// A newest epoch a restart found damaged does not count among those
/// retention keeps: the sound epochs a restart falls back to stay.
#[test]
fn retention_does_not_count_an_epoch_noted_damaged() {
    let fixture = Fixture::new();
    let job = fixture.real_job();
    for epoch in [2, 3] {
        write_epoch(&job, epoch, &state(epoch)).unwrap();
        job.commit_epoch(epoch, 1, CHUNK as u32).unwrap();
    }
    job.mark_damaged(3, "fails verification").unwrap();
    assert_eq!(job.damaged_epochs().unwrap(), vec![3]);
    assert_eq!(job.apply_retention(1).unwrap(), vec![1]);
    assert_eq!(job.committed_epochs().unwrap(), vec![2, 3]);
    write_epoch(&job, 4, &state(4)).unwrap();
    job.commit_epoch(4, 1, CHUNK as u32).unwrap();
    // Epoch 4 is sound: 2 goes, and the damaged 3 with its note.
    assert_eq!(job.apply_retention(1).unwrap(), vec![2, 3]);
    assert_eq!(job.committed_epochs().unwrap(), vec![4]);
    assert!(job.damaged_epochs().unwrap().is_empty());
}
