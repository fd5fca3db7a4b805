//! The on-disk image format: everything that decides the bytes of a file in
//! a store, and nothing that touches the filesystem.
//!
//! ```text
//! limits    the size limits of every kind of file (no dependencies)
//! paths     the paths metadata may record (no dependencies)
//! header    the fixed 64-byte header, the version policy  -> limits
//! codec     bincode, the one module that links it        -> limits
//! shuffle   the byte-shuffle filter of chunks
//! closed    the table of files a rank wrote and closed   -> codec
//! chunk     content-addressed chunks                      -> header, shuffle, limits
//! pack      pack files: chunk entries, index, footer      -> chunk, header, limits
//! process   a rank's umask and what it was of saved files
//! manifest  the epoch manifest and each rank's part       -> chunk, pack, process, limits
//! fds       the regions that carry held files; node-local   -> manifest, chunk
//!           files that keep ranks apart at a restart
//! process_state  what a rank changed of its process after  -> codec, paths
//!           cryo_init: environment, limits, signals
//! legacy    earlier minor versions' metadata layouts      -> codec, header, manifest
//! ```
//!
//! Each module uses only modules above it in this list: there is no cycle.
//! A rank record's validation, the links between its fd records included,
//! is in `manifest` (its tests in `manifest_tests.rs`). In particular `header`
//! never uses `chunk` or `codec`: the limits it checks lengths against are
//! in `limits`. The store (`crate::store`) builds on this module; nothing
//! here touches the filesystem.

pub mod chunk;
pub mod closed;
pub mod codec;
pub mod fds;
pub mod header;
pub mod legacy;
pub mod limits;
pub mod manifest;
pub mod pack;
pub mod paths;
pub mod process;
pub mod process_state;
pub mod shuffle;
