//! The names of the regions that carry what a rank held beyond its own
//! regions: unlinked files, files written in place, its own file mappings.
//! (The links between fd records are checked with the rest of a rank
//! record, in `manifest.rs`.)

use std::collections::BTreeSet;

use super::manifest::{FdRecord, RegionKind};

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

/// The name of the region that holds the contents of the `n`th file
/// written and closed on a filesystem of the rank's node.
pub fn closed_contents_region_name(n: usize) -> String {
    format!("cryo:closed:{n}")
}

/// The name of the region that holds the contents of the `n`th file on a
/// filesystem of the rank's node that it maps and no fd of it saves.
pub fn mapped_file_region_name(n: usize) -> String {
    format!("cryo:mapped-file:{n}")
}

/// Region names starting with this are the runtime's own.
pub const RESERVED_REGION_PREFIX: &str = "cryo:";

/// The paths of the files among `fds` whose contents a region of `kinds`
/// saved (a [`RegionKind::FileContents`]): a restart makes them again
/// where they are missing.
pub fn saved_file_paths<'a>(
    fds: &'a [FdRecord],
    kinds: impl IntoIterator<Item = &'a RegionKind>,
) -> BTreeSet<&'a str> {
    kinds
        .into_iter()
        .filter_map(|kind| match kind {
            RegionKind::FileContents { fd } => fds.iter().find(|f| f.fd == *fd),
            _ => None,
        })
        .map(|fd| fd.path.as_str())
        .collect()
}
