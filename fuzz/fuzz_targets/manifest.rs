//! Manifest and rank-part files: header, checksum, codec and validation.
#![no_main]

use cryo_core::format::header::{FileKind, Header, HEADER_LEN};
use cryo_core::format::manifest::{Manifest, RankRecord};
use cryo_core::store::decode_meta_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As found on disk (checksum must match)…
    if let Ok(manifest) = decode_meta_file::<Manifest>(FileKind::Manifest, data) {
        let _ = manifest.validate_shape();
    }
    let _ = decode_meta_file::<RankRecord>(FileKind::RankPart, data);
    // …and with a valid header wrapped around the bytes, so the fuzzer
    // reaches the codec and the validation.
    let header = Header::new(
        FileKind::Manifest,
        cryo_core::format::header::CodecId::Bincode2FixintLe,
        0,
        data,
        data.len() as u64,
    );
    let mut file = Vec::with_capacity(HEADER_LEN + data.len());
    file.extend_from_slice(&header.encode());
    file.extend_from_slice(data);
    if let Ok(manifest) = decode_meta_file::<Manifest>(FileKind::Manifest, &file) {
        let _ = manifest.validate_shape();
        let _ = cryo_core::store::EpochSummary::of(&manifest);
    }
    // The same bytes as a format 1.0 file: the legacy layouts.
    let mut old = header;
    old.version.minor = 0;
    file[..HEADER_LEN].copy_from_slice(&old.encode());
    if let Ok(manifest) = decode_meta_file::<Manifest>(FileKind::Manifest, &file) {
        let _ = manifest.validate_shape();
    }
    let mut part = old;
    part.kind = FileKind::RankPart;
    file[..HEADER_LEN].copy_from_slice(&part.encode());
    if let Ok(rank) = decode_meta_file::<RankRecord>(FileKind::RankPart, &file) {
        let _ = rank.validate(1 << 20);
    }
});
