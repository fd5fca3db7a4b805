//! The one place that knows about bincode.
//!
//! Metadata (manifests, rank parts, protocol messages) is serde-serialised
//! with bincode 2 in fixed-int little-endian form, with a decode limit so a
//! hostile length prefix cannot make us allocate without bound. The header of
//! every file carries [`CodecId::Bincode2FixintLe`](crate::format::header::CodecId),
//! so this codec can be replaced by adding a new id.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::format::limits::MAX_ENCODED_LEN;

type Config = Configuration<LittleEndian, Fixint, Limit<MAX_ENCODED_LEN>>;

const fn config() -> Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_ENCODED_LEN>()
}

/// A value could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Encoding failed (a value larger than the limit, for instance).
    #[error("encoding failed: {0}")]
    Encode(String),
    /// Decoding failed: truncated, malformed or over the limit.
    #[error("malformed encoding: {0}")]
    Decode(String),
    /// Bytes were left over after the value.
    #[error("{0} trailing bytes after the encoded value")]
    TrailingBytes(usize),
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config())
        .map_err(|err| CodecError::Encode(err.to_string()))?;
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(CodecError::Encode(format!(
            "{} bytes exceeds the {MAX_ENCODED_LEN}-byte limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes a `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|err| CodecError::Decode(err.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_vec_length_is_refused_without_allocating() {
        // A Vec<u64> whose length prefix says 2^60 elements.
        let bytes = (1u64 << 60).to_le_bytes();
        let err = decode::<Vec<u64>>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&7u32).expect("encodes");
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn truncated_is_refused() {
        let bytes = encode(&String::from("hello")).expect("encodes");
        assert!(decode::<String>(&bytes[..bytes.len() - 1]).is_err());
    }
}
