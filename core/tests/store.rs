//! Store behaviour on a real filesystem: round trips, incremental epochs,
//! crashes before commit, corruption, retention and GC.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::fs;
use std::path::Path;

use cryo_core::format::manifest::{FdKind, FdRecord, FdRestore, RegionKind};
use cryo_core::format::pack::ChunkPlace;
use cryo_core::store::writer::BeginError;
use cryo_core::store::GcOptions;
use cryo_core::store::{CommitError, EpochState, EpochSummary, JobStore, LoadProblem, Store};
use cryo_core::Manifest;

mod common;
use common::{
    config, empty_record, golden_copy, golden_region, restore, setup, state, write_epoch, CHUNK,
};

/// Every file under the job's pack area.
fn pack_files(job: &JobStore) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for fanout in fs::read_dir(job.packs_dir()).unwrap() {
        for entry in fs::read_dir(fanout.unwrap().path()).unwrap() {
            out.push(entry.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Chunks stored in the job's packs, counted from the packs themselves.
fn stored_chunks(job: &JobStore) -> usize {
    job.load_job_index().unwrap().chunks.len()
}

/// Flips one bit `back` bytes before the end of `chunk`'s stored bytes.
fn flip_stored_byte(job: &JobStore, chunk: &cryo_core::format::manifest::ChunkRef, at: u64) {
    let stored = job.locate_chunk(chunk).expect("chunk is stored");
    let mut bytes = fs::read(&stored.path).unwrap();
    bytes[(stored.offset + at) as usize] ^= 0x01;
    fs::write(&stored.path, bytes).unwrap();
}

#[test]
fn round_trip_two_ranks() {
    let (_dir, store, job) = setup();
    let a = state(1_000_000, 1);
    let b = state(333_333, 2);
    let c = state(CHUNK * 3, 3);
    let manifest = write_epoch(
        &job,
        1,
        &[
            vec![("grid", a.clone()), ("aux", b.clone())],
            vec![("grid", c.clone())],
        ],
    );
    assert_eq!(store.jobs().unwrap(), vec!["heat".to_string()]);
    let loaded = job.load_manifest(1).unwrap();
    assert_eq!(loaded, manifest);
    assert_eq!(loaded.ranks[0].fds[0].offset, 77);
    assert_eq!(restore(&job, &loaded, 0, 0), a);
    assert_eq!(restore(&job, &loaded, 0, 1), b);
    assert_eq!(restore(&job, &loaded, 1, 0), c);
    assert!(job.verify_manifest(&loaded).is_ok());
    // smooth doubles compress well with the shuffle filter
    let summary = EpochSummary::of(&loaded);
    assert!(
        summary.compression_ratio() > 1.2,
        "{}",
        summary.compression_ratio()
    );
}

#[test]
fn streamed_restore_matches() {
    let (_dir, _store, job) = setup();
    let a = state(CHUNK * 10 + 17, 9);
    let manifest = write_epoch(&job, 1, &[vec![("grid", a.clone())]]);
    let mut out = Vec::new();
    job.stream_region::<()>(&manifest.ranks[0].regions[0], CHUNK * 3, |offset, bytes| {
        assert_eq!(offset as usize, out.len());
        assert!(bytes.len() <= CHUNK * 3);
        out.extend_from_slice(bytes);
        Ok(())
    })
    .unwrap();
    assert_eq!(out, a);
}

#[test]
fn identical_data_is_stored_once_and_second_epoch_is_incremental() {
    let (_dir, _store, job) = setup();
    let data = state(CHUNK * 40, 5);
    // two ranks with the same data: stored once
    let first = write_epoch(
        &job,
        1,
        &[vec![("grid", data.clone())], vec![("grid", data.clone())]],
    );
    let stats = first.stats();
    assert_eq!(stats.chunks, 80);
    assert_eq!(stats.new_chunks, 40);
    assert!(EpochSummary::of(&first).dedup_savings() > 0.49);

    // change 2 of 40 chunks (5%) in rank 0
    let mut changed = data.clone();
    for chunk in [3usize, 17] {
        changed[chunk * CHUNK + 100] ^= 0xff;
    }
    let second = write_epoch(
        &job,
        2,
        &[
            vec![("grid", changed.clone())],
            vec![("grid", data.clone())],
        ],
    );
    let stats2 = second.stats();
    assert_eq!(stats2.new_chunks, 2);
    assert!(stats2.new_stored_bytes * 10 <= stats.new_stored_bytes);
    assert_eq!(restore(&job, &second, 0, 0), changed);
    assert_eq!(restore(&job, &first, 0, 0), data);
}

#[test]
fn crash_before_commit_leaves_previous_epoch_intact() {
    let (_dir, _store, job) = setup();
    let data = state(CHUNK * 4, 7);
    write_epoch(
        &job,
        1,
        &[vec![("grid", data.clone())], vec![("grid", data.clone())]],
    );

    // Epoch 2: only rank 0 reaches durability, then the writer "dies".
    {
        let writer = job.begin_epoch(2, config()).unwrap();
        let rank0 = writer.rank(0);
        let mut record = empty_record();
        record.regions.push(
            rank0
                .store_region("grid", 1, RegionKind::Anonymous, &state(CHUNK * 4, 8))
                .unwrap(),
        );
        rank0.finish(record).unwrap();
    }
    let err = job.commit_epoch(2, 2, CHUNK as u32).unwrap_err();
    assert!(
        matches!(
            err,
            CommitError::MissingRank {
                rank: 1,
                epoch: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(job.latest_committed().unwrap(), Some(1));
    assert_eq!(
        job.epochs().unwrap().get(&2),
        Some(&EpochState::Partial { parts: 1 })
    );
    let manifest = job.load_manifest(1).unwrap();
    assert_eq!(restore(&job, &manifest, 1, 0), data);

    // GC removes the abandoned epoch and its pack, keeps epoch 1's.
    let report = job.gc(None).unwrap();
    assert_eq!(report.removed_partial_epochs, vec![2]);
    assert_eq!(report.removed_packs, 1, "{report:?}");
    assert_eq!(stored_chunks(&job), 4);
    assert!(job.verify_manifest(&manifest).is_ok());
    assert!(!job.epochs().unwrap().contains_key(&2));
}

#[test]
fn epochs_must_increase_and_commit_once() {
    let (_dir, _store, job) = setup();
    write_epoch(&job, 5, &[vec![("grid", state(100, 1))]]);
    assert!(matches!(
        job.begin_epoch(5, config()),
        Err(BeginError::NotNewer {
            epoch: 5,
            latest: 5,
            ..
        })
    ));
    assert!(matches!(
        job.begin_epoch(3, config()),
        Err(BeginError::NotNewer { .. })
    ));
    assert!(matches!(
        job.commit_epoch(5, 1, CHUNK as u32),
        Err(CommitError::AlreadyCommitted { epoch: 5, .. })
    ));
}

fn corrupt_one_chunk(job: &JobStore, manifest: &Manifest) -> cryo_core::ChunkHash {
    let chunk = manifest.ranks[0].regions[0].chunks[1];
    flip_stored_byte(job, &chunk, u64::from(chunk.stored_len) - 10);
    chunk.hash
}

#[test]
fn corrupt_chunk_is_detected_by_verify_and_restore() {
    let (_dir, _store, job) = setup();
    let manifest = write_epoch(
        &job,
        1,
        &[
            vec![("grid", state(CHUNK * 4, 1))],
            vec![("other", state(CHUNK * 2, 2))],
        ],
    );
    let hash = corrupt_one_chunk(&job, &manifest);
    let report = job.verify_manifest(&manifest);
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].rank, 0);
    assert_eq!(report.bad[0].region, "grid");
    assert_eq!(report.bad[0].offset, CHUNK as u64);
    assert_eq!(report.bad[0].hash, hash);
    assert!(
        report.bad[0].problem.contains("corrupt"),
        "{}",
        report.bad[0].problem
    );

    let record = &manifest.ranks[0].regions[0];
    let mut out = vec![0u8; record.len as usize];
    let err = job.restore_region(record, &mut out).unwrap_err();
    assert_eq!(err.offset, CHUNK as u64);
    assert!(err.to_string().contains("grid"), "{err}");
}

/// The restart's check looks at chunks as stored: it finds a damaged
/// payload, a damaged entry header, a truncated entry and a missing pack
/// without decoding anything, and only a well-formed entry holding other
/// contents than its header says is left to the full verification (and to
/// the rank's hash check at restore).
#[test]
fn the_stored_check_finds_damaged_truncated_and_missing_chunks() {
    let (_dir, _store, job) = setup();
    let manifest = write_epoch(&job, 1, &[vec![("grid", state(CHUNK * 4, 1))]]);
    assert!(job.check_manifest(&manifest).is_ok());
    let chunks = manifest.ranks[0].regions[0].chunks.clone();
    let offset_in_pack =
        |c: &cryo_core::format::manifest::ChunkRef| job.locate_chunk(c).unwrap().offset;
    // The last entry of the pack is truncated, one other's payload and a
    // third's entry header are damaged.
    let mut by_place: Vec<_> = chunks.iter().collect();
    by_place.sort_by_key(|c| offset_in_pack(c));
    let (last, payload, header) = (by_place[3], by_place[0], by_place[1]);
    flip_stored_byte(&job, payload, u64::from(payload.stored_len) - 10);
    let stored = job.locate_chunk(header).unwrap();
    let mut bytes = fs::read(&stored.path).unwrap();
    bytes[(stored.offset - 30) as usize] ^= 0x01; // inside the entry's hash
    fs::write(&stored.path, &bytes).unwrap();
    let cut = offset_in_pack(last) + u64::from(last.stored_len) / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(&stored.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let report = job.check_manifest(&manifest);
    let mut offsets: Vec<u64> = report.bad.iter().map(|b| b.offset).collect();
    offsets.sort_unstable();
    let mut expected = vec![last.offset, payload.offset, header.offset];
    expected.sort_unstable();
    assert_eq!(offsets, expected, "{:?}", report.bad);
    // A fresh reader (no cached index) agrees, and restore names a chunk.
    let fresh = Store::open(job.dir().parent().unwrap())
        .unwrap()
        .job("heat")
        .unwrap();
    assert_eq!(fresh.check_manifest(&manifest).bad.len(), 3);

    // A valid entry under another chunk's name: stored whole, so only
    // decoding finds it. Incompressible chunks have equal stored lengths.
    let (_dir, _store, job) = setup();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..CHUNK * 2)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 32) as u8
        })
        .collect();
    let manifest = write_epoch(&job, 1, &[vec![("grid", noise)]]);
    let chunks = &manifest.ranks[0].regions[0].chunks;
    assert_eq!(chunks[0].stored_len, chunks[1].stored_len);
    let (from, to) = (
        job.locate_chunk(&chunks[0]).unwrap(),
        job.locate_chunk(&chunks[1]).unwrap(),
    );
    let mut bytes = fs::read(&from.path).unwrap();
    let blob = bytes[from.offset as usize..(from.offset + from.len) as usize].to_vec();
    bytes[to.offset as usize..(to.offset + to.len) as usize].copy_from_slice(&blob);
    fs::write(&to.path, bytes).unwrap();
    assert!(job.check_manifest(&manifest).is_ok());
    let full = job.verify_manifest(&manifest);
    assert_eq!(full.bad.len(), 1, "{:?}", full.bad);
    assert_eq!(full.bad[0].offset, CHUNK as u64);
}

#[test]
fn missing_pack_is_reported() {
    let (_dir, _store, job) = setup();
    let manifest = write_epoch(&job, 1, &[vec![("grid", state(CHUNK * 2, 1))]]);
    for pack in pack_files(&job) {
        fs::remove_file(pack).unwrap();
    }
    let report = job.verify_manifest(&manifest);
    assert_eq!(report.bad.len(), 2);
    assert!(
        report.bad[0].problem.contains("missing"),
        "{}",
        report.bad[0].problem
    );
}

fn load_problem(job: &JobStore, epoch: u64) -> (String, LoadProblem) {
    let err = job.load_manifest(epoch).unwrap_err();
    let text = err.to_string();
    (text, err.problem)
}

#[test]
fn damaged_manifests_are_refused_naming_the_file() {
    let (_dir, _store, job) = setup();
    write_epoch(&job, 1, &[vec![("grid", state(1000, 1))]]);
    let path = job.manifest_path(1);
    let good = fs::read(&path).unwrap();
    let writable = |bytes: &[u8]| {
        let _ = fs::remove_file(&path);
        fs::write(&path, bytes).unwrap();
    };

    writable(&good[..good.len() - 5]);
    let (text, problem) = load_problem(&job, 1);
    assert!(matches!(problem, LoadProblem::Length { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    writable(&flipped);
    assert!(matches!(load_problem(&job, 1).1, LoadProblem::Checksum));

    writable(&good[..30]);
    assert!(matches!(load_problem(&job, 1).1, LoadProblem::Header(_)));

    writable(b"");
    assert!(matches!(load_problem(&job, 1).1, LoadProblem::Header(_)));

    writable(&good);
    job.load_manifest(1).unwrap();

    fs::remove_file(&path).unwrap();
    assert!(matches!(load_problem(&job, 1).1, LoadProblem::Read(_)));
}

#[test]
fn manifest_under_another_epoch_name_is_refused() {
    let (_dir, _store, job) = setup();
    write_epoch(&job, 1, &[vec![("grid", state(1000, 1))]]);
    fs::copy(job.manifest_path(1), job.manifest_path(7)).unwrap();
    let (text, problem) = load_problem(&job, 7);
    assert!(matches!(problem, LoadProblem::Invalid(_)), "{text}");
    assert!(text.contains("epoch 1"), "{text}");
}

#[test]
fn retention_and_gc_free_only_unreferenced_chunks() {
    let (_dir, _store, job) = setup();
    let base = state(CHUNK * 8, 1);
    let mut epochs = Vec::new();
    for epoch in 1..=4u64 {
        let mut data = base.clone();
        data[(epoch as usize) * CHUNK] ^= epoch as u8; // one chunk differs per epoch
        epochs.push(data.clone());
        write_epoch(&job, epoch, &[vec![("grid", data)]]);
    }
    // Epoch 1 stores 8 chunks; epoch 2 its changed chunk and base chunk 1
    // (epoch 1 had changed it); epochs 3 and 4 only their changed chunk:
    // base chunk 2, last stored by epoch 1, is found in the chunk index.
    assert_eq!(stored_chunks(&job), 8 + 2 + 1 + 1);
    assert_eq!(pack_files(&job).len(), 4);
    // Epoch 2's pack keeps only base chunk 1 alive once epochs 1 and 2 go:
    // it is repacked; epoch 1's pack is mostly alive and stays.
    let report = job
        .gc_with(GcOptions {
            keep: Some(2),
            repack_below: 0.6,
        })
        .unwrap();
    assert_eq!(report.removed_epochs, vec![1, 2]);
    assert_eq!(job.committed_epochs().unwrap(), vec![3, 4]);
    assert_eq!(report.repacked_packs, 1, "{report:?}");
    assert_eq!(report.moved_chunks, 1, "{report:?}");
    assert_eq!(report.new_packs, 1, "{report:?}");
    assert_eq!(report.removed_packs, 0, "{report:?}");
    assert_eq!(pack_files(&job).len(), 4);
    // 7 live chunks of epoch 1, base chunk 1, and epochs 3 and 4's own are
    // live; epoch 1's changed chunk 1 stays, dead, in its mostly live pack.
    assert_eq!(report.live_chunks, 10, "{report:?}");
    assert_eq!(stored_chunks(&job), 11);
    // Epochs 3 and 4 reference base chunk 1 in the deleted pack: read
    // through the chunk index, or, without it, every pack's index.
    for drop_index in [false, true] {
        if drop_index {
            for epoch in job.chunk_index_epochs().unwrap() {
                fs::remove_file(job.chunk_index_path(epoch)).unwrap();
            }
        }
        let fresh = Store::open(job.dir().parent().unwrap())
            .unwrap()
            .job("heat")
            .unwrap();
        for epoch in [3u64, 4] {
            let manifest = fresh.load_manifest(epoch).unwrap();
            assert!(fresh.verify_manifest(&manifest).is_ok());
            assert_eq!(
                restore(&fresh, &manifest, 0, 0),
                epochs[(epoch - 1) as usize]
            );
        }
    }
    // Epoch 5 reuses base chunk 1 where it now is, and writes nothing new.
    let manifest = write_epoch(&job, 5, &[vec![("grid", epochs[3].clone())]]);
    assert_eq!(manifest.stats().new_chunks, 0);
    assert_eq!(restore(&job, &manifest, 0, 0), epochs[3]);
    // Once no epoch references epoch 1's pack but for a few chunks, the
    // default GC deletes dead packs whole.
    let report = job.gc(Some(1)).unwrap();
    assert_eq!(job.committed_epochs().unwrap(), vec![5]);
    let manifest = job.load_manifest(5).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok(), "{report:?}");
    assert_eq!(restore(&job, &manifest, 0, 0), epochs[3]);
}

#[test]
fn gc_never_sweeps_while_an_epoch_is_being_written() {
    let (_dir, _store, job) = setup();
    write_epoch(&job, 1, &[vec![("grid", state(CHUNK * 2, 1))]]);
    let writer = job.begin_epoch(2, config()).unwrap();
    let rank = writer.rank(0);
    let region = rank
        .store_region("grid", 1, RegionKind::Anonymous, &state(CHUNK * 2, 99))
        .unwrap();
    let before = pack_files(&job);
    let report = job.gc(None).unwrap();
    assert!(report.skipped.is_some());
    assert_eq!(pack_files(&job), before);
    let mut record = empty_record();
    record.regions.push(region);
    rank.finish(record).unwrap();
    drop(writer);
    let manifest = job.commit_epoch(2, 1, CHUNK as u32).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
}

#[test]
fn gc_refuses_to_sweep_when_a_manifest_is_unreadable() {
    let (_dir, _store, job) = setup();
    write_epoch(&job, 1, &[vec![("grid", state(CHUNK * 2, 1))]]);
    write_epoch(&job, 2, &[vec![("grid", state(CHUNK * 2, 2))]]);
    let path = job.manifest_path(1);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::remove_file(&path).unwrap();
    fs::write(&path, bytes).unwrap();
    let before = pack_files(&job);
    let err = job.gc(None).unwrap_err();
    assert!(err.to_string().contains("refusing"), "{err}");
    assert_eq!(pack_files(&job), before);
}

#[test]
fn store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, store, job) = setup();
    let manifest = write_epoch(&job, 1, &[vec![("grid", state(1000, 1))]]);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.root()), 0o700);
    assert_eq!(mode(job.dir()), 0o700);
    assert_eq!(mode(&job.manifest_path(1)), 0o600);
    let pack = job
        .locate_chunk(&manifest.ranks[0].regions[0].chunks[0])
        .unwrap()
        .path;
    assert_eq!(mode(&pack), 0o600);
    assert_eq!(mode(pack.parent().unwrap()), 0o700);
}

