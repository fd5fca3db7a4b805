//! The names of the regions that carry what a rank held beyond its own
//! regions: unlinked files, files written in place, its own file mappings.
//! (The links between fd records are checked with the rest of a rank
//! record, in `manifest.rs`.)

use std::collections::BTreeMap;

use super::chunk::ChunkHash;
use super::manifest::{FdRecord, RankRecord, RegionKind, RegionRecord};

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
    format!("{CLOSED_CONTENTS_PREFIX}{n}")
}

/// What the names of [`closed_contents_region_name`] start with.
pub const CLOSED_CONTENTS_PREFIX: &str = "cryo:closed:";

/// The name of the region that holds the contents of the `n`th file read
/// (never written) and closed on a filesystem of the rank's node.
pub fn closed_read_region_name(n: usize) -> String {
    format!("{CLOSED_READ_PREFIX}{n}")
}

/// What the names of [`closed_read_region_name`] start with.
pub const CLOSED_READ_PREFIX: &str = "cryo:closed-read:";

/// The name of the region that holds the contents of the `n`th file on a
/// filesystem of the rank's node that it maps and no fd of it saves.
pub fn mapped_file_region_name(n: usize) -> String {
    format!("cryo:mapped-file:{n}")
}

/// Region names starting with this are the runtime's own.
pub const RESERVED_REGION_PREFIX: &str = "cryo:";

/// How a checkpoint saved a file's contents, which says where to look at
/// the file (its mode, its filesystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedBy {
    /// A [`RegionKind::FileContents`] region, through the fd open on it.
    Fd(i32),
    /// A [`RegionKind::NodeFileContents`] region, whole by path: written
    /// and closed, or mapped with no fd saving it.
    Path,
}

/// The file whose contents a region of `kind` saves, and how, among a
/// rank's `fds`; `None` for a region of memory.
pub fn saved_file<'a>(fds: &'a [FdRecord], kind: &'a RegionKind) -> Option<(&'a str, SavedBy)> {
    match kind {
        RegionKind::FileContents { fd } => (fds.iter().find(|f| f.fd == *fd))
            .map(|record| (record.path.as_str(), SavedBy::Fd(*fd))),
        RegionKind::NodeFileContents { path } => Some((path.as_str(), SavedBy::Path)),
        _ => None,
    }
}

/// The files whose contents a checkpoint saved, by path: a restart makes
/// each again where it is missing, with its directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedFiles<'a> {
    /// Each file once (a dup is the same file), in the order of the
    /// regions, with how the first region to save it did.
    files: Vec<(&'a str, SavedBy)>,
}

impl<'a> SavedFiles<'a> {
    /// The files saved by the regions of `kinds`, among a rank's `fds`.
    pub fn of(fds: &'a [FdRecord], kinds: impl IntoIterator<Item = &'a RegionKind>) -> Self {
        let mut saved = SavedFiles::default();
        for kind in kinds {
            let Some(file) = saved_file(fds, kind) else {
                continue;
            };
            if !saved.contains(file.0) {
                saved.files.push(file);
            }
        }
        saved
    }

    /// Each saved file once, with how it was saved.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, SavedBy)> + '_ {
        self.files.iter().copied()
    }

    /// Whether the file at `path` was saved, either way.
    pub fn contains(&self, path: &str) -> bool {
        self.files.iter().any(|(saved, _)| *saved == path)
    }

    /// Whether a restart that does not find the directory `dir` makes it
    /// again anyway: it is, or holds, the working directory `cwd`, or it
    /// holds a saved file. Those are made again with their directories, so
    /// a directory fd on it comes back too.
    pub fn make_directory(&self, dir: &str, cwd: &str) -> bool {
        let under = |path: &str| {
            path == dir
                || path
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/') || dir.ends_with('/'))
        };
        under(cwd) || self.files.iter().any(|(path, _)| under(path))
    }
}

