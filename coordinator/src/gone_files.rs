//! Files a restart will not find where the checkpoint left them, told
//! before the ranks start.
//!
//! A restart reopens each file a rank held by its path at the checkpoint.
//! cryo does not undo what happened to names after it: a file renamed or
//! removed since (or a directory renamed with it) is gone from that path.
//! A rank makes such a file again there when its contents were saved (a
//! file open for writing in place, the working directory), and cannot
//! reopen it otherwise. Either way the rank would say so only in its
//! agent's log or by failing; this says it where the user restarts.
//!
//! Only paths on a filesystem that every node sees alike are judged: the
//! store's, or one known to be shared. A file on a node's own disk or in
//! its memory may well be missing here and present on its node, and a
//! restart makes those again on purpose (`rank/src/remake.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use cryo_core::format::fds::SavedFiles;
use cryo_core::format::manifest::{FdKind, FdRestore, Manifest};
use cryo_core::locality::{Filesystem, Locality};

/// What the restart can tell about paths here (a trait so that tests can
/// say what exists and where).
pub trait PathProbe {
    /// Whether something is at `path` (a dangling link counts).
    fn exists(&self, path: &Path) -> bool;
    /// The filesystem holding `path`, which exists.
    fn filesystem(&self, path: &Path) -> Option<Filesystem>;
}

/// The real filesystem.
#[derive(Debug)]
pub struct HostPaths;

impl PathProbe for HostPaths {
    fn exists(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn filesystem(&self, path: &Path) -> Option<Filesystem> {
        Filesystem::of(path).ok()
    }
}

/// A path the checkpoint's ranks held that is not there any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoneFile {
    /// The path at the checkpoint.
    pub path: String,
    /// The ranks that held it, and by which fd (`None`: as their working
    /// directory).
    pub holders: Vec<(u32, Option<i32>)>,
    /// Whether the restart makes it again from what the checkpoint saved.
    pub made_again: bool,
}

