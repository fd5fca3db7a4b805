//! Helpers shared by the unit tests of several modules.

use std::sync::Mutex;

use cryo_core::format::limits::MIN_CHUNK_SIZE;
use cryo_core::format::manifest::{RegionKind, RegionRecord};
use cryo_core::store::writer::WriterConfig;
use cryo_core::store::JobStore;

/// The table of closed files is one per process: tests that capture or
/// change it take turns.
pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

/// Stores `contents` as region `name` of `rank` in epoch 1 of `job`, in
/// chunks of the smallest size, so that a few KiB make several chunks.
pub(crate) fn store_small_chunks(
    job: &JobStore,
    rank: u32,
    name: &str,
    kind: RegionKind,
    contents: &[u8],
) -> RegionRecord {
    let writer = job
        .begin_epoch(
            1,
            WriterConfig {
                chunk_size: MIN_CHUNK_SIZE,
                ..WriterConfig::default()
            },
        )
        .unwrap();
    writer
        .rank(rank)
        .store_region(name, 0, kind, contents)
        .unwrap()
}
