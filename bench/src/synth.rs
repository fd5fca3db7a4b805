//! Synthetic rank state for benchmarks, shaped like a solver's memory.
//!
//! Benchmarks on a constant or a counter pattern compress 20× or more and
//! flatter every figure. Real rank state is mostly floating-point fields
//! whose low mantissa bytes are noise, plus integer index arrays (mesh
//! connectivity, CSR column indices) and zero-filled parts (halos, unused
//! capacity). [`mixed_state`] lays those out as 60% / 25% / 15% of the
//! bytes, deterministic for a seed. [`smooth_doubles_parallel`] fills
//! gigabytes of smooth doubles alone on every core, for the store benchmark.

use rayon::prelude::*;

/// Share of the bytes that are smooth doubles plus noise.
pub const DOUBLES_SHARE: f64 = 0.60;
/// Share of the bytes that are integer index arrays.
pub const INDICES_SHARE: f64 = 0.25;

/// Fills `out` with smooth doubles plus noise, then integer index arrays,
/// then zeros (60/25/15%). Each part starts on an 8-byte boundary.
pub fn mixed_state(out: &mut [u8], seed: u64) {
    let len = out.len();
    let split = |share: f64| {
        // A share of a length that fits in memory; truncation is intended.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let at = (len as f64 * share) as usize;
        at & !7
    };
    let doubles_end = split(DOUBLES_SHARE);
    let indices_end = split(DOUBLES_SHARE + INDICES_SHARE).max(doubles_end);
    let (doubles, rest) = out.split_at_mut(doubles_end);
    let (indices, zeros) = rest.split_at_mut(indices_end - doubles_end);
    smooth_doubles(doubles, seed);
    index_arrays(indices, seed);
    zeros.fill(0);
}

/// Smooth doubles plus noise: the sign, exponent and high mantissa bytes vary
/// slowly, the low mantissa bytes are noise.
pub fn smooth_doubles(out: &mut [u8], seed: u64) {
    let rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    smooth_doubles_from(out, 0, rng);
}

/// Smooth doubles plus noise, like [`smooth_doubles`], filled in parallel
/// 1 MiB blocks: each block's noise has its own seed (derived from `seed`
/// and the block's index), so the bytes do not depend on the thread count.
pub fn smooth_doubles_parallel(out: &mut [u8], seed: u64) {
    out.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(block, bytes)| {
            let rng = seed ^ (block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            smooth_doubles_from(bytes, (block as u64) << 17, rng);
        });
}

/// Fills `out` with the smooth curve from word `first` on, plus noise drawn
/// from the xorshift state `rng`.
fn smooth_doubles_from(out: &mut [u8], first: u64, mut rng: u64) {
    for (i, word) in out.chunks_mut(8).enumerate() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let x = (first + i as u64) as f64;
        let smooth = 300.0 + 50.0 * (x * 1e-5).sin() * (x * 3e-8).cos();
        let noise = ((rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 1e-7;
        let value = (smooth + noise).to_le_bytes();
        let n = word.len();
        word.copy_from_slice(&value[..n]);
    }
}

/// Integer index arrays: 64-bit column indices of a sparse matrix row after
/// row (a few neighbours around the diagonal, with occasional far ones).
pub fn index_arrays(out: &mut [u8], seed: u64) {
    let mut rng = seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for (i, word) in out.chunks_mut(8).enumerate() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let row = (i / 7) as u64;
        let column = match i % 7 {
            0 => row.saturating_sub(1000),
            6 => row + 1000,
            k => (row + k as u64).saturating_sub(3),
        };
        // One in 64 entries points far away, as unstructured meshes do.
        let column = if rng % 64 == 0 { rng >> 40 } else { column };
        let value = column.to_le_bytes();
        let n = word.len();
        word.copy_from_slice(&value[..n]);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_where_the_shares_say() {
        let mut out = vec![0xFFu8; 1 << 16];
        mixed_state(&mut out, 7);
        let zeros_from = ((1 << 16) as f64 * (DOUBLES_SHARE + INDICES_SHARE)) as usize & !7;
        assert!(out[zeros_from..].iter().all(|b| *b == 0));
        assert!(out[..zeros_from].iter().any(|b| *b != 0));
        let mut again = vec![0u8; 1 << 16];
        mixed_state(&mut again, 7);
        assert_eq!(out, again, "deterministic for a seed");
    }
}
