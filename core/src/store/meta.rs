//! Metadata files (manifests and rank parts): a header, then the codec's
//! payload, checked against the header's length and checksum before it is
//! decoded with the layout of the version the header names.

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use super::durable::Durable;
use super::fs::{ReadCappedError, StoreFs};
use super::JobStore;
use crate::format::codec::{self, CodecError};
use crate::format::header::{CodecId, FileKind, Header, HeaderError, HEADER_LEN};
use crate::format::legacy::MetaFile;
use crate::format::limits::MAX_ENCODED_LEN;
use crate::format::manifest::{Manifest, ManifestError, RankRecord};

/// A metadata file (manifest or rank part) could not be loaded.
#[derive(Debug, Error)]
#[error("{kind} {}: {problem}", path.display())]
pub struct LoadError {
    /// What the file should have been.
    pub kind: FileKind,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: LoadProblem,
}

/// What is wrong with a metadata file.
#[derive(Debug, Error)]
pub enum LoadProblem {
    /// It is missing or unreadable.
    #[error(transparent)]
    Read(#[from] ReadCappedError),
    /// Its header is bad.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Its length disagrees with the header.
    #[error("truncated or extended: file holds {actual} payload bytes, header says {declared}")]
    Length {
        /// From the header.
        declared: u64,
        /// Present.
        actual: u64,
    },
    /// The payload checksum does not match.
    #[error("payload checksum mismatch (file corrupt)")]
    Checksum,
    /// The payload does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// It decodes but is inconsistent.
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

/// Encodes a metadata value into a complete file image.
pub fn encode_meta_file<T: Serialize>(kind: FileKind, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = codec::encode(value)?;
    let header = Header::new(
        kind,
        CodecId::Bincode2FixintLe,
        0,
        &payload,
        payload.len() as u64,
    );
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(&header.encode());
    file.extend_from_slice(&payload);
    Ok(file)
}

/// Decodes a metadata file image of `kind`.
pub fn decode_meta_file<T: MetaFile>(kind: FileKind, bytes: &[u8]) -> Result<T, LoadProblem> {
    let header = Header::decode(bytes, kind)?;
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if actual != header.payload_len {
        return Err(LoadProblem::Length {
            declared: header.payload_len,
            actual,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if !header.payload_matches(payload) {
        return Err(LoadProblem::Checksum);
    }
    Ok(T::decode_version(header.version, payload)?)
}

pub(crate) fn load_meta_file<T: MetaFile>(
    fs: &dyn StoreFs,
    kind: FileKind,
    path: &Path,
) -> Result<T, LoadError> {
    let wrap = |problem: LoadProblem| LoadError {
        kind,
        path: path.to_owned(),
        problem,
    };
    let bytes = fs
        .read_capped(path, HEADER_LEN as u64 + MAX_ENCODED_LEN as u64)
        .map_err(|err| wrap(err.into()))?;
    decode_meta_file(kind, &bytes).map_err(wrap)
}

impl JobStore {
    /// Loads and validates a committed manifest.
    pub fn load_manifest(&self, epoch: u64) -> Result<Manifest, LoadError> {
        let path = self.manifest_path(epoch);
        let manifest: Manifest = load_meta_file(&*self.fs, FileKind::Manifest, &path)?;
        manifest
            .validate(&self.name, epoch)
            .map_err(|err| LoadError {
                kind: FileKind::Manifest,
                path,
                problem: err.into(),
            })?;
        Ok(manifest)
    }

    /// Loads a rank's part of a pending epoch (unvalidated shape).
    pub fn load_part(&self, epoch: u64, rank: u32) -> Result<RankRecord, LoadError> {
        load_meta_file(&*self.fs, FileKind::RankPart, &self.part_path(epoch, rank))
    }
}
