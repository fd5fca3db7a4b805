//! Whether a file can be found by a restart on another node: which
//! filesystem holds it, told by its `statfs` type and device.
//!
//! A restart reopens files and file mappings by path, on whatever nodes it
//! runs. A file on the same filesystem as the store is as shared as the
//! store. Otherwise a file in memory (tmpfs) or on a disk of this node
//! (ext4, xfs…) while the store is on a network or parallel filesystem
//! (NFS, Lustre, GPFS…) will not be there on another node, and the
//! checkpoint says so when it is taken, not the restart when it fails.
//! Filesystems of unknown kind (FUSE among them) are given the benefit of
//! the doubt: a warning must be right when it is given.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Where a filesystem's files live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locality {
    /// In this node's memory: tmpfs, ramfs.
    InMemory,
    /// On a disk of this node: ext4, xfs, btrfs, overlayfs…
    NodeDisk,
    /// On a network or parallel filesystem every node can mount.
    Shared,
    /// Not known here.
    Unknown,
}

/// The filesystem that holds a file: its `statfs` type and the file's
/// device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filesystem {
    /// `f_type` of `statfs(2)`.
    pub magic: i64,
    /// `st_dev` of the file.
    pub dev: u64,
}

/// `f_type` of tmpfs.
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `f_type` of ext2, ext3 and ext4.
pub const EXT4_MAGIC: i64 = 0xEF53;
/// `f_type` of NFS.
pub const NFS_MAGIC: i64 = 0x6969;
/// `f_type` of Lustre.
pub const LUSTRE_MAGIC: i64 = 0x0BD0_0BD0;
/// `f_type` of every FUSE filesystem.
pub const FUSE_MAGIC: i64 = 0x6573_5546;

/// Known `f_type` values: name and locality.
const KNOWN: [(i64, &str, Locality); 33] = [
    (TMPFS_MAGIC, "tmpfs", Locality::InMemory),
    (0x8584_58f6, "ramfs", Locality::InMemory),
    (EXT4_MAGIC, "ext4", Locality::NodeDisk),
    (0x5846_5342, "xfs", Locality::NodeDisk),
    (0x9123_683E, "btrfs", Locality::NodeDisk),
    (0xF2F5_2010, "f2fs", Locality::NodeDisk),
    (0x794c_7630, "overlayfs", Locality::NodeDisk),
    (0x2FC1_2FC1, "zfs", Locality::NodeDisk),
    (0x3153_464a, "jfs", Locality::NodeDisk),
    (0x5265_4973, "reiserfs", Locality::NodeDisk),
    (0xca45_1a4e, "bcachefs", Locality::NodeDisk),
    (0x4d44, "vfat", Locality::NodeDisk),
    (0x2011_BAB0, "exfat", Locality::NodeDisk),
    (0x5346_544e, "ntfs", Locality::NodeDisk),
    (0x7366_7173, "squashfs", Locality::Unknown),
    (NFS_MAGIC, "nfs", Locality::Shared),
    (0x517B, "smb", Locality::Shared),
    (0xFE53_4D42, "smb2", Locality::Shared),
    (0xFF53_4D42, "cifs", Locality::Shared),
    (LUSTRE_MAGIC, "lustre", Locality::Shared),
    (0x4750_4653, "gpfs", Locality::Shared),
    (0x1983_0326, "beegfs", Locality::Shared),
    (0x00C3_6400, "cephfs", Locality::Shared),
    (0x5346_414F, "afs", Locality::Shared),
    (0x6B41_4653, "kafs", Locality::Shared),
    (0xAAD7_AAEA, "panfs", Locality::Shared),
    (0x2003_0528, "orangefs", Locality::Shared),
    (0x0116_1970, "gfs2", Locality::Shared),
    (0x7461_636f, "ocfs2", Locality::Shared),
    (0x0102_1997, "9p", Locality::Shared),
    (FUSE_MAGIC, "fuse", Locality::Unknown),
    (0x0000_9fa0, "proc", Locality::Unknown),
    (0x6265_6572, "sysfs", Locality::Unknown),
];