/// A path that ranks held on filesystems of their own nodes as different
/// files (a log each node keeps at `/tmp/node.log`) that differ or that a
/// rank wrote: a restart that put two such ranks on one node would give
/// them one file, and lose one rank's. Files one read-only input staged
/// alike on every node are not a clash: sharing one copy changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFileClash {
    /// The path.
    pub path: String,
    /// One per file: the ranks that held it and where.
    pub copies: Vec<NodeCopy>,
}

/// Two ranks a restart would place on one node that held different
/// files at one path on their nodes' own filesystems
/// ([`NodeFileClash::refuse`]): the launch refuses it, or the node's agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ranks {first} (on node {first_was} at the checkpoint) and {second} (on node \
     {second_was}) held different files at {path} on their nodes' own filesystems; \
     placed together on node {node} they would share one, and one rank's would be lost"
)]
pub struct SharedNodeFile {
    /// The node they were placed on.
    pub node: String,
    /// The path.
    pub path: String,
    /// The lower rank.
    pub first: u32,
    /// Where it ran at the checkpoint.
    pub first_was: String,
    /// The other rank.
    pub second: u32,
    /// Where it ran at the checkpoint.
    pub second_was: String,
}

/// One file of a [`NodeFileClash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCopy {
    /// The node its ranks ran on (the first one's).
    pub node: String,
    /// The ranks that held it.
    pub ranks: Vec<u32>,
    /// Whether one of them wrote it.
    pub written: bool,
    /// Its saved length and chunk names: equal for equal bytes.
    contents: (u64, Vec<ChunkHash>),
}

impl NodeCopy {
    fn clashes_with(&self, other: &NodeCopy) -> bool {
        self.written || other.written || self.contents != other.contents
    }
}

impl NodeFileClash {
    /// Whether ranks `a` and `b` may not share a node: they held
    /// different copies, and those clash.
    pub fn keeps_apart(&self, a: u32, b: u32) -> bool {
        self.crowded([a, b]).is_some()
    }

    /// Among `ranks`, placed on one node, the first two it keeps apart
    /// (the lower rank first), if any.
    pub fn crowded(&self, ranks: impl IntoIterator<Item = u32>) -> Option<(u32, u32)> {
        // The lowest rank here of each copy.
        let mut here: Vec<(usize, u32)> = Vec::new();
        for rank in ranks {
            let Some(copy) = self.copy_of(rank) else {
                continue;
            };
            if let Some(&(_, other)) = here.iter().find(|&&(seen, _)| {
                seen != copy && self.copies[seen].clashes_with(&self.copies[copy])
            }) {
                return Some((other.min(rank), other.max(rank)));
            }
            if !here.iter().any(|&(seen, _)| seen == copy) {
                here.push((copy, rank));
            }
        }
        None
    }

    /// Among `ranks`, placed on `node`, the first two it keeps apart, as
    /// the refusal that names them; `was` tells where a rank ran at the
    /// checkpoint.
    pub fn refuse(
        &self,
        ranks: impl IntoIterator<Item = u32>,
        node: &str,
        was: impl Fn(u32) -> String,
    ) -> Option<SharedNodeFile> {
        let (first, second) = self.crowded(ranks)?;
        Some(SharedNodeFile {
            node: node.to_owned(),
            path: self.path.clone(),
            first,
            first_was: was(first),
            second,
            second_was: was(second),
        })
    }

    /// The index of the copy `rank` held.
    fn copy_of(&self, rank: u32) -> Option<usize> {
        (self.copies.iter()).position(|copy| copy.ranks.binary_search(&rank).is_ok())
    }
}

