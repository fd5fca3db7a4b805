//! A region restored into fresh (zeroed) memory leaves its chunks of zeros
//! unwritten, so pages the rank never used are not faulted in at a restart.
#![allow(clippy::unwrap_used)]

mod common;
use common::{setup, state, write_epoch, CHUNK};

#[test]
fn chunks_of_zeros_are_not_written_onto_zeroed_memory() {
    let (_dir, _store, job) = setup();
    let mut region = vec![0u8; CHUNK * 4];
    region[CHUNK..2 * CHUNK].copy_from_slice(&state(CHUNK, 7));
    region[3 * CHUNK..].copy_from_slice(&state(CHUNK, 8));
    let manifest = write_epoch(&job, 1, &[vec![("sparse", region.clone())]]);
    let record = &manifest.ranks[0].regions[0];

    // A sentinel shows which bytes the restore wrote.
    let mut onto_zeros = vec![0xAAu8; region.len()];
    job.restore_region_onto_zeros(record, &mut onto_zeros)
        .unwrap();
    assert!(
        onto_zeros[..CHUNK].iter().all(|&b| b == 0xAA),
        "chunk 0 was written"
    );
    assert!(
        onto_zeros[2 * CHUNK..3 * CHUNK].iter().all(|&b| b == 0xAA),
        "chunk 2 was written"
    );
    assert_eq!(onto_zeros[CHUNK..2 * CHUNK], region[CHUNK..2 * CHUNK]);
    assert_eq!(onto_zeros[3 * CHUNK..], region[3 * CHUNK..]);

    // The ordinary restore writes every byte.
    let mut whole = vec![0xAAu8; region.len()];
    job.restore_region(record, &mut whole).unwrap();
    assert_eq!(whole, region);
}
