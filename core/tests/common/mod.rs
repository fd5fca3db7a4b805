//! What the store's integration tests share: the golden stores' region, a
//! writable copy of a golden store, and a fresh store with epochs written
//! into it.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;

use cryo_core::format::chunk::ChunkCodec;
use cryo_core::format::manifest::{
    FdKind, FdRecord, FdRestore, RankRecord, RegionKind, WriteStats,
};
use cryo_core::store::writer::{ChunkLayout, WriterConfig};
use cryo_core::store::{JobStore, Store};
use cryo_core::Manifest;

/// The chunk size the tests (and the golden images) cut regions with.
pub const CHUNK: usize = 64 << 10;

/// Deterministic content of every golden store's region. Never change it:
/// the committed golden images hold exactly these bytes.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn golden_region() -> Vec<u8> {
    (0..CHUNK * 2 + 1000)
        .map(|i| ((i as f64 * 0.01).sin() * 100.0) as i8 as u8)
        .collect()
}

/// Region `region` of rank `rank` of `manifest`, as restored.
pub fn restore(job: &JobStore, manifest: &Manifest, rank: usize, region: usize) -> Vec<u8> {
    let record = &manifest.ranks[rank].regions[region];
    let len = usize::try_from(record.len).expect("a region that fits in memory");
    let mut out = vec![0u8; len];
    job.restore_region(record, &mut out)
        .unwrap_or_else(|err| panic!("restoring region {region} of rank {rank}: {err}"));
    out
}

/// Copies the golden store at `golden` to `into` and opens its job, so
/// that a test can write to it.
pub fn golden_copy(golden: &Path, into: &Path) -> JobStore {
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(golden)
        .arg(into)
        .status()
        .map(|status| status.success());
    assert!(
        matches!(copied, Ok(true)),
        "cp -a {}: {copied:?}",
        golden.display()
    );
    Store::open(into)
        .and_then(|store| store.existing_job("golden"))
        .unwrap_or_else(|err| panic!("opening the copy of {}: {err}", golden.display()))
}

pub fn config() -> WriterConfig {
    WriterConfig {
        chunk_size: CHUNK,
        codec: ChunkCodec::default(),
        layout: ChunkLayout::default(),
    }
}

/// Smooth doubles plus noise: what rank state usually looks like.
pub fn state(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut rng = seed | 1;
    let mut i = 0u64;
    while out.len() < len {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let value = (i as f64 * 1e-3).sin() + (rng >> 40) as f64 * 1e-12;
        out.extend_from_slice(&value.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn empty_record() -> RankRecord {
    RankRecord {
        rank: 0,
        node: "node-a".into(),
        pid: 42,
        fds: vec![FdRecord {
            fd: 5,
            kind: FdKind::Regular,
            path: "/tmp/out.log".into(),
            flags: 0o2001,
            offset: 77,
            size_at_checkpoint: 77,
            restore: FdRestore::Restore,
            shares_with: None,
        }],
        mappings: vec![],
        regions: vec![],
        stats: WriteStats::default(),
        warnings: Vec::new(),
        cwd: String::new(),
        process: Default::default(),
    }
}

/// Writes and commits one epoch where rank r holds `regions[r]`.
pub fn write_epoch(job: &JobStore, epoch: u64, ranks: &[Vec<(&str, Vec<u8>)>]) -> Manifest {
    let writer = job.begin_epoch(epoch, config()).unwrap();
    for (rank, regions) in ranks.iter().enumerate() {
        let rank_writer = writer.rank(rank as u32);
        let mut record = empty_record();
        for (index, (name, data)) in regions.iter().enumerate() {
            let addr = 0x7f00_0000_0000 + (index as u64) * (1 << 32);
            record.regions.push(
                rank_writer
                    .store_region(name, addr, RegionKind::Anonymous, data)
                    .unwrap(),
            );
        }
        rank_writer.finish(record).unwrap();
    }
    drop(writer);
    job.commit_epoch(epoch, ranks.len() as u32, CHUNK as u32)
        .unwrap()
}

pub fn setup() -> (tempfile::TempDir, Store, JobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let job = store.job("heat").unwrap();
    (dir, store, job)
}
