//! The copy kernels of a parked rank's copy into the budget: streaming
//! (non-temporal) stores, which write a destination line without reading it
//! first, in two orders, and the choice between them by measure.
//!
//! A chunk (1 MiB) is below glibc's threshold for non-temporal stores on
//! most machines, so `memcpy` reads every destination line before writing
//! it. Which streaming order is faster depends on the machine: on one host
//! four pages read side by side (as glibc's large copy does) took 24 ms per
//! 256 MiB where one line after another took 31 ms; on another (an AMD EPYC
//! with 32 MiB of L3) the four-page order took 17 ms and one line after
//! another 10 ms (plain `memcpy`: 13 ms). So each copy times its first
//! pieces with both ([`KernelTrial`]) and copies the rest with the faster.

use std::time::Duration;

/// Bytes [`Kernel::FourPages`] moves per round: four pages, read side by
/// side.
pub(crate) const ROUND: usize = 4 * 4096;

/// The order of the streaming stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Four pages at a time, interleaved line by line (the reads keep four
    /// DRAM pages open).
    FourPages,
    /// One line after another.
    Lines,
}

impl Kernel {
    const ALL: [Kernel; 2] = [Kernel::FourPages, Kernel::Lines];

    fn index(self) -> usize {
        match self {
            Kernel::FourPages => 0,
            Kernel::Lines => 1,
        }
    }
}

/// Pieces timed per kernel at the start of a copy.
const TRIALS: u32 = 3;

/// Pieces shorter than this are not timed: the clock's and the call's cost
/// would weigh in them.
const TRIAL_MIN: usize = 256 << 10;

/// The choice of kernel within one copy: the first [`TRIALS`] pieces of at
/// least [`TRIAL_MIN`] bytes with each kernel in turn, timed; then the one
/// with the best time per byte. A copy costs the slower kernel on at most
/// three pieces (a few MiB of a state of hundreds).
#[derive(Debug)]
pub(crate) struct KernelTrial {
    /// Best picoseconds per byte seen with each kernel.
    best: [u64; 2],
    timed: [u32; 2],
    turn: usize,
}

impl Default for KernelTrial {
    fn default() -> Self {
        KernelTrial {
            best: [u64::MAX; 2],
            timed: [0; 2],
            turn: 0,
        }
    }
}

impl KernelTrial {
    /// The kernel for the next piece.
    pub(crate) fn next_kernel(&self) -> Kernel {
        if self.deciding() {
            Kernel::ALL[self.turn % 2]
        } else {
            self.winner()
        }
    }

    /// Whether a piece of `len` bytes should be timed and [`recorded`].
    ///
    /// [`recorded`]: KernelTrial::record
    pub(crate) fn timing(&self, len: usize) -> bool {
        self.deciding() && len >= TRIAL_MIN
    }

    /// What a timed piece of `len` bytes took with `kernel`.
    pub(crate) fn record(&mut self, kernel: Kernel, len: usize, took: Duration) {
        let at = kernel.index();
        let per_byte = u64::try_from(took.as_nanos().saturating_mul(1000) / len.max(1) as u128)
            .unwrap_or(u64::MAX);
        self.best[at] = self.best[at].min(per_byte);
        self.timed[at] += 1;
        self.turn += 1;
    }

    fn deciding(&self) -> bool {
        self.timed.iter().any(|&n| n < TRIALS)
    }

    /// The faster kernel so far (four pages on a tie or with no figure).
    pub(crate) fn winner(&self) -> Kernel {
        if self.best[Kernel::Lines.index()] < self.best[Kernel::FourPages.index()] {
            Kernel::Lines
        } else {
            Kernel::FourPages
        }
    }
}

/// Copies `len` bytes from `src` to `dst`, with streaming stores in the
/// order of `kernel` where it can (a 16-byte aligned destination, at least
/// [`ROUND`] bytes), else with `memcpy`.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, and they must
/// not overlap.
pub(crate) unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize, kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if (dst as usize) % 16 == 0 && len >= ROUND {
        let rounds = len / ROUND;
        match kernel {
            // SAFETY: within the caller's ranges; `dst` is 16-byte aligned
            // and every store offset is a multiple of 16. SSE2 is in every
            // x86_64.
            Kernel::FourPages => unsafe { stream_rounds(dst, src, rounds) },
            // SAFETY: as above.
            Kernel::Lines => unsafe { stream_lines(dst, src, rounds * ROUND) },
        }
        let done = rounds * ROUND;
        // SAFETY: the tail of the same ranges.
        unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done) };
        return;
    }
    let _ = kernel;
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}
/// `rounds` x [`ROUND`] bytes with SSE2 streaming stores, the four pages of
/// a round interleaved line by line (as glibc's large copy does: the reads
/// keep four DRAM pages open).
///
/// # Safety
/// As [`stream_copy`], with `dst` 16-byte aligned and both ranges at least
/// `rounds * ROUND` bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_rounds(dst: *mut u8, src: *const u8, rounds: usize) {
    use std::arch::x86_64::{_mm_prefetch, _mm_sfence, _MM_HINT_T0};
    const PAGE: usize = 4096;
    for round in 0..rounds {
        let (s, d) = (round * ROUND, round * ROUND);
        for line in (0..PAGE).step_by(64) {
            for page in 0..4 {
                let at = page * PAGE + line;
                // SAFETY: `s + at + 48 + 16 <= rounds * ROUND`, inside both
                // ranges; the destination offset is a multiple of 16 from
                // an aligned `dst`; the prefetch is a hint and never faults.
                unsafe {
                    let from = src.add(s + at);
                    _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(256).cast::<i8>());
                    stream_line(dst.add(d + at), from);
                }
            }
        }
    }
    // Streaming stores are weakly ordered: fence them before the answer
    // tells the agent the slots are written.
    // SAFETY: a store fence has no preconditions.
    unsafe { _mm_sfence() };
}