impl Filesystem {
    /// The filesystem holding `path` (symbolic links followed, so
    /// `/proc/<pid>/fd/<n>` names the open file's).
    pub fn of(path: &Path) -> io::Result<Filesystem> {
        let fs = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
        let dev = std::fs::metadata(path)?.dev();
        Ok(Filesystem {
            // `__fsword_t`: i64 here, narrower on 32-bit targets.
            #[allow(clippy::useless_conversion)]
            magic: i64::from(fs.filesystem_type().0),
            dev,
        })
    }

    fn known(&self) -> Option<&'static (i64, &'static str, Locality)> {
        // statfs's f_type is signed on some ABIs: compare the low 32 bits.
        KNOWN
            .iter()
            .find(|(magic, _, _)| magic & 0xFFFF_FFFF == self.magic & 0xFFFF_FFFF)
    }

    /// Where its files live.
    pub fn locality(&self) -> Locality {
        self.known().map_or(Locality::Unknown, |k| k.2)
    }

    /// Its kind for people: `tmpfs`, `nfs`, or the type in hex.
    pub fn name(&self) -> String {
        self.known()
            .map_or_else(|| format!("type {:#x}", self.magic), |k| k.1.to_owned())
    }
}

/// Why a restart on another node will not find a file on `file`, when the
/// store is on `store`; `None` when it will (or cannot be told).
pub fn unreachable_elsewhere(file: Filesystem, store: Filesystem) -> Option<String> {
    if file.dev == store.dev {
        return None;
    }
    match (file.locality(), store.locality()) {
        (Locality::InMemory, _) => Some(format!(
            "is in this node's memory ({}): a restart on another node, or after a reboot, will not find it",
            file.name()
        )),
        (Locality::NodeDisk, Locality::Shared) => Some(format!(
            "is on a disk of this node ({}) while the store is on {}: a restart on another node will not find it",
            file.name(),
            store.name()
        )),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TMPFS: i64 = TMPFS_MAGIC;
    const EXT4: i64 = EXT4_MAGIC;
    const NFS: i64 = NFS_MAGIC;
    const LUSTRE: i64 = LUSTRE_MAGIC;
    const FUSE: i64 = FUSE_MAGIC;

    fn fs(magic: i64, dev: u64) -> Filesystem {
        Filesystem { magic, dev }
    }

    #[test]
    fn memory_is_named_wherever_the_store_is() {
        for store in [fs(NFS, 1), fs(EXT4, 1), fs(FUSE, 1)] {
            let why = unreachable_elsewhere(fs(TMPFS, 2), store).unwrap();
            assert!(why.contains("memory (tmpfs)"), "{why}");
        }
    }

    #[test]
    fn a_node_disk_is_named_only_beside_a_shared_store() {
        let why = unreachable_elsewhere(fs(EXT4, 2), fs(LUSTRE, 1)).unwrap();
        assert!(why.contains("ext4") && why.contains("lustre"), "{why}");
        // A store on a disk of the node: the job restarts here or not at all.
        assert_eq!(unreachable_elsewhere(fs(EXT4, 2), fs(EXT4, 1)), None);
    }

    #[test]
    fn the_stores_own_filesystem_and_unknown_kinds_pass() {
        assert_eq!(unreachable_elsewhere(fs(TMPFS, 1), fs(TMPFS, 1)), None);
        assert_eq!(unreachable_elsewhere(fs(NFS, 2), fs(LUSTRE, 1)), None);
        assert_eq!(unreachable_elsewhere(fs(FUSE, 2), fs(NFS, 1)), None);
        assert_eq!(unreachable_elsewhere(fs(0x1234, 2), fs(NFS, 1)), None);
    }

    #[test]
    fn a_sign_extended_type_is_still_known() {
        // 0xFF534D42 (cifs) read as a signed 32-bit f_type.
        let cifs = fs(
            i64::from(i32::from_ne_bytes(0xFF53_4D42_u32.to_ne_bytes())),
            1,
        );
        assert_eq!(cifs.locality(), Locality::Shared);
        assert_eq!(cifs.name(), "cifs");
    }

    #[test]
    fn real_filesystems_are_read() {
        let shm = Filesystem::of(Path::new("/dev/shm")).unwrap();
        assert_eq!(shm.locality(), Locality::InMemory);
        let err = Filesystem::of(Path::new("/no/such/place")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
