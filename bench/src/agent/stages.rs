//! `cryo-bench agent --stages`: the single-thread cost of each stage of
//! storing a chunk (hash, shuffle, zstd, write + fsync), to see where drain
//! time goes.

use std::fs;
use std::path::Path;
use std::time::Instant;

use cryo_agent::units::format_bytes;
use cryo_core::format::chunk::{shuffle8, ChunkCodec, ChunkHash, Filter};
use cryo_core::format::limits::DEFAULT_CHUNK_SIZE;
use cryo_core::store::fs::IoStep;

use super::AgentBenchError;

/// Single-thread throughput of each stage of storing chunks.
pub(super) fn stages(dir: &Path) -> Result<(), AgentBenchError> {
    let total = 64usize << 20;
    // Like the counter's state: a smooth pattern with some noise.
    let mut data = vec![0u8; total];
    let mut x = 1u64;
    for (i, word) in data.chunks_exact_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let value =
            (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ if i % 64 == 0 { x } else { 0 };
        word.copy_from_slice(&value.to_le_bytes());
    }
    let chunks: Vec<&[u8]> = data.chunks(DEFAULT_CHUNK_SIZE).collect();
    let rate = |label: &str, t: Instant| {
        let secs = t.elapsed().as_secs_f64();
        println!("  {label:<40} {:>8.0} MB/s", total as f64 / secs / 1e6);
    };
    println!(
        "== stage costs, one thread, {} in 1 MiB chunks ==",
        format_bytes(total as u64)
    );
    let t = Instant::now();
    for c in &chunks {
        std::hint::black_box(ChunkHash::of(c));
    }
    rate("blake3 hash", t);
    let mut out = vec![0u8; DEFAULT_CHUNK_SIZE];
    let t = Instant::now();
    for c in &chunks {
        shuffle8(c, &mut out[..c.len()]);
        std::hint::black_box(&out);
    }
    rate("shuffle8 filter (SIMD where available)", t);
    let t = Instant::now();
    for c in &chunks {
        cryo_core::format::shuffle::shuffle8_scalar(c, &mut out[..c.len()]);
        std::hint::black_box(&out);
    }
    rate("shuffle8 filter (scalar reference)", t);
    for (label, codec) in [
        (
            "encode: hash + zstd -1 (no filter)",
            ChunkCodec {
                level: 1,
                filter: Filter::None,
            },
        ),
        (
            "encode: hash + shuffle8 + zstd -1 (default)",
            ChunkCodec::default(),
        ),
    ] {
        let t = Instant::now();
        for c in &chunks {
            std::hint::black_box(codec.encode(c)?);
        }
        rate(label, t);
    }
    let encoded: Vec<_> = chunks
        .iter()
        .map(|c| ChunkCodec::default().encode(c))
        .collect::<Result<_, _>>()?;
    let chunk_dir = dir.join("stage-chunks");
    fs::create_dir_all(&chunk_dir).step("creating", &chunk_dir)?;
    let t = Instant::now();
    for (i, e) in encoded.iter().enumerate() {
        cryo_core::store::durable::write_replace(&chunk_dir.join(format!("{i}")), &[&e.file])?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  {:<40} {:>8.2} ms per chunk ({} stored per chunk)",
        "write + fsync (durable::write_replace)",
        secs * 1e3 / encoded.len() as f64,
        format_bytes(
            encoded.iter().map(|e| e.file.len() as u64).sum::<u64>() / encoded.len() as u64
        )
    );
    let _ = fs::remove_dir_all(&chunk_dir);
    Ok(())
}
