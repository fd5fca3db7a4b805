//! The links between a rank's fd records, checked before a restart acts on
//! them: an fd that shares an open file description names a lower fd of
//! the same rank that is itself a group leader, and an unlinked file marked
//! for restore has its saved contents in a region.

use std::collections::HashMap;

use crate::format::manifest::{
    FdKind, FdRecord, FdRestore, ManifestError, RegionKind, RegionRecord,
};

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

/// Checks `shares_with` and unlinked-file links of one rank's fds.
pub fn check_fd_links(
    rank: u32,
    fds: &[FdRecord],
    regions: &[RegionRecord],
) -> Result<(), ManifestError> {
    let by_fd: HashMap<i32, &FdRecord> = fds.iter().map(|fd| (fd.fd, fd)).collect();
    let bad = |fd: i32, problem: String| ManifestError::FdLink { rank, fd, problem };
    for fd in fds {
        if let Some(leader) = fd.shares_with {
            let Some(target) = by_fd.get(&leader) else {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which is not recorded"),
                ));
            };
            if leader >= fd.fd {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which is not lower"),
                ));
            }
            if target.shares_with.is_some() {
                return Err(bad(
                    fd.fd,
                    format!("shares its open file with fd {leader}, which itself shares another's"),
                ));
            }
        }
        if fd.kind == FdKind::Deleted
            && fd.restore == FdRestore::Restore
            && fd.shares_with.is_none()
        {
            let has_contents = regions.iter().any(|region| {
                matches!(region.kind, RegionKind::UnlinkedFile { fd: owner } if owner == fd.fd)
            });
            if !has_contents {
                return Err(bad(
                    fd.fd,
                    "an unlinked file to restore without saved contents".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::tests::sample_rank;

    fn fd(fd: i32, shares_with: Option<i32>) -> FdRecord {
        FdRecord {
            fd,
            kind: FdKind::Regular,
            path: "/tmp/x".into(),
            flags: 1,
            offset: 0,
            size_at_checkpoint: 0,
            restore: FdRestore::Restore,
            shares_with,
        }
    }

    #[test]
    fn a_dup_names_a_lower_leader() {
        let rank = sample_rank(0);
        let regions = &rank.regions;
        check_fd_links(0, &[fd(3, None), fd(4, Some(3)), fd(9, Some(3))], regions).unwrap();
        for fds in [
            vec![fd(3, None), fd(4, Some(5))],
            vec![fd(3, Some(4)), fd(4, None)],
            vec![fd(3, None), fd(4, Some(3)), fd(5, Some(4))],
            vec![fd(3, Some(3))],
        ] {
            assert!(
                matches!(
                    check_fd_links(0, &fds, regions),
                    Err(ManifestError::FdLink { .. })
                ),
                "{fds:?}"
            );
        }
    }

    #[test]
    fn an_unlinked_file_needs_its_contents() {
        let mut rank = sample_rank(0);
        let mut deleted = fd(5, None);
        deleted.kind = FdKind::Deleted;
        assert!(check_fd_links(0, &[deleted.clone()], &rank.regions).is_err());
        rank.regions[0].kind = RegionKind::UnlinkedFile { fd: 5 };
        check_fd_links(0, &[deleted], &rank.regions).unwrap();
    }
}
