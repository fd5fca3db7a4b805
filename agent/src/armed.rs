//! A restart armed for the ranks that register next on this node: which
//! ranks it still expects, and the ranks it must not let share this node
//! (`cryo_core::format::fds::node_file_clashes`: ranks of different nodes
//! that held different files at one path on their nodes' own
//! filesystems, which would become one file here).

use std::collections::BTreeSet;

use cryo_core::format::fds::{node_file_clashes, NodeFileClash};
use cryo_core::Manifest;

/// See the module.
pub(crate) struct Armed {
    /// The epoch it restores.
    pub(crate) epoch: u64,
    /// The ranks not registered yet.
    pub(crate) pending: BTreeSet<u32>,
    /// The ranks that took it on this node so far.
    taken: Vec<u32>,
    /// Where each rank ran at the checkpoint, by rank.
    nodes: Vec<String>,
    clashes: Vec<NodeFileClash>,
}

impl Armed {
    /// A restart of every rank of `manifest`, its epoch `epoch`.
    pub(crate) fn new(epoch: u64, manifest: &Manifest) -> Armed {
        Armed {
            epoch,
            pending: manifest.ranks.iter().map(|rank| rank.rank).collect(),
            taken: Vec::new(),
            nodes: manifest
                .ranks
                .iter()
                .map(|rank| rank.node.clone())
                .collect(),
            clashes: node_file_clashes(&manifest.ranks),
        }
    }

    /// Lets `rank` restart on this node (`node`): true when it was the last
    /// rank expected; the reason when it may not.
    pub(crate) fn take(&mut self, rank: u32, node: &str) -> Result<bool, String> {
        if !self.pending.contains(&rank) {
            return Err(format!(
                "a restart from epoch {} is armed, and it has no pending rank {rank}",
                self.epoch
            ));
        }
        for clash in &self.clashes {
            // The ranks taken so far may share this node: a pair found
            // now holds `rank`.
            let here = self.taken.iter().copied().chain([rank]);
            let was = |r: u32| {
                let index = usize::try_from(r).unwrap_or(usize::MAX);
                self.nodes.get(index).cloned().unwrap_or_else(|| "?".into())
            };
            if let Some(refusal) = clash.refuse(here, node, was) {
                return Err(format!("{refusal}: restart them on different nodes"));
            }
        }
        self.pending.remove(&rank);
        self.taken.push(rank);
        Ok(self.pending.is_empty())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use cryo_core::format::chunk::ChunkHash;
    use cryo_core::format::manifest::{ChunkRef, RankRecord, RegionKind, RegionRecord};
    use cryo_core::format::pack::ChunkPlace;
    use cryo_core::format::process::SavedFile;

    use super::*;

    /// Rank `rank` ran on `node` and wrote `log`, a file of that node.
    fn rank(rank: u32, node: &str, log: &[u8]) -> RankRecord {
        let mut record = RankRecord::new(rank, node, 10 + rank);
        record.process.saved_files.push(SavedFile {
            path: "/tmp/node.log".into(),
            mode: Some(0o644),
            on_node: true,
            written: true,
            dev: 0,
            ino: 0,
        });
        record.regions.push(RegionRecord {
            name: "cryo:closed:0".into(),
            addr: 0,
            len: log.len() as u64,
            kind: RegionKind::NodeFileContents {
                path: "/tmp/node.log".into(),
            },
            chunks: vec![ChunkRef {
                offset: 0,
                len: u32::try_from(log.len()).unwrap(),
                stored_len: 0,
                hash: ChunkHash::of(log),
                place: ChunkPlace::Loose,
            }],
        });
        record
    }

    fn manifest() -> Manifest {
        Manifest {
            job: "j".into(),
            epoch: 4,
            created_unix_ms: 0,
            world_size: 3,
            chunk_size: 1 << 20,
            ranks: vec![rank(0, "a", b"a"), rank(1, "a", b"a"), rank(2, "b", b"b")],
        }
    }

    #[test]
    fn ranks_that_held_one_node_file_each_are_not_let_onto_one_node() {
        // Nodes a and b each kept a log at one path: rank 2 may not join
        // ranks 0 and 1 on node c; nothing it refused is taken.
        let mut armed = Armed::new(4, &manifest());
        assert_eq!(armed.take(0, "c"), Ok(false));
        assert_eq!(armed.take(1, "c"), Ok(false));
        let refused = armed.take(2, "c").unwrap_err();
        assert!(
            refused.starts_with("ranks 0 (on node a at the checkpoint) and 2 (on node b)")
                && refused.contains("/tmp/node.log")
                && refused.contains("placed together on node c")
                && refused.ends_with("restart them on different nodes"),
            "{refused}"
        );
        assert!(armed.pending.contains(&2));
        // On a node of its own it restarts; the last rank expected ends
        // the restart.
        let mut elsewhere = Armed::new(4, &manifest());
        assert_eq!(elsewhere.take(2, "d"), Ok(false));
        let mut here = Armed::new(4, &manifest());
        here.pending.remove(&2);
        assert_eq!(here.take(0, "c"), Ok(false));
        assert_eq!(here.take(1, "c"), Ok(true));
        // A rank the restart does not expect.
        let unknown = Armed::new(4, &manifest()).take(7, "c").unwrap_err();
        assert!(unknown.contains("has no pending rank 7"), "{unknown}");
    }
}
