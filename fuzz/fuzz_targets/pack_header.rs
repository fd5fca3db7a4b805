//! Pack files: the pack header, each entry header, and a walk of the
//! entries, on arbitrary bytes.
#![no_main]

use cryo_core::format::pack::{parse_entry_header, parse_pack_header, scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_pack_header(data);
    let _ = parse_entry_header(data, 0);
    if let Ok(scan) = scan(data) {
        for entry in &scan.entries {
            assert!(entry.end() <= data.len() as u64);
        }
    }
});