#[test]
fn hostile_job_names_are_refused() {
    let (_dir, store, _job) = setup();
    for name in ["..", "../x", "a/b", ".hidden", ""] {
        assert!(store.job(name).is_err(), "{name:?}");
    }
    assert!(store.existing_job("nosuchjob").is_err());
}

/// A tmpfs of `bytes`, unmounted on drop; `None` (with a loud message) where
/// mounting is not permitted.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => Some(SmallFs { dir }),
            _ => {
                eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root); full-disk behaviour untested");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn full_disk_aborts_the_epoch_and_keeps_the_previous_one() {
    let Some(small) = SmallFs::mount(3 << 20) else {
        return;
    };
    let store = Store::create(small.dir.path().join("store")).unwrap();
    let job = store.job("heat").unwrap();
    let first = state(CHUNK * 8, 1);
    write_epoch(&job, 1, &[vec![("grid", first.clone())]]);

    // Incompressible data larger than the free space.
    let mut noise = vec![0u8; 4 << 20];
    let mut rng = 0x1234_5678_9abc_def1u64;
    for byte in &mut noise {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *byte = (rng >> 24) as u8;
    }
    let writer = job.begin_epoch(2, config()).unwrap();
    let rank = writer.rank(0);
    let err = rank
        .store_region("grid", 1, RegionKind::Anonymous, &noise)
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("the store is full"), "{text}");
    drop(writer);
    job.discard_pending(2).unwrap();

    assert_eq!(job.committed_epochs().unwrap(), vec![1]);
    let manifest = job.load_manifest(1).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
    assert_eq!(restore(&job, &manifest, 0, 0), first);
    // GC clears what the failed epoch left, and nothing of epoch 1.
    job.gc(None).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
    drop(job);
    drop(store);
}

