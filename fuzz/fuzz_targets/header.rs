//! The fixed file header: parse and full decode of arbitrary bytes.
#![no_main]

use cryo_core::header::{FileKind, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = Header::parse(data) {
        // A parsed header re-encodes to the same bytes.
        assert_eq!(&header.encode()[..], &data[..64]);
        let _ = header.check_loadable();
    }
    for kind in FileKind::ALL {
        let _ = Header::decode(data, kind);
    }
});