impl GoneFile {
    /// One line for people.
    pub fn describe(&self, epoch: u64) -> String {
        let held = self
            .holders
            .iter()
            .map(|(rank, fd)| match fd {
                Some(fd) => format!("rank {rank} fd {fd}"),
                None => format!("rank {rank}'s working directory"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        if self.made_again {
            format!(
                "note: {} ({held}) is gone since epoch {epoch} (renamed or removed after the \
                 checkpoint); the restart makes it again at that path from the checkpoint, and \
                 a copy renamed since stays as it is",
                self.path
            )
        } else {
            format!(
                "warning: {} ({held}) is gone since epoch {epoch} (renamed or removed after the \
                 checkpoint) and its contents were not saved: the rank cannot reopen it and the \
                 restart will fail; put it back at that path",
                self.path
            )
        }
    }
}

/// The paths held at `manifest`'s checkpoint (files and directories held
/// open, working directories) that are gone from a filesystem shared like
/// the store, on `store`.
pub fn gone_since(manifest: &Manifest, store: Filesystem, probe: &dyn PathProbe) -> Vec<GoneFile> {
    let mut gone: BTreeMap<String, GoneFile> = BTreeMap::new();
    for rank in &manifest.ranks {
        let saved = SavedFiles::of(&rank.fds, rank.regions.iter().map(|r| &r.kind));
        let held_fds = rank.fds.iter().filter(|fd| {
            fd.restore == FdRestore::Restore
                && fd.shares_with.is_none()
                && matches!(fd.kind, FdKind::Regular | FdKind::Directory)
        });
        let mut held: Vec<(&str, Option<i32>, bool)> = held_fds
            .map(|fd| {
                let made_again = match fd.kind {
                    FdKind::Directory => saved.make_directory(&fd.path, &rank.cwd),
                    _ => saved.contains(&fd.path),
                };
                (fd.path.as_str(), Some(fd.fd), made_again)
            })
            .collect();
        if !rank.cwd.is_empty() {
            held.push((rank.cwd.as_str(), None, true));
        }
        for (path, fd, made_again) in held {
            if !gone_from_shared(Path::new(path), store, probe) {
                continue;
            }
            let entry = gone.entry(path.to_owned()).or_insert_with(|| GoneFile {
                path: path.to_owned(),
                holders: Vec::new(),
                made_again,
            });
            entry.holders.push((rank.rank, fd));
            entry.made_again &= made_again;
        }
    }
    gone.into_values().collect()
}

/// Whether `path` is absent while the nearest directory above it that is
/// there lies on the store's filesystem or on a shared one: then no node
/// finds it either.
fn gone_from_shared(path: &Path, store: Filesystem, probe: &dyn PathProbe) -> bool {
    if !path.is_absolute() || probe.exists(path) {
        return false;
    }
    let Some(above) = path.ancestors().skip(1).find(|dir| probe.exists(dir)) else {
        return false;
    };
    probe
        .filesystem(above)
        .is_some_and(|fs| fs.dev == store.dev || fs.locality() == Locality::Shared)
}

/// Prints a line for each path of `manifest` gone since its checkpoint,
/// judged against the store at `store_dir`.
pub fn announce(manifest: &Manifest, store_dir: &Path) {
    let Ok(store) = Filesystem::of(store_dir) else {
        return;
    };
    for file in gone_since(manifest, store, &HostPaths) {
        cryo_core::say!("cryo: {}", file.describe(manifest.epoch));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use cryo_core::format::manifest::{FdRecord, RankRecord, RegionKind, RegionRecord};
    use cryo_core::locality::{EXT4_MAGIC, LUSTRE_MAGIC, TMPFS_MAGIC};

    use super::*;

    /// Paths that exist, each on a filesystem.
    struct Paths(HashMap<&'static str, Filesystem>);

    impl PathProbe for Paths {
        fn exists(&self, path: &Path) -> bool {
            self.0.contains_key(path.to_str().unwrap())
        }
        fn filesystem(&self, path: &Path) -> Option<Filesystem> {
            self.0.get(path.to_str().unwrap()).copied()
        }
    }

    const STORE: Filesystem = Filesystem {
        magic: LUSTRE_MAGIC,
        dev: 7,
    };

    fn fd(fd: i32, kind: FdKind, path: &str) -> FdRecord {
        FdRecord {
            fd,
            kind,
            path: path.into(),
            flags: nix::libc::O_RDWR,
            offset: 0,
            size_at_checkpoint: 10,
            restore: FdRestore::Restore,
            shares_with: None,
        }
    }

    fn rank(r: u32, cwd: &str, fds: Vec<FdRecord>, saved: &[i32]) -> RankRecord {
        let mut record = RankRecord::new(r, format!("n{r}"), 100 + r);
        record.cwd = cwd.into();
        record.regions = saved
            .iter()
            .map(|fd| RegionRecord {
                name: format!("cryo:file:{fd}"),
                addr: 0,
                len: 10,
                kind: RegionKind::FileContents { fd: *fd },
                chunks: vec![],
            })
            .collect();
        record.fds = fds;
        record
    }

    fn manifest(ranks: Vec<RankRecord>) -> Manifest {
        Manifest {
            job: "j".into(),
            epoch: 3,
            created_unix_ms: 0,
            world_size: u32::try_from(ranks.len()).unwrap(),
            chunk_size: 1 << 20,
            ranks,
        }
    }

    fn paths() -> Paths {
        let shared = STORE;
        let home = Filesystem {
            magic: EXT4_MAGIC,
            dev: 9,
        };
        let tmp = Filesystem {
            magic: TMPFS_MAGIC,
            dev: 2,
        };
        Paths(HashMap::from([
            ("/", home),
            ("/lus", shared),
            ("/lus/run", shared),
            ("/lus/run/kept.log", shared),
            ("/tmp", tmp),
            ("/home", home),
        ]))
    }

    #[test]
    fn a_file_gone_from_the_stores_filesystem_is_named_with_what_the_restart_does() {
        let ranks = vec![
            rank(
                0,
                "/lus/run",
                vec![
                    fd(3, FdKind::Regular, "/lus/run/kept.log"),
                    fd(4, FdKind::Regular, "/lus/run/work/inplace.0"),
                    fd(5, FdKind::Regular, "/lus/run/input.dat"),
                    fd(6, FdKind::Directory, "/lus/run/work"),
                ],
                &[4],
            ),
            rank(
                1,
                "/lus/run/work",
                vec![fd(3, FdKind::Regular, "/lus/run/input.dat")],
                &[],
            ),
        ];
        let gone = gone_since(&manifest(ranks), STORE, &paths());
        let by_path: HashMap<&str, &GoneFile> = gone.iter().map(|g| (g.path.as_str(), g)).collect();
        assert_eq!(by_path.len(), 3, "{gone:?}");
        assert!(by_path["/lus/run/work/inplace.0"].made_again);
        // Not saved, and held by two ranks: named once, with both.
        let input = by_path["/lus/run/input.dat"];
        assert!(!input.made_again);
        assert_eq!(input.holders, vec![(0, Some(5)), (1, Some(3))]);
        assert!(
            input.describe(3).contains("will fail"),
            "{}",
            input.describe(3)
        );
        // A directory holding a saved file, and a working directory, come back.
        assert!(by_path["/lus/run/work"].made_again);
        assert_eq!(
            by_path["/lus/run/work"].holders,
            vec![(0, Some(6)), (1, None)]
        );
        assert!(by_path["/lus/run/work"].describe(3).starts_with("note:"));
    }

    #[test]
    fn files_of_a_nodes_own_filesystems_and_files_still_there_are_not_named() {
        let ranks = vec![rank(
            0,
            "/lus/run",
            vec![
                fd(3, FdKind::Regular, "/lus/run/kept.log"),
                fd(4, FdKind::Regular, "/tmp/node.log"),
                fd(5, FdKind::Regular, "/home/u/local.dat"),
                fd(6, FdKind::Regular, "relative.dat"),
            ],
            &[4],
        )];
        assert_eq!(gone_since(&manifest(ranks), STORE, &paths()), vec![]);
    }

    #[test]
    fn fds_not_restored_or_shared_with_another_are_not_named() {
        let mut not_ours = fd(3, FdKind::Regular, "/lus/run/gone.a");
        not_ours.restore = FdRestore::NotRestored("pipe".into());
        let mut dup = fd(4, FdKind::Regular, "/lus/run/gone.b");
        dup.shares_with = Some(2);
        let deleted = fd(5, FdKind::Deleted, "/lus/run/gone.c");
        let ranks = vec![rank(0, "", vec![not_ours, dup, deleted], &[])];
        assert_eq!(gone_since(&manifest(ranks), STORE, &paths()), vec![]);
    }
}
