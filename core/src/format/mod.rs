//! The on-disk image format: everything that decides the bytes of a file in
//! a store.

pub mod chunk;
pub mod codec;
pub mod fds;
pub mod header;
pub mod legacy;
pub mod manifest;
pub mod shuffle;
