//! Chunk encoding: round trips, the shuffle, and every check a decode makes.

use proptest::prelude::*;

use super::*;

fn doubles(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 8);
    let mut state = 0x9e3779b97f4a7c15u64;
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state >> 11) as f64 / (1u64 << 53) as f64 * 1e-6;
        let value = (i as f64 * 0.001).sin() + noise;
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

#[test]
fn shuffle_round_trip() {
    let data = doubles(1000);
    let mut shuffled = vec![0; data.len()];
    let mut back = vec![0; data.len()];
    shuffle8(&data, &mut shuffled);
    assert_ne!(shuffled, data);
    unshuffle8(&shuffled, &mut back);
    assert_eq!(back, data);
}

#[test]
fn encode_decode_round_trip_and_shuffle_helps() {
    let data = doubles(1 << 17);
    let plain = ChunkCodec {
        level: 1,
        filter: Filter::None,
    }
    .encode(&data)
    .expect("encodes");
    let shuffled = ChunkCodec::default().encode(&data).expect("encodes");
    assert_eq!(plain.hash, shuffled.hash);
    assert!(
        shuffled.file.len() < plain.file.len(),
        "shuffle {} vs plain {}",
        shuffled.file.len(),
        plain.file.len()
    );
    for encoded in [plain, shuffled] {
        let mut out = vec![0; data.len()];
        decode_into(&encoded.file, &encoded.hash, &mut out).expect("decodes");
        assert_eq!(out, data);
    }
}

#[test]
fn incompressible_is_stored_raw() {
    let mut data = vec![0u8; 65536];
    let mut state = 1u64;
    for byte in &mut data {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *byte = (state >> 56) as u8;
    }
    let encoded = ChunkCodec::default().encode(&data).expect("encodes");
    let header = Header::decode(&encoded.file, FileKind::Chunk).expect("header");
    assert_eq!(header.flags, FLAG_RAW_CHECK);
    assert_eq!(header.raw_check, raw_check(&data, &encoded.hash));
    let mut out = vec![0; data.len()];
    decode_into(&encoded.file, &encoded.hash, &mut out).expect("decodes");
    assert_eq!(out, data);
}

#[test]
fn corruption_is_detected() {
    let data = doubles(4096);
    let encoded = ChunkCodec::default().encode(&data).expect("encodes");
    let mut out = vec![0; data.len()];
    let mut corrupt = encoded.file.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    assert!(matches!(
        decode_into(&corrupt, &encoded.hash, &mut out),
        Err(ChunkDecodeError::PayloadChecksum)
    ));
    assert!(matches!(
        decode_into(
            &encoded.file[..encoded.file.len() - 3],
            &encoded.hash,
            &mut out
        ),
        Err(ChunkDecodeError::LengthMismatch { .. })
    ));
    // A well-formed chunk found where another should be.
    let other = ChunkHash::of(b"other");
    assert!(matches!(
        decode_into(&encoded.file, &other, &mut out),
        Err(ChunkDecodeError::RawCheck { .. })
    ));
    let mut short = vec![0; data.len() - 8];
    assert!(matches!(
        decode_into(&encoded.file, &encoded.hash, &mut short),
        Err(ChunkDecodeError::RawLength { .. })
    ));
}

#[test]
fn corrupt_zstd_with_fixed_checksum_is_caught_by_hash_or_zstd() {
    // Rewrite the payload and recompute the header so only the content
    // check can notice.
    let data = doubles(4096);
    let encoded = ChunkCodec::default().encode(&data).expect("encodes");
    let mut payload = encoded.file[HEADER_LEN..].to_vec();
    let mid = payload.len() / 2;
    payload[mid] ^= 0x55;
    let old = Header::decode(&encoded.file, FileKind::Chunk).expect("header");
    let header = Header::new(
        FileKind::Chunk,
        CodecId::Raw,
        old.flags,
        &payload,
        old.raw_len,
    )
    .with_raw_check(old.raw_check);
    let mut file = header.encode().to_vec();
    file.extend_from_slice(&payload);
    let mut out = vec![0; data.len()];
    assert!(matches!(
        decode_into(&file, &encoded.hash, &mut out),
        Err(ChunkDecodeError::Zstd(_) | ChunkDecodeError::RawCheck { .. })
    ));
}

/// Rebuilds `encoded` with `flags` and `raw_check` in its header.
fn with_header(encoded: &EncodedChunk, flags: u32, raw_check: u64) -> Vec<u8> {
    let old = Header::decode(&encoded.file, FileKind::Chunk).expect("header");
    let payload = &encoded.file[HEADER_LEN..];
    let header = Header::new(FileKind::Chunk, CodecId::Raw, flags, payload, old.raw_len)
        .with_raw_check(raw_check);
    let mut file = header.encode().to_vec();
    file.extend_from_slice(payload);
    file
}

#[test]
fn a_chunk_without_a_raw_check_is_checked_by_its_name() {
    // As format 2.0 wrote it: no flag, no check.
    let data = doubles(4096);
    let encoded = ChunkCodec::default().encode(&data).expect("encodes");
    let flags = Header::decode(&encoded.file, FileKind::Chunk)
        .expect("header")
        .flags
        & !FLAG_RAW_CHECK;
    let file = with_header(&encoded, flags, 0);
    let mut out = vec![0; data.len()];
    decode_into(&file, &encoded.hash, &mut out).expect("decodes");
    assert_eq!(out, data);
    assert!(matches!(
        decode_into(&file, &ChunkHash::of(b"other"), &mut out),
        Err(ChunkDecodeError::HashMismatch { .. })
    ));
    // A check without its flag is a damaged header.
    let stray = with_header(&encoded, flags, 7);
    assert!(matches!(
        decode_into(&stray, &encoded.hash, &mut out),
        Err(ChunkDecodeError::Header(HeaderError::ReservedNotZero(
            FileKind::Chunk
        )))
    ));
}

#[test]
fn only_the_rehash_sees_a_chunk_forged_under_another_name() {
    let data = doubles(4096);
    let encoded = ChunkCodec::default().encode(&data).expect("encodes");
    let flags = Header::decode(&encoded.file, FileKind::Chunk)
        .expect("header")
        .flags;
    let victim = ChunkHash::of(b"victim");
    let forged = with_header(&encoded, flags, raw_check(&data, &victim));
    let mut out = vec![0; data.len()];
    decode_into(&forged, &victim, &mut out).expect("the raw check is not a signature");
    assert!(matches!(
        decode_into_rehash(&forged, &victim, &mut out),
        Err(ChunkDecodeError::HashMismatch { .. })
    ));
    decode_into_rehash(&encoded.file, &encoded.hash, &mut out).expect("decodes");
    assert_eq!(out, data);
}

#[test]
fn hash_hex_round_trip_and_rejects() {
    let hash = ChunkHash::of(b"abc");
    assert_eq!(hash.to_hex().parse::<ChunkHash>(), Ok(hash));
    assert!("../etc/passwd".parse::<ChunkHash>().is_err());
    assert!("A".repeat(64).parse::<ChunkHash>().is_err());
}

proptest! {
    #[test]
    fn any_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), level in 0i32..4) {
        let codec = ChunkCodec { level, filter: Filter::Shuffle8 };
        let encoded = codec.encode(&data).expect("encodes");
        let mut out = vec![0; data.len()];
        decode_into(&encoded.file, &encoded.hash, &mut out).expect("decodes");
        prop_assert_eq!(out, data);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut out = vec![0; 64];
        let _ = decode_into(&data, &ChunkHash([0; 32]), &mut out);
    }
}