/// The clashes among the files `ranks` saved from filesystems of their
/// nodes (see [`NodeFileClash`]). Ranks of one node hold one file at a
/// path; so do ranks of nodes emulated on one machine when the device and
/// inode match.
pub fn node_file_clashes(ranks: &[RankRecord]) -> Vec<NodeFileClash> {
    // Per path, per file: the file is its machine, device and inode when
    // known, else its node.
    let mut by_path: BTreeMap<&str, BTreeMap<(&str, u64, u64), NodeCopy>> = BTreeMap::new();
    for rank in ranks {
        for file in rank.process.saved_files.iter().filter(|file| file.on_node) {
            let Some(region) = saved_region(rank, &file.path) else {
                continue;
            };
            let key = if rank.process.machine.is_empty() || file.ino == 0 {
                (rank.node.as_str(), 0, 0)
            } else {
                (rank.process.machine.as_str(), file.dev, file.ino)
            };
            let copy = by_path
                .entry(&file.path)
                .or_default()
                .entry(key)
                .or_insert_with(|| NodeCopy {
                    node: rank.node.clone(),
                    ranks: Vec::new(),
                    written: false,
                    contents: (region.len, region.chunks.iter().map(|c| c.hash).collect()),
                });
            copy.ranks.push(rank.rank);
            copy.written |= file.written;
        }
    }
    by_path
        .into_iter()
        .filter_map(|(path, copies)| {
            // In the order of their lowest ranks (the ranks come in
            // order), not of the boot ids.
            let mut copies: Vec<NodeCopy> = copies.into_values().collect();
            for copy in &mut copies {
                copy.ranks.sort_unstable();
            }
            copies.sort_by_key(|copy| copy.ranks.first().copied());
            let clash = (0..copies.len())
                .any(|i| (copies[i + 1..].iter()).any(|other| copies[i].clashes_with(other)));
            clash.then(|| NodeFileClash {
                path: path.to_owned(),
                copies,
            })
        })
        .collect()
}

