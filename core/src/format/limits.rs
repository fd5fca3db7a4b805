//! The size limits of the image format, in one place.
//!
//! The header checks a file's declared lengths against these before anything
//! is allocated, the chunk encoder and the writer refuse chunk sizes outside
//! them, and the codec caps every metadata value with them. They are kept
//! apart from the modules that use them so that the dependencies between
//! those modules go one way (`chunk` uses `header`, never the reverse).

/// Default chunk size: 1 MiB. Large enough that per-chunk costs (one file,
/// one fsync, one zstd frame, one manifest entry) are small against the data,
/// and that zstd reaches its full ratio; small enough that a 5% change in a
/// rank's state rewrites about 5% of the bytes, and that even a 64 MiB rank
/// splits into enough chunks to keep every core busy.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Smallest configurable chunk size.
pub const MIN_CHUNK_SIZE: usize = 4 << 10;
/// Largest configurable chunk size.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// Largest stored chunk payload: raw size plus zstd's worst-case overhead.
pub const MAX_STORED_CHUNK_LEN: usize = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + 4096;
/// Upper bound for any encoded metadata value (256 MiB).
pub const MAX_ENCODED_LEN: usize = 256 << 20;
