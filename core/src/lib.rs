//! cryo-core: the checkpoint store, its on-disk image format, and the wire
//! protocol shared by the coordinator, the node agents and the rank runtime.
//!
//! * [`header`]: the fixed header that starts every file, readable without
//!   the codec, so any file can be described even when it cannot be loaded.
//! * [`codec`]: the single bincode module for metadata.
//! * [`chunk`]: content-addressed, shuffled, zstd-compressed chunks.
//! * [`manifest`]: what an epoch records about each rank.
//! * [`store`], [`writer`], [`reader`]: the store layout, durable parallel
//!   writes with atomic commit, retention and GC, and verified restore.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod auth;
pub mod chunk;
pub mod codec;
pub mod dirty;
pub mod durable;
pub mod env;
pub mod fault;
pub mod fds;
pub mod gc;
pub mod header;
pub mod legacy;
pub mod manifest;
pub mod names;
pub mod protocol;
pub mod reader;
pub mod shuffle;
pub mod sibling;
pub mod store;
pub mod token;
pub mod writer;

pub use chunk::{ChunkCodec, ChunkHash, Filter};
pub use manifest::{Manifest, RankRecord, RegionKind, RegionRecord};
pub use store::{JobStore, Store};
pub use writer::{EpochWriter, RankWriter, WriterConfig};
