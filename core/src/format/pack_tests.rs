//! Pack format: round trips and every rejection path.

use super::*;
use crate::format::chunk::ChunkCodec;

fn id() -> PackId {
    PackId([7; 12])
}

/// A pack image with `n` chunks of `len` bytes each, and its entries.
fn pack_with(n: usize, len: usize, sealed: bool) -> (Vec<u8>, Vec<IndexEntry>) {
    let mut pack = encode_pack_header(id()).to_vec();
    let mut entries = Vec::new();
    for i in 0..n {
        let raw: Vec<u8> = (0..len).map(|b| (b * 7 + i * 13) as u8).collect();
        let chunk = ChunkCodec::default().encode(&raw).unwrap();
        let blob = chunk.file.clone();
        let entry = IndexEntry {
            hash: chunk.hash,
            offset: pack.len() as u64,
            blob_len: blob.len() as u32,
            raw_len: len as u32,
        };
        pack.extend_from_slice(&encode_entry_header(&chunk.hash, blob.len() as u32));
        pack.extend_from_slice(&blob);
        entries.push(entry);
    }
    if sealed {
        let at = pack.len() as u64;
        pack.extend_from_slice(&encode_index(&entries, at));
    }
    (pack, entries)
}

fn read_index(pack: &[u8]) -> Result<Option<Vec<IndexEntry>>, PackError> {
    let len = pack.len() as u64;
    let Some(footer) = parse_footer(&pack[pack.len() - FOOTER_LEN..], len)? else {
        return Ok(None);
    };
    let start = footer.index_offset as usize;
    parse_index(&pack[start..pack.len() - FOOTER_LEN], &footer).map(Some)
}

#[test]
fn a_sealed_pack_round_trips_through_its_index_and_its_scan() {
    let (pack, entries) = pack_with(5, 4096, true);
    assert_eq!(parse_pack_header(&pack).unwrap(), id());
    assert_eq!(read_index(&pack).unwrap().unwrap(), entries);
    let scan = scan(&pack).unwrap();
    assert_eq!(scan.entries, entries);
    assert_eq!(scan.stopped, None);
}

#[test]
fn an_unsealed_pack_is_rebuilt_by_scanning_and_a_torn_tail_is_reported() {
    let (mut pack, entries) = pack_with(4, 4096, false);
    assert_eq!(read_index(&pack).unwrap(), None, "no footer");
    assert_eq!(scan(&pack).unwrap().entries, entries);
    // A writer that died halfway through its last entry.
    pack.truncate(pack.len() - 100);
    let scan = scan(&pack).unwrap();
    assert_eq!(scan.entries, entries[..3]);
    assert!(matches!(scan.stopped, Some(PackError::BeyondEnd { .. })));
}

#[test]
fn pack_ids_parse_from_their_names_only() {
    assert_eq!(id().to_hex().parse::<PackId>().unwrap(), id());
    for bad in [
        "",
        "0707",
        &"g".repeat(24),
        &"A".repeat(24),
        &"0".repeat(25),
    ] {
        assert!(bad.parse::<PackId>().is_err(), "{bad:?}");
    }
}

#[test]
fn bad_magic_is_refused_everywhere() {
    let (pack, _) = pack_with(2, 4096, true);
    let mut bad = pack.clone();
    bad[0] ^= 1;
    assert_eq!(
        parse_pack_header(&bad),
        Err(PackError::BadMagic("pack header"))
    );
    assert_eq!(scan(&bad), Err(PackError::BadMagic("pack header")));
    let mut entry = encode_entry_header(&ChunkHash([1; 32]), 4096).to_vec();
    entry[1] ^= 1;
    assert_eq!(
        parse_entry_header(&entry, 0),
        Err(PackError::BadMagic("entry header"))
    );
}

