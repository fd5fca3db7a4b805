//! cryo-core: the checkpoint store, its on-disk image format, and the wire
//! protocol shared by the coordinator, the node agents and the rank runtime.
//!
//! * [`mod@format`]: the on-disk image format, with no filesystem access:
//!   * [`format::header`]: the fixed header that starts every file, readable
//!     without the codec, so any file can be described even when it cannot
//!     be loaded;
//!   * [`format::limits`]: every size limit of the format;
//!   * [`format::codec`]: the single bincode module for metadata;
//!   * [`format::chunk`], [`format::shuffle`]: content-addressed, shuffled,
//!     zstd-compressed chunks;
//!   * [`format::manifest`], [`format::fds`]: what an epoch records about
//!     each rank, and its validation;
//!   * [`format::legacy`]: the metadata layouts of earlier minor versions.
//! * [`store`]: the store on a shared directory (layout, job lock, commit),
//!   doing every file operation through [`store::fs::StoreFs`]:
//!   * [`store::durable`]: the real filesystem and durable writes;
//!   * [`store::fault_fs`]: a filesystem that fails chosen calls, for tests;
//!   * [`store::writer`]: an epoch's chunks written in parallel;
//!   * [`store::reader`]: verified restore;
//!   * [`store::gc`]: retention and GC.
//! * [`protocol`], [`auth`], [`token`]: the wire protocol, its handshake and
//!   the job token.
//! * [`dirty`]: write tracking of rank memory; [`mod@env`]: every `CRYO_*`
//!   variable; [`fault`]: the test hook that holds an epoch at a phase;
//!   [`names`]: job and region name checks; [`sibling`]: how one cryo binary
//!   finds another; [`pidfd`]: handles on processes; [`maps`]: one line of
//!   `/proc/<pid>/maps`.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod auth;
pub mod dirty;
pub mod env;
pub mod error_chain;
pub mod fault;
pub mod format;
pub mod liveness;
pub mod locality;
pub mod maps;
pub mod names;
pub mod pidfd;
pub mod private_dir;
pub mod proc_stat;
pub mod protocol;
pub mod say;
pub mod sibling;
pub mod store;
pub mod token;

pub use format::chunk::{ChunkCodec, ChunkHash, Filter};
pub use format::manifest::{Manifest, RankRecord, RegionKind, RegionRecord};
pub use store::writer::{EpochWriter, RankWriter, WriterConfig};
pub use store::{JobStore, Store};