/// The region of `rank` that saved the contents of the file at `path`:
/// through an fd on it, or whole by path.
pub fn saved_region<'a>(rank: &'a RankRecord, path: &str) -> Option<&'a RegionRecord> {
    rank.regions.iter().find(|region| match &region.kind {
        RegionKind::FileContents { fd } => {
            (rank.fds.iter()).any(|record| record.fd == *fd && record.path == path)
        }
        RegionKind::NodeFileContents { path: saved } => saved == path,
        _ => false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::manifest::{FdKind, FdRestore};
    use super::*;

    #[test]
    fn a_directory_is_made_again_with_what_it_holds() {
        let fds = [FdRecord {
            fd: 5,
            kind: FdKind::Regular,
            path: "/scratch/run/out.log".into(),
            flags: 1,
            offset: 0,
            size_at_checkpoint: 0,
            restore: FdRestore::Restore,
            shares_with: None,
        }];
        let kinds = [
            RegionKind::FileContents { fd: 5 },
            RegionKind::NodeFileContents {
                path: "/tmp/tables/t.bin".into(),
            },
            RegionKind::FileContents { fd: 9 },
        ];
        let saved = SavedFiles::of(&fds, &kinds);
        assert!(saved.contains("/scratch/run/out.log") && saved.contains("/tmp/tables/t.bin"));
        assert!(!saved.contains("/scratch/run"));
        let made = |dir: &str, cwd: &str| saved.make_directory(dir, cwd);
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

    /// Rank `rank` on `node` (of `machine`) saved `bytes` at `path`, a
    /// file of its node (device 1, inode `ino`), through an fd or whole.
    fn holding(
        rank: u32,
        node: &str,
        machine: &str,
        path: &str,
        file: (u64, bool, &[u8]),
    ) -> RankRecord {
        let (ino, written, bytes) = file;
        let mut record = RankRecord::new(rank, node, 100 + rank);
        record.process.machine = machine.into();
        record
            .process
            .saved_files
            .push(crate::format::process::SavedFile {
                path: path.into(),
                mode: Some(0o644),
                on_node: true,
                written,
                dev: 1,
                ino,
            });
        record.regions.push(RegionRecord {
            name: closed_contents_region_name(0),
            addr: 0,
            len: bytes.len() as u64,
            kind: RegionKind::NodeFileContents { path: path.into() },
            chunks: vec![crate::format::manifest::ChunkRef {
                offset: 0,
                len: u32::try_from(bytes.len()).unwrap(),
                stored_len: 0,
                hash: ChunkHash::of(bytes),
                place: crate::format::pack::ChunkPlace::Loose,
            }],
        });
        record
    }

    #[test]
    fn ranks_of_other_nodes_that_held_other_files_at_one_path_clash() {
        const LOG: &str = "/tmp/node.log";
        // A log each node wrote, on hosts a and b; ranks 0 and 1 share a.
        let ranks = [
            holding(0, "a", "boot-a", LOG, (7, true, b"a's lines")),
            holding(1, "a", "boot-a", LOG, (7, false, b"a's lines")),
            holding(2, "b", "boot-b", LOG, (7, true, b"b's lines")),
        ];
        let clashes = node_file_clashes(&ranks);
        assert_eq!(clashes.len(), 1);
        let clash = &clashes[0];
        assert_eq!(clash.path, LOG);
        assert_eq!(clash.copies.len(), 2);
        assert!(clash.keeps_apart(0, 2) && clash.keeps_apart(2, 1));
        assert!(!clash.keeps_apart(0, 1), "one node's ranks held one file");
        assert!(!clash.keeps_apart(0, 9), "rank 9 held no copy");
        assert_eq!(
            clash.crowded([9, 1, 0]),
            None,
            "ranks 0 and 1 held one file"
        );
        assert_eq!(clash.crowded([1, 9, 0, 2]), Some((1, 2)));
        assert_eq!(clash.crowded(0..3), Some((0, 2)));
        let was = |rank: u32| format!("n{rank}");
        assert_eq!(
            clash.refuse([2, 1], "c", was).unwrap().to_string(),
            "ranks 1 (on node n1 at the checkpoint) and 2 (on node n2) held different files \
             at /tmp/node.log on their nodes' own filesystems; placed together on node c they \
             would share one, and one rank's would be lost"
        );
        assert_eq!(clash.refuse([0, 1], "c", was), None);
        // Named in the order of their lowest ranks, whatever the boot ids.
        let swapped = [
            holding(0, "a", "boot-z", LOG, (7, true, b"a's lines")),
            holding(1, "b", "boot-a", LOG, (7, true, b"b's lines")),
        ];
        let nodes: Vec<String> = (node_file_clashes(&swapped)[0].copies.iter())
            .map(|copy| copy.node.clone())
            .collect();
        assert_eq!(nodes, ["a", "b"]);

        // Written alike (both empty so far): one file after a restart
        // would take both nodes' lines.
        let empty = [
            holding(0, "a", "boot-a", LOG, (7, true, b"")),
            holding(1, "b", "boot-b", LOG, (7, true, b"")),
        ];
        assert!(node_file_clashes(&empty)[0].keeps_apart(0, 1));

        // An input staged alike on every node and only read: no clash. One
        // staged differently: a clash.
        let input = |bytes: &'static [u8]| {
            [
                holding(0, "a", "boot-a", "/tmp/in", (3, false, b"mesh")),
                holding(1, "b", "boot-b", "/tmp/in", (3, false, bytes)),
            ]
        };
        assert!(node_file_clashes(&input(b"mesh")).is_empty());
        assert!(node_file_clashes(&input(b"other mesh"))[0].keeps_apart(0, 1));

        // Nodes emulated on one machine share its filesystems: the same
        // device and inode are one file, whatever the node names; another
        // inode there is another file.
        let emulated = |ino: u64| {
            [
                holding(0, "a", "boot-1", LOG, (7, true, b"both ranks' lines")),
                holding(1, "b", "boot-1", LOG, (ino, true, b"both ranks' lines")),
            ]
        };
        assert!(node_file_clashes(&emulated(7)).is_empty());
        assert!(node_file_clashes(&emulated(8))[0].keeps_apart(0, 1));

        // A shared filesystem's file is not the node's.
        let mut shared = holding(1, "b", "boot-b", LOG, (7, true, b"b's lines"));
        shared.process.saved_files[0].on_node = false;
        assert!(node_file_clashes(&[ranks[0].clone(), shared]).is_empty());
    }
}