#[test]
fn bad_checksums_are_refused() {
    let (pack, _) = pack_with(2, 4096, true);
    let mut header = pack.clone();
    header[20] ^= 1;
    assert_eq!(
        parse_pack_header(&header),
        Err(PackError::BadChecksum("pack header"))
    );
    let mut entry = encode_entry_header(&ChunkHash([1; 32]), 4096).to_vec();
    entry[9] ^= 1;
    assert_eq!(
        parse_entry_header(&entry, 0),
        Err(PackError::BadChecksum("entry header"))
    );
    let mut footer = pack.clone();
    let at = footer.len() - 20;
    footer[at] ^= 1;
    assert_eq!(read_index(&footer), Err(PackError::BadChecksum("footer")));
    let mut index = pack.clone();
    let at = index.len() - FOOTER_LEN - 10;
    index[at] ^= 1;
    assert_eq!(read_index(&index), Err(PackError::BadChecksum("index")));
}

#[test]
fn a_truncated_pack_is_refused() {
    let (pack, _) = pack_with(3, 4096, true);
    assert!(matches!(
        parse_pack_header(&pack[..10]),
        Err(PackError::Truncated { .. })
    ));
    // The footer's index no longer fits the file.
    let mut short = pack.clone();
    short.drain(100..200);
    assert!(matches!(
        read_index(&short),
        Err(PackError::Truncated { .. })
    ));
    assert!(matches!(
        parse_footer(&pack[..20], 20),
        Err(PackError::Truncated { .. })
    ));
}

/// Seals `entries` (entries ending at `end`) and parses the index back.
fn reparse_index(entries: &[IndexEntry], end: u64) -> Result<Vec<IndexEntry>, PackError> {
    let tail = encode_index(entries, end);
    let footer = parse_footer(&tail[tail.len() - FOOTER_LEN..], end + tail.len() as u64)
        .unwrap()
        .unwrap();
    parse_index(&tail, &footer)
}

#[test]
fn an_index_entry_beyond_the_entries_is_refused() {
    let (_, mut entries) = pack_with(2, 4096, false);
    let end = entries[1].end();
    entries[1].blob_len += 64;
    assert!(matches!(
        reparse_index(&entries, end),
        Err(PackError::BeyondEnd { .. })
    ));
}

#[test]
fn overlapping_index_entries_are_refused() {
    let (_, mut entries) = pack_with(3, 4096, false);
    let end = entries[2].end();
    entries[1].offset -= 1;
    assert!(matches!(
        reparse_index(&entries, end),
        Err(PackError::Overlap { .. })
    ));
}

#[test]
fn an_entry_header_with_an_impossible_length_is_refused() {
    let entry = encode_entry_header(&ChunkHash([1; 32]), 3);
    assert!(matches!(
        parse_entry_header(&entry, 99),
        Err(PackError::Length { offset: 99, .. })
    ));
    let entry = encode_entry_header(&ChunkHash([1; 32]), u32::MAX);
    assert!(matches!(
        parse_entry_header(&entry, 0),
        Err(PackError::Length { .. })
    ));
}

#[test]
fn a_newer_major_is_refused() {
    let mut header = encode_pack_header(id());
    header[8] = 3;
    let crc = CRC32C.checksum(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(parse_pack_header(&header), Err(PackError::Version(3, 0)));
}

proptest::proptest! {
    #[test]
    fn scanning_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let mut pack = encode_pack_header(id()).to_vec();
        pack.extend_from_slice(&bytes);
        let _ = scan(&pack);
        let _ = parse_footer(&pack[pack.len().saturating_sub(FOOTER_LEN)..], pack.len() as u64);
    }
}

/// Writes the fuzz targets' seed packs (small enough for `-max_len=4096`);
/// by hand only.
#[test]
#[ignore = "writes the fuzz seed corpus"]
fn write_fuzz_seeds() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let (sealed, _) = pack_with(3, 512, true);
    let (unsealed, _) = pack_with(2, 512, false);
    assert!(sealed.len() <= 4096 && unsealed.len() <= 4096);
    for target in ["pack_header", "pack_index"] {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sealed"), &sealed).unwrap();
        std::fs::write(dir.join("unsealed"), &unsealed).unwrap();
    }
}