fn golden_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1.0.0")
}

/// Images written by format 1.0.0 must stay readable by every later build.
#[test]
fn golden_v1_0_0_store_still_loads() {
    let store = Store::open(golden_dir()).unwrap();
    let job = store.existing_job("golden").unwrap();
    let manifest = job.load_manifest(1).unwrap();
    assert_eq!(manifest.world_size, 1);
    assert_eq!(manifest.ranks[0].fds[0].path, "/tmp/out.log");
    assert_eq!(restore(&job, &manifest, 0, 0), golden_region());
    assert!(job.verify_manifest(&manifest).is_ok());
}

/// Regenerates the golden store; run by hand only when adding a new
/// format version's golden images (never overwrite an old one).
#[test]
#[ignore = "writes the golden images"]
fn write_golden_store() {
    let dir = golden_dir();
    assert!(
        !dir.exists(),
        "golden images for this version already exist"
    );
    let store = Store::create(&dir).unwrap();
    let job = store.job("golden").unwrap();
    write_epoch(&job, 1, &[vec![("grid", golden_region())]]);
    let _ = fs::remove_file(job.dir().join("lock"));
}

fn golden_v1_1_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1.1.0")
}

/// The 1.1 rank record: a dup, an unlinked file and an application
/// mapping, besides the region.
fn golden_v1_1_epoch(job: &JobStore) {
    let writer = job.begin_epoch(1, config()).unwrap();
    let rank_writer = writer.rank(0);
    let mut record = empty_record();
    let mut dup = record.fds[0].clone();
    dup.fd = 9;
    dup.shares_with = Some(5);
    let unlinked = FdRecord {
        fd: 11,
        kind: FdKind::Deleted,
        path: "/tmp/scratch".into(),
        flags: 0o2,
        offset: 3,
        size_at_checkpoint: 10,
        restore: FdRestore::Restore,
        shares_with: None,
    };
    record.fds.extend([dup, unlinked]);
    record
        .warnings
        .push("fd 5 (/tmp/out.log) holds a file lock".into());
    let grid = golden_region();
    record.regions.push(
        rank_writer
            .store_region("grid", 0x7f00_0000_0000, RegionKind::Anonymous, &grid)
            .unwrap(),
    );
    record.regions.push(
        rank_writer
            .store_region(
                "cryo:fd:11",
                0,
                RegionKind::UnlinkedFile { fd: 11 },
                b"0123456789",
            )
            .unwrap(),
    );
    record.regions.push(
        rank_writer
            .store_region(
                "cryo:map:7f1000000000",
                0x7f10_0000_0000,
                RegionKind::AppMapping {
                    path: "/tmp/map.dat".into(),
                    offset: 4096,
                    shared: true,
                    prot: 3,
                    map_len: 8192,
                },
                &grid[..4096],
            )
            .unwrap(),
    );
    rank_writer.finish(record).unwrap();
    drop(writer);
    job.commit_epoch(1, 1, CHUNK as u32).unwrap();
}

