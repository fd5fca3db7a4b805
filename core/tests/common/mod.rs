//! What the store's integration tests share: the golden stores' region and
//! a writable copy of a golden store.
#![allow(dead_code)]

use std::path::Path;

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
