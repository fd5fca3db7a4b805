//! The baselines the agent's figures stand beside, measured in the same
//! run: a plain memcpy into warm memory (for the pause) and the raw image
//! read into fresh memory (for the restart).

use std::fs;
use std::path::Path;
use std::time::Instant;

/// A single-threaded memcpy of `bytes` into warm memory, best of three.
pub(crate) fn memcpy_ns(bytes: usize) -> u64 {
    let src: Vec<u8> = (0..bytes)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31))
        .collect();
    let mut dst = vec![1u8; bytes]; // written once: warm, like the agent's pool
    let mut best = u64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        std::hint::black_box(&dst);
    }
    best
}

/// The raw-image baseline: `bytes` written uncompressed to one file in
/// `dir` and synced (as a whole-process checkpointer without compression
/// stores a process), then read back into fresh memory, each page faulted
/// in by the read as a restarting process's would be. Returns the read's
/// time. The page cache holds the file, as it holds the store's chunks when
/// the restart beside it reads them.
pub(super) fn raw_image_ns(dir: &Path, bytes: u64) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    const BLOCK: usize = 16 << 20;
    let path = dir.join("raw-image.bin");
    let len = usize::try_from(bytes).map_err(std::io::Error::other)?;
    {
        let mut file = fs::File::create(&path)?;
        let block: Vec<u8> = (0..BLOCK)
            .map(|i| u8::try_from(i * 31 % 251).unwrap_or(0))
            .collect();
        let mut left = len;
        while left > 0 {
            let n = left.min(BLOCK);
            file.write_all(&block[..n])?;
            left -= n;
        }
        file.sync_all()?;
    }
    let t = Instant::now();
    // Fresh memory: calloc'd pages are mapped on first touch, by the read.
    let mut image = vec![0u8; len];
    fs::File::open(&path)?.read_exact(&mut image)?;
    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    std::hint::black_box(&image);
    fs::remove_file(&path)?;
    Ok(ns)
}
