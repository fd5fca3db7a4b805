//! Chunk files: decode into a fixed buffer and hash check.
#![no_main]

use cryo_core::format::chunk::{decode_into, ChunkHash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = vec![0u8; 4096];
    let _ = decode_into(data, &ChunkHash([0; 32]), &mut out);
});
