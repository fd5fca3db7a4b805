//! The names of the regions that carry what a rank held beyond its own
//! regions: unlinked files, files written in place, its own file mappings.
//! (The links between fd records are checked with the rest of a rank
//! record, in `manifest.rs`.)

/// The name of the region that holds the contents of the unlinked file
/// open at `fd`.
pub fn unlinked_region_name(fd: i32) -> String {
    format!("cryo:fd:{fd}")
}

/// The name of the region that holds the contents of the file open for
/// writing in place at `fd`.
pub fn contents_region_name(fd: i32) -> String {
    format!("cryo:file:{fd}")
}

/// The name of the region that holds an application file mapping that
/// starts at `start`.
pub fn mapping_region_name(start: u64) -> String {
    format!("cryo:map:{start:x}")
}

/// Region names starting with this are the runtime's own.
pub const RESERVED_REGION_PREFIX: &str = "cryo:";
