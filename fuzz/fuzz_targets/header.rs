//! The fixed file header: parse and full decode of arbitrary bytes.
#![no_main]

use cryo_core::format::header::{FileKind, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = Header::parse(data) {
        // A parsed header re-encodes to bytes that parse to the same header,
        // and every field (bytes 0..48) is carried exactly; the reserved
        // bytes are written as zero (a later version may use them) and the
        // checksum follows.
        let encoded = header.encode();
        assert_eq!(&encoded[..48], &data[..48]);
        assert_eq!(
            Header::parse(&encoded).expect("a re-encoded header parses"),
            header
        );
        let _ = header.check_loadable();
    }
    for kind in FileKind::ALL {
        let _ = Header::decode(data, kind);
    }
});
