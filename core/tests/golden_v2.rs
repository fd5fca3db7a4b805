//! Images written by format 2.0 (packs; chunk headers without the raw
//! check that 2.1 added) must stay readable by every later build, and a job
//! checkpointed by 2.0 must go on under the current format. The images in
//! `tests/golden/v2.0.0` were written by the 2.0 build with the same record
//! as the 1.1 golden store (`golden_v1_1_epoch` in `store.rs`); never
//! regenerate them. Those in `tests/golden/v2.4.0` were written by the
//! 2.4 build, the last before a rank's process attributes.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use cryo_core::format::chunk::ChunkCodec;
use cryo_core::format::header::{FileKind, Header};
use cryo_core::format::manifest::{FdKind, RegionKind};
use cryo_core::format::pack::ChunkPlace;
use cryo_core::format::process::ProcessAttrs;
use cryo_core::store::writer::{ChunkLayout, WriterConfig};
use cryo_core::store::Store;

mod common;
use common::{golden_copy, golden_region, restore, CHUNK};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v2.0.0")
}

#[test]
fn golden_v2_0_0_store_still_loads() {
    let manifest_file = golden_dir().join("golden/epochs/00000000000000000001.manifest");
    let header = Header::parse(&std::fs::read(manifest_file).unwrap()).unwrap();
    assert_eq!(header.kind, FileKind::Manifest);
    assert_eq!((header.version.major, header.version.minor), (2, 0));

    let store = Store::open(golden_dir()).unwrap();
    let job = store.existing_job("golden").unwrap();
    let manifest = job.load_manifest(1).unwrap();
    let rank = &manifest.ranks[0];
    assert_eq!(rank.fds[1].shares_with, Some(5));
    assert_eq!(rank.fds[2].kind, FdKind::Deleted);
    assert_eq!(rank.cwd, "", "not recorded before 2.4");
    assert!(rank.regions[0]
        .chunks
        .iter()
        .all(|chunk| matches!(chunk.place, ChunkPlace::Pack { .. })));
    // Decoded and checked by their names: these chunks have no raw check.
    assert_eq!(restore(&job, &manifest, 0, 0), golden_region());
    assert_eq!(restore(&job, &manifest, 0, 1), b"0123456789");
    assert!(job.verify_manifest(&manifest).is_ok());
}

/// A 2.0 job goes on: the next epoch, written now, references the 2.0
/// chunks it did not change and packs the changed one with a raw check;
/// both epochs restore and verify, and GC keeps what the newer one needs.
#[test]
fn a_format_2_0_job_takes_epochs_of_the_current_format() {
    let dir = tempfile::tempdir().unwrap();
    let job = golden_copy(&golden_dir(), &dir.path().join("store"));
    let old = job.load_manifest(1).unwrap();

    let mut changed = golden_region();
    changed[CHUNK + 10] ^= 0xff;
    let config = WriterConfig {
        chunk_size: CHUNK,
        codec: ChunkCodec::default(),
        layout: ChunkLayout::default(),
    };
    let writer = job.begin_epoch(2, config).unwrap();
    let rank = writer.rank(0);
    let mut record = old.ranks[0].clone();
    record.regions = old.ranks[0]
        .regions
        .iter()
        .enumerate()
        .map(|(index, region)| {
            let bytes = if index == 0 {
                changed.clone()
            } else {
                restore(&job, &old, 0, index)
            };
            rank.store_region(&region.name, region.addr, region.kind.clone(), &bytes)
                .unwrap()
        })
        .collect();
    rank.finish(record).unwrap();
    drop(writer);
    let new = job.commit_epoch(2, 1, CHUNK as u32).unwrap();
    assert_eq!(new.stats().new_chunks, 1);
    let (old_chunks, new_chunks) = (
        &old.ranks[0].regions[0].chunks,
        &new.ranks[0].regions[0].chunks,
    );
    assert_eq!(
        new_chunks[0], old_chunks[0],
        "an unchanged chunk was rewritten"
    );
    assert_ne!(new_chunks[1].hash, old_chunks[1].hash);

    assert_eq!(restore(&job, &new, 0, 0), changed);
    assert_eq!(restore(&job, &new, 0, 1), b"0123456789");
    assert_eq!(restore(&job, &old, 0, 0), golden_region());
    assert!(job.verify_manifest(&old).is_ok());
    assert!(job.verify_manifest(&new).is_ok());
    job.gc(Some(1)).unwrap();
    assert!(job.verify_manifest(&new).is_ok());
    assert_eq!(restore(&job, &new, 0, 0), changed);
}

/// Images written by format 2.4 (the working directory; files saved
/// through an fd and whole by path) load under 2.5 with no process
/// attributes: a restart keeps the launcher's umask and makes files with a
/// new file's mode. Written by the 2.4 build; never regenerate them.
#[test]
fn golden_v2_4_0_store_still_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v2.4.0");
    let header = Header::parse(
        &std::fs::read(dir.join("golden/epochs/00000000000000000001.manifest")).unwrap(),
    )
    .unwrap();
    assert_eq!((header.version.major, header.version.minor), (2, 4));
    let job = Store::open(&dir).unwrap().existing_job("golden").unwrap();
    let manifest = job.load_manifest(1).unwrap();
    let rank = &manifest.ranks[0];
    assert_eq!(rank.cwd, "/work/run");
    assert_eq!(rank.process, ProcessAttrs::default());
    assert_eq!(rank.regions[1].kind, RegionKind::FileContents { fd: 5 });
    assert_eq!(
        rank.regions[2].kind,
        RegionKind::NodeFileContents {
            path: "/scratch/table.bin".into()
        }
    );
    assert_eq!(restore(&job, &manifest, 0, 0), golden_region());
    assert_eq!(restore(&job, &manifest, 0, 2), b"table");
    assert!(job.verify_manifest(&manifest).is_ok());
}
