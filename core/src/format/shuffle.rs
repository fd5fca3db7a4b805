//! The 8-byte shuffle filter: a transpose of 8-byte words into 8 byte planes.
//!
//! Plane `p` holds byte `p` of every word, in word order; a tail shorter than
//! a word is left untouched (callers only shuffle multiples of 8). This
//! layout is part of the on-disk chunk format (`FLAG_SHUFFLE8`), so every
//! implementation here must produce exactly the bytes of [`shuffle8_scalar`].
//!
//! The scalar transpose scatters one byte at a time (1.8 GB/s), which made it
//! ~20% of the encoder's time. On x86_64 an SSE2 transpose (SSE2 is part of
//! the x86_64 baseline, so no runtime check is needed) moves 16 words per
//! step with unpack instructions, as Blosc does, and runs near memory speed.
//! Other targets use the scalar code.

/// Transposes 8-byte words into 8 byte planes: `dst[p * words + i] =
/// src[i * 8 + p]`. `dst.len() == src.len()`; bytes past the last whole word
/// are not written.
pub fn shuffle8(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "shuffle8 needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let done = sse2::shuffle8(src, dst);
        shuffle8_tail(src, dst, done);
    }
    #[cfg(not(target_arch = "x86_64"))]
    shuffle8_scalar(src, dst);
}

/// Inverse of [`shuffle8`].
pub fn unshuffle8(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "unshuffle8 needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let done = sse2::unshuffle8(src, dst);
        unshuffle8_tail(src, dst, done);
    }
    #[cfg(not(target_arch = "x86_64"))]
    unshuffle8_scalar(src, dst);
}

/// The reference transpose, one byte at a time. The SIMD versions are tested
/// against it.
pub fn shuffle8_scalar(src: &[u8], dst: &mut [u8]) {
    shuffle8_tail(src, dst, 0);
}

/// The reference inverse transpose.
pub fn unshuffle8_scalar(src: &[u8], dst: &mut [u8]) {
    unshuffle8_tail(src, dst, 0);
}

/// Shuffles words `from..` (the ones the SIMD loop left).
fn shuffle8_tail(src: &[u8], dst: &mut [u8], from: usize) {
    let words = src.len().min(dst.len()) / 8;
    for p in 0..8 {
        let plane = &mut dst[p * words..(p + 1) * words];
        for (i, out) in plane.iter_mut().enumerate().skip(from) {
            *out = src[i * 8 + p];
        }
    }
}

