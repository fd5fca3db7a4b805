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

/// Whether a restart that does not find the directory `dir` makes it
/// again anyway: it is, or holds, the working directory `cwd`, or it holds
/// a file whose contents were saved (`saved`, see [`saved_file_paths`], or
/// a [`RegionKind::NodeFileContents`] among `kinds`). Those are made again
/// with their directories, so a directory fd on it comes back too.
pub fn made_again_with_contents<'a>(
    dir: &str,
    cwd: &str,
    saved: &BTreeSet<&str>,
    kinds: impl IntoIterator<Item = &'a RegionKind>,
) -> bool {
    let under = |path: &str| {
        path == dir
            || path
                .strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/') || dir.ends_with('/'))
    };
    under(cwd)
        || saved.iter().any(|path| under(path))
        || kinds.into_iter().any(|kind| match kind {
            RegionKind::NodeFileContents { path } => under(path),
            _ => false,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_made_again_with_what_it_holds() {
        let saved: BTreeSet<&str> = ["/scratch/run/out.log"].into();
        let mapped = [RegionKind::NodeFileContents {
            path: "/tmp/tables/t.bin".into(),
        }];
        let made = |dir: &str, cwd: &str| made_again_with_contents(dir, cwd, &saved, &mapped);
        assert!(made("/scratch/run", ""));
        assert!(made("/scratch", ""));
        assert!(made("/tmp/tables", ""));
        assert!(made("/work/steps", "/work/steps"));
        assert!(made("/work", "/work/steps"));
        assert!(made("/", ""));
        // A name that only starts the same is another directory.
        assert!(!made("/scratch/ru", "/work/steps"));
        assert!(!made("/work/step", "/work/steps"));
        assert!(!made("/elsewhere", ""));
    }
}
