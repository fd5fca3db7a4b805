//! Pack indexes: a footer and index records at the end of arbitrary bytes,
//! read as a sealed pack's index would be. Every entry accepted must lie
//! inside the entries area, and no two may overlap.
#![no_main]

use cryo_core::format::pack::{read_index_with, IndexSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let read = |offset: u64, buf: &mut [u8]| -> Result<(), ()> {
        let at = usize::try_from(offset).map_err(drop)?;
        let src = data.get(at..at + buf.len()).ok_or(())?;
        buf.copy_from_slice(src);
        Ok(())
    };
    if let Ok(Ok((_, entries, source))) = read_index_with(data.len() as u64, read) {
        let end = match source {
            IndexSource::Sealed { index_offset } => index_offset,
            IndexSource::Scanned { end, .. } => end,
        };
        let mut previous_end = 0;
        for entry in &entries {
            assert!(entry.offset >= previous_end && entry.end() <= end);
            previous_end = entry.end();
        }
    }
});
