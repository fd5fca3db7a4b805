//! cryo-core: the checkpoint store, its on-disk image format, and the wire
//! protocol shared by the coordinator, the node agents and the rank runtime.
//!
//! * [`format`]: the on-disk image format: [`format::header`] (the fixed
//!   header that starts every file, readable without the codec, so any file
//!   can be described even when it cannot be loaded), [`format::codec`] (the
//!   single bincode module for metadata), [`format::chunk`] (content-addressed,
//!   shuffled, zstd-compressed chunks), [`format::manifest`] (what an epoch
//!   records about each rank).
//! * [`store`], [`store::writer`], [`store::reader`]: the store layout,
//!   durable parallel writes with atomic commit, retention and GC, and
//!   verified restore.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod auth;
pub mod dirty;
pub mod env;
pub mod fault;
pub mod format;
pub mod names;
pub mod protocol;
pub mod sibling;
pub mod store;
pub mod token;

pub use format::chunk::{ChunkCodec, ChunkHash, Filter};
pub use format::manifest::{Manifest, RankRecord, RegionKind, RegionRecord};
pub use store::writer::{EpochWriter, RankWriter, WriterConfig};
pub use store::{JobStore, Store};