/// Images written by format 1.1.0 (shared fds, unlinked files,
/// application mappings) must stay readable by every later build.
#[test]
fn golden_v1_1_0_store_still_loads() {
    let store = Store::open(golden_v1_1_dir()).unwrap();
    let job = store.existing_job("golden").unwrap();
    let manifest = job.load_manifest(1).unwrap();
    let rank = &manifest.ranks[0];
    assert_eq!(rank.fds[1].shares_with, Some(5));
    assert_eq!(rank.fds[2].kind, FdKind::Deleted);
    assert_eq!(rank.warnings.len(), 1);
    assert!(matches!(
        rank.regions[2].kind,
        RegionKind::AppMapping { map_len: 8192, .. }
    ));
    assert_eq!(restore(&job, &manifest, 0, 0), golden_region());
    assert_eq!(restore(&job, &manifest, 0, 1), b"0123456789");
    assert!(job.verify_manifest(&manifest).is_ok());
}

/// A job checkpointed by format 1 goes on under format 2: the next epoch
/// references the unchanged format 1 chunk files where they are and packs
/// only what changed, both epochs restore, and GC collects the chunk files
/// and the packs alike.
#[test]
fn a_format_1_store_takes_format_2_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let job = golden_copy(&golden_v1_1_dir(), &dir.path().join("store"));
    let old = job.load_manifest(1).unwrap();
    let mut changed = golden_region();
    changed[10] ^= 0xff;
    let writer = job.begin_epoch(2, config()).unwrap();
    let rank = writer.rank(0);
    let mut record = empty_record();
    record.regions = vec![rank
        .store_region("grid", 0x7f00_0000_0000, RegionKind::Anonymous, &changed)
        .unwrap()];
    rank.finish(record).unwrap();
    drop(writer);
    let new = job.commit_epoch(2, 1, CHUNK as u32).unwrap();
    let chunks = &new.ranks[0].regions[0].chunks;
    assert!(
        matches!(chunks[0].place, ChunkPlace::Pack { .. }),
        "{:?}",
        chunks[0]
    );
    assert_eq!(
        chunks[1].place,
        ChunkPlace::Loose,
        "unchanged chunk rewritten"
    );
    assert_eq!(new.stats().new_chunks, 1);
    assert_eq!(restore(&job, &new, 0, 0), changed);
    assert_eq!(restore(&job, &old, 0, 0), golden_region());
    let report = job.gc(Some(1)).unwrap();
    assert!(report.removed_chunks >= 1, "{report:?}");
    assert!(job.verify_manifest(&new).is_ok());
    assert_eq!(restore(&job, &new, 0, 0), changed);
}

/// Regenerates the 1.1.0 golden store; by hand only (never overwrite).
#[test]
#[ignore = "writes the golden images"]
fn write_golden_v1_1_store() {
    let dir = golden_v1_1_dir();
    assert!(
        !dir.exists(),
        "golden images for this version already exist"
    );
    let store = Store::create(&dir).unwrap();
    let job = store.job("golden").unwrap();
    golden_v1_1_epoch(&job);
    let _ = fs::remove_file(job.dir().join("lock"));
}