/// Unshuffles words `from..`.
fn unshuffle8_tail(src: &[u8], dst: &mut [u8], from: usize) {
    let words = src.len().min(dst.len()) / 8;
    for (i, word) in dst.chunks_exact_mut(8).enumerate().skip(from) {
        for (p, byte) in word.iter_mut().enumerate() {
            *byte = src[p * words + i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_shuffle_epi32, _mm_storeu_si128, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpackhi_epi8, _mm_unpacklo_epi16,
        _mm_unpacklo_epi32, _mm_unpacklo_epi64, _mm_unpacklo_epi8,
    };

    /// Words per SIMD step: 16 words in, 16 bytes out per plane.
    const STEP: usize = 16;

    /// Shuffles as many whole 16-word blocks as there are; returns how many
    /// words it did.
    pub(super) fn shuffle8(src: &[u8], dst: &mut [u8]) -> usize {
        let words = src.len().min(dst.len()) / 8;
        let blocks = words / STEP;
        for block in 0..blocks {
            let j = block * STEP;
            // SAFETY: SSE2 is always present on x86_64. Reads cover
            // src[j*8 .. j*8 + 128], within the `words * 8 <= src.len()`
            // bytes since j + 16 <= words. Writes cover dst[p*words + j ..
            // +16] for p < 8, within `8 * words <= dst.len()`. Unaligned
            // loads and stores are used, so no alignment is assumed.
            unsafe {
                let s = src.as_ptr().add(j * 8);
                let mut a = [zero(); 8];
                let mut b = [zero(); 8];
                // Bytes: pair byte p of words 2k and 2k+1 as 16-bit unit p.
                for (k, out) in b.iter_mut().enumerate() {
                    let v = _mm_loadu_si128(s.add(k * 16).cast::<__m128i>());
                    let swapped = _mm_shuffle_epi32::<0x4e>(v);
                    *out = _mm_unpacklo_epi8(v, swapped);
                }
                // 16-bit units: planes 0-3 / 4-7 of four words as 32-bit units.
                for k in 0..4 {
                    a[2 * k] = _mm_unpacklo_epi16(b[2 * k], b[2 * k + 1]);
                    a[2 * k + 1] = _mm_unpackhi_epi16(b[2 * k], b[2 * k + 1]);
                }
                // 32-bit units: two planes of eight words per vector.
                for (k, l) in [(0, 0), (1, 1), (2, 4), (3, 5)] {
                    b[2 * k] = _mm_unpacklo_epi32(a[l], a[l + 2]);
                    b[2 * k + 1] = _mm_unpackhi_epi32(a[l], a[l + 2]);
                }
                // 64-bit units: one plane of sixteen words per vector.
                for k in 0..4 {
                    a[2 * k] = _mm_unpacklo_epi64(b[k], b[k + 4]);
                    a[2 * k + 1] = _mm_unpackhi_epi64(b[k], b[k + 4]);
                }
                let d = dst.as_mut_ptr().add(j);
                for (p, plane) in a.iter().enumerate() {
                    _mm_storeu_si128(d.add(p * words).cast::<__m128i>(), *plane);
                }
            }
        }
        blocks * STEP
    }

    /// Inverse of [`shuffle8`], same block structure.
    pub(super) fn unshuffle8(src: &[u8], dst: &mut [u8]) -> usize {
        let words = src.len().min(dst.len()) / 8;
        let blocks = words / STEP;
        for block in 0..blocks {
            let j = block * STEP;
            // SAFETY: SSE2 is always present on x86_64. Reads cover
            // src[p*words + j .. +16] for p < 8, within `8 * words <=
            // src.len()` since j + 16 <= words; writes cover dst[j*8 ..
            // j*8 + 128], within `words * 8 <= dst.len()`. Unaligned loads
            // and stores.
            unsafe {
                let s = src.as_ptr().add(j);
                let mut a = [zero(); 8];
                let mut b = [zero(); 8];
                for (p, plane) in a.iter_mut().enumerate() {
                    *plane = _mm_loadu_si128(s.add(p * words).cast::<__m128i>());
                }
                // Planes 2k, 2k+1 interleaved: 16-bit units per word.
                for k in 0..4 {
                    b[k] = _mm_unpacklo_epi8(a[2 * k], a[2 * k + 1]);
                    b[4 + k] = _mm_unpackhi_epi8(a[2 * k], a[2 * k + 1]);
                }
                // Planes 0-3 / 4-7 per word as 32-bit units.
                for k in 0..4 {
                    a[k] = _mm_unpacklo_epi16(b[2 * k], b[2 * k + 1]);
                    a[4 + k] = _mm_unpackhi_epi16(b[2 * k], b[2 * k + 1]);
                }
                // Whole words, two per vector.
                for k in 0..4 {
                    b[k] = _mm_unpacklo_epi32(a[2 * k], a[2 * k + 1]);
                    b[4 + k] = _mm_unpackhi_epi32(a[2 * k], a[2 * k + 1]);
                }
                let d = dst.as_mut_ptr().add(j * 8);
                for (slot, k) in [0, 4, 2, 6, 1, 5, 3, 7].into_iter().enumerate() {
                    _mm_storeu_si128(d.add(slot * 16).cast::<__m128i>(), b[k]);
                }
            }
        }
        blocks * STEP
    }

    fn zero() -> __m128i {
        // SAFETY: SSE2 is always present on x86_64; this only creates a value.
        unsafe { std::arch::x86_64::_mm_setzero_si128() }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn matches_scalar_on_every_length_around_the_block_size() {
        for len in (0..=64 * 8 + 24).step_by(8) {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut simd = vec![0xAA; len];
            let mut scalar = vec![0xAA; len];
            shuffle8(&src, &mut simd);
            shuffle8_scalar(&src, &mut scalar);
            assert_eq!(simd, scalar, "shuffle, len {len}");
            let mut back = vec![0; len];
            unshuffle8(&simd, &mut back);
            assert_eq!(back, src, "round trip, len {len}");
        }
    }

    proptest! {
        #[test]
        fn simd_equals_scalar(words in proptest::collection::vec(any::<u64>(), 0..600)) {
            let src: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut simd = vec![0; src.len()];
            let mut scalar = vec![0; src.len()];
            shuffle8(&src, &mut simd);
            shuffle8_scalar(&src, &mut scalar);
            prop_assert_eq!(&simd, &scalar);
            let mut back_simd = vec![0; src.len()];
            let mut back_scalar = vec![0; src.len()];
            unshuffle8(&simd, &mut back_simd);
            unshuffle8_scalar(&scalar, &mut back_scalar);
            prop_assert_eq!(&back_simd, &back_scalar);
            prop_assert_eq!(&back_simd, &src);
        }
    }
}
