//! What the store's tests share: bytes that do not deduplicate, and an
//! empty rank record.

use crate::format::manifest::RankRecord;

/// `len` bytes that differ from chunk to chunk and from seed to seed, so
/// that no chunk of one test's state deduplicates against another's.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 56) as u8
        })
        .collect()
}

/// Rank `rank`'s record with nothing in it yet.
pub(crate) fn empty_record(rank: u32) -> RankRecord {
    RankRecord::new(rank, "node-a", 42)
}