/// `len` bytes (a multiple of 64) with SSE2 streaming stores, one line
/// after another.
///
/// # Safety
/// As [`stream_copy`], with `dst` 16-byte aligned and both ranges at least
/// `len` bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_lines(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::_mm_sfence;
    for at in (0..len).step_by(64) {
        // SAFETY: `at + 64 <= len`, inside both ranges; the destination
        // offset is a multiple of 16 from an aligned `dst`.
        unsafe { stream_line(dst.add(at), src.add(at)) };
    }
    // As in `stream_rounds`: fence before the answer.
    // SAFETY: a store fence has no preconditions.
    unsafe { _mm_sfence() };
}

/// One 64-byte line from `from` to `to` with SSE2 streaming stores.
///
/// # Safety
/// `from` readable and `to` writable for 64 bytes, not overlapping; `to`
/// 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stream_line(to: *mut u8, from: *const u8) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // SAFETY: the caller's contract: four 16-byte loads inside `from`'s 64
    // bytes, four aligned 16-byte streaming stores inside `to`'s.
    unsafe {
        let a = _mm_loadu_si128(from.cast::<__m128i>());
        let b = _mm_loadu_si128(from.add(16).cast::<__m128i>());
        let c = _mm_loadu_si128(from.add(32).cast::<__m128i>());
        let e = _mm_loadu_si128(from.add(48).cast::<__m128i>());
        _mm_stream_si128(to.cast::<__m128i>(), a);
        _mm_stream_si128(to.add(16).cast::<__m128i>(), b);
        _mm_stream_si128(to.add(32).cast::<__m128i>(), c);
        _mm_stream_si128(to.add(48).cast::<__m128i>(), e);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_kernels_copy_every_byte_at_any_length_and_alignment() {
        let src: Vec<u8> = (0..3 * ROUND + 777).map(|i| (i * 31 % 255) as u8).collect();
        for kernel in Kernel::ALL {
            for (len, skew) in [
                (0, 0),
                (5, 0),
                (ROUND, 0),
                (ROUND + 1, 3),
                (2 * ROUND + 64, 0),
                (3 * ROUND + 700, 16),
            ] {
                // A 16-byte aligned destination takes the streaming path,
                // a skewed one the plain copy.
                let mut dst = vec![0u128; (len + skew) / 16 + 2];
                let base = dst.as_mut_ptr().cast::<u8>();
                // SAFETY: `dst` holds at least `skew + len` bytes; `src`
                // holds at least `len + 77`; they do not overlap.
                unsafe { stream_copy(base.add(skew), src.as_ptr().add(77), len, kernel) };
                // SAFETY: the same bytes, now written.
                let out = unsafe { std::slice::from_raw_parts(base.add(skew), len) };
                assert_eq!(out, &src[77..77 + len], "{kernel:?} len {len} skew {skew}");
            }
        }
    }

    #[test]
    fn the_trial_alternates_then_keeps_the_faster_kernel() {
        let mut trial = KernelTrial::default();
        let us = Duration::from_micros;
        // Short pieces are not timed and do not end the trial.
        assert!(!trial.timing(4096));
        let mut seen = Vec::new();
        while trial.timing(1 << 20) {
            let kernel = trial.next_kernel();
            seen.push(kernel);
            let took = if kernel == Kernel::Lines {
                us(40)
            } else {
                us(70)
            };
            trial.record(kernel, 1 << 20, took);
        }
        assert_eq!(seen.len(), 2 * TRIALS as usize);
        assert_eq!(&seen[..2], &[Kernel::FourPages, Kernel::Lines]);
        assert_eq!(trial.next_kernel(), Kernel::Lines);
        // The other way round, with one noisy sample: the best of each.
        let mut trial = KernelTrial::default();
        for took in [90, 70, 40, 71, 95, 72] {
            let kernel = trial.next_kernel();
            trial.record(kernel, 1 << 20, us(took));
        }
        assert_eq!(trial.next_kernel(), Kernel::FourPages);
        assert!(!trial.timing(1 << 20));
        // With no figure for one kernel, four pages.
        assert_eq!(KernelTrial::default().winner(), Kernel::FourPages);
    }
}
