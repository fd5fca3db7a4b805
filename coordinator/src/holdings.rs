//! What each rank held at a checkpoint (fds and file mappings) and what a
//! restart will do with each, read from the manifest: for `cryo describe`,
//! and for the warnings printed when a checkpoint commits.

use cryo_core::format::manifest::{
    Backing, FdKind, FdRecord, FdRestore, Manifest, RankRecord, RegionKind,
};

use cryo_core::format::fds::{node_file_clashes, NodeFileClash};

use crate::human;

/// What a restart does with one fd.
pub fn fd_plan(fd: &FdRecord) -> String {
    let what = match fd.kind {
        FdKind::Deleted => format!("unlinked file, was {}", fd.path),
        _ => fd.path.clone(),
    };
    let action = match (&fd.restore, fd.shares_with) {
        (FdRestore::Restore, Some(leader)) => {
            format!("dup2 from fd {leader} (they share one open file: offset and flags)")
        }
        (FdRestore::Restore, None) => match fd.kind {
            FdKind::Deleted => format!(
                "recreated unlinked from its saved contents ({}), offset {}",
                human::bytes(fd.size_at_checkpoint),
                fd.offset
            ),
            FdKind::Directory => "reopened by path (directory)".into(),
            FdKind::CharDevice => "reopened by path (device)".into(),
            _ if !writes(fd) => format!("reopened by path, offset {}", fd.offset),
            _ => format!(
                "reopened by path, offset {}, cut back to {} bytes if written since",
                fd.offset, fd.size_at_checkpoint
            ),
        },
        (FdRestore::ReopenOf(of), _) => format!(
            "opened again through fd {of} (the same unlinked file), offset {}",
            fd.offset
        ),
        (FdRestore::NotOurs(why), _) => format!("left alone: {why}"),
        (FdRestore::NotRestored(why), _) => format!("NOT RESTORED: {why}"),
    };
    format!("fd {} ({what}): {action}", fd.fd)
}

/// Whether the fd was open for writing.
fn writes(fd: &FdRecord) -> bool {
    matches!(
        fd.flags & nix::libc::O_ACCMODE,
        nix::libc::O_WRONLY | nix::libc::O_RDWR
    )
}

/// The mode a file made again gets, when the checkpoint recorded it.
fn mode_of(rank: &RankRecord, path: &str) -> String {
    mode_text(rank.process.mode_of(path))
}

/// ", mode 0750" for a recorded mode, else nothing.
fn mode_text(mode: Option<u32>) -> String {
    mode.map_or_else(String::new, |mode| format!(", mode {mode:04o}"))
}

/// One line per fd, application mapping and warning of a rank.
pub fn rank_plan(rank: &RankRecord) -> Vec<String> {
    let mut out = Vec::new();
    if !rank.cwd.is_empty() {
        out.push(format!(
            "working directory {}: the rank returns to it, made again if it is missing",
            rank.cwd
        ));
    }
    if let Some(mask) = rank.process.umask {
        out.push(format!("umask {mask:04o}: set again"));
    }
    out.extend(rank.fds.iter().map(fd_plan));
    out.extend(rank.process.node_dirs.iter().map(|dir| {
        format!(
            "directory {}: on a filesystem of its node; made again where it is missing{}",
            dir.path,
            mode_text(dir.mode)
        )
    }));
    for region in &rank.regions {
        if let RegionKind::FileContents { fd } = region.kind {
            let record = rank.fds.iter().find(|f| f.fd == fd);
            let in_place = record.is_some_and(|f| writes(f) && f.flags & nix::libc::O_APPEND == 0);
            out.push(if in_place {
                format!(
                    "fd {fd}: open for writing in place; its saved contents ({}) are written back",
                    human::bytes(region.len)
                )
            } else {
                format!(
                    "fd {fd}: on a filesystem of its node; its saved contents ({}) make it again \
                     where it is missing{}",
                    human::bytes(region.len),
                    record.map_or_else(String::new, |f| mode_of(rank, &f.path))
                )
            });
        }
        if let RegionKind::NodeFileContents { path } = &region.kind {
            out.push(format!(
                "{path}: written and closed, or mapped, on a filesystem of its node; its saved \
                 contents ({}) make it again where it is missing{}",
                human::bytes(region.len),
                mode_of(rank, path)
            ));
        }
        if matches!(region.kind, RegionKind::ClosedFiles) {
            out.push(format!(
                "files written and closed before the checkpoint: cut back to their size at it \
                 if they grew since and their bytes before it are unchanged (table of {})",
                human::bytes(region.len)
            ));
        }
        if let RegionKind::AppMapping {
            path,
            offset,
            shared,
            prot,
            map_len,
        } = &region.kind
        {
            let kind = if *shared { "shared" } else { "private" };
            let contents = if *shared && prot & 2 == 0 {
                "re-mapped from the file"
            } else if *shared {
                "re-mapped from the file, saved contents written back"
            } else {
                "re-mapped from the file, saved contents copied in"
            };
            out.push(format!(
                "mapping {:#x}+{} ({path} at offset {offset}, {kind}, prot {prot}): {contents} at the same address",
                region.addr,
                human::bytes(*map_len)
            ));
        }
    }
    let others = rank
        .mappings
        .iter()
        .filter(|m| m.region.is_none() && matches!(m.backing, Backing::File { .. }))
        .count();
    if others > 0 {
        out.push(format!(
            "{others} other file mappings (libraries, the MPI library's shared memory): left to the new process"
        ));
    }
    out.extend(rank.warnings.iter().map(|w| format!("WARNING: {w}")));
    out
}

/// What a restart from `manifest` will not give back, one line each,
/// naming the rank.
pub fn warnings(manifest: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    for rank in &manifest.ranks {
        for fd in &rank.fds {
            if let FdRestore::NotRestored(why) = &fd.restore {
                out.push(format!(
                    "rank {}: fd {} ({}) will not be restored: {why}",
                    rank.rank, fd.fd, fd.path
                ));
            }
        }
        out.extend(
            rank.warnings
                .iter()
                .map(|w| format!("rank {}: {w}", rank.rank)),
        );
    }
    out.extend(node_file_clashes(&manifest.ranks).iter().map(clash_warning));
    out
}

/// The warning for ranks that held different files at one path on their
/// nodes' own filesystems, which a restart keeps on different nodes.
fn clash_warning(clash: &NodeFileClash) -> String {
    const SHOWN: usize = 4;
    let mut copies: Vec<String> = (clash.copies.iter().take(SHOWN))
        .map(|copy| format!("node {} ({})", copy.node, crate::human::ranks(&copy.ranks)))
        .collect();
    if clash.copies.len() > SHOWN {
        copies.push(format!("{} more", clash.copies.len() - SHOWN));
    }
    format!(
        "{} is a different file on {}, each on the node's own filesystem, written or \
         unlike the others: a restart refuses to put ranks of two of them on one node, \
         where they would share one file",
        clash.path,
        copies.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use cryo_core::format::manifest::{RegionRecord, WriteStats};
    use cryo_core::format::process::{NodeDir, ProcessAttrs, SavedFile};

    use super::*;

    fn fd(fd: i32, kind: FdKind, restore: FdRestore, shares_with: Option<i32>) -> FdRecord {
        FdRecord {
            fd,
            kind,
            path: format!("/work/f{fd}"),
            flags: 1,
            offset: 7,
            size_at_checkpoint: 9,
            restore,
            shares_with,
        }
    }

    fn region(name: &str, len: u64, kind: RegionKind) -> RegionRecord {
        RegionRecord {
            name: name.into(),
            addr: 0,
            len,
            kind,
            chunks: vec![],
        }
    }

    #[test]
    fn plans_and_warnings_name_each_fd() {
        let rank = RankRecord {
            rank: 3,
            node: "n".into(),
            pid: 1,
            fds: vec![
                fd(
                    1,
                    FdKind::Pipe,
                    FdRestore::NotOurs("standard stream".into()),
                    None,
                ),
                fd(3, FdKind::Regular, FdRestore::Restore, None),
                fd(4, FdKind::Regular, FdRestore::Restore, Some(3)),
                fd(5, FdKind::Deleted, FdRestore::Restore, None),
                fd(
                    6,
                    FdKind::Socket,
                    FdRestore::NotRestored("socket".into()),
                    None,
                ),
                FdRecord {
                    flags: 0,
                    ..fd(7, FdKind::Regular, FdRestore::Restore, None)
                },
            ],
            mappings: vec![],
            regions: vec![
                region(
                    cryo_core::format::closed::CLOSED_FILES_REGION,
                    2048,
                    RegionKind::ClosedFiles,
                ),
                region("cryo:file:3", 9, RegionKind::FileContents { fd: 3 }),
                region("cryo:file:7", 5, RegionKind::FileContents { fd: 7 }),
                region(
                    "cryo:mapped-file:0",
                    4096,
                    RegionKind::NodeFileContents {
                        path: "/tmp/table".into(),
                    },
                ),
            ],
            stats: WriteStats::default(),
            warnings: vec!["fd 3 (/work/f3) holds a file lock".into()],
            cwd: "/work/run 1".into(),
            process: ProcessAttrs {
                umask: Some(0o27),
                saved_files: vec![SavedFile {
                    path: "/tmp/table".into(),
                    mode: Some(0o750),
                    on_node: true,
                    written: false,
                    dev: 1,
                    ino: 2,
                }],
                node_dirs: vec![NodeDir {
                    path: "/tmp/out".into(),
                    mode: Some(0o750),
                }],
                ..ProcessAttrs::default()
            },
        };
        let plan = rank_plan(&rank).join("\n");
        assert!(
            plan.contains(
                "\ndirectory /tmp/out: on a filesystem of its node; made again where it is \
                 missing, mode 0750\n"
            ),
            "{plan}"
        );
        assert!(plan.starts_with("working directory /work/run 1: the rank returns to it"));
        assert!(plan.contains("\numask 0027: set again\n"), "{plan}");
        assert!(plan.contains("fd 4 (/work/f4): dup2 from fd 3"), "{plan}");
        assert!(
            plan.contains("fd 5 (unlinked file, was /work/f5): recreated unlinked"),
            "{plan}"
        );
        assert!(
            plan.contains("fd 6 (/work/f6): NOT RESTORED: socket"),
            "{plan}"
        );
        assert!(plan.contains("fd 1 (/work/f1): left alone"), "{plan}");
        // Written in place, its contents go back; only read (on a
        // filesystem of the node), they make it again where missing.
        assert!(
            plan.contains("fd 3 (/work/f3): reopened by path, offset 7, cut back to 9 bytes")
                && plan.contains("fd 3: open for writing in place; its saved contents (9 B)"),
            "{plan}"
        );
        assert!(
            plan.contains("fd 7 (/work/f7): reopened by path, offset 7\n")
                && plan
                    .contains("fd 7: on a filesystem of its node; its saved contents (5 B) make")
                && plan.contains("make it again where it is missing\n"),
            "{plan}"
        );
        assert!(
            plan.contains("/tmp/table: written and closed, or mapped, on a filesystem of its node")
                && plan.contains("where it is missing, mode 0750"),
            "{plan}"
        );
        assert!(
            plan.contains("files written and closed before the checkpoint: cut back")
                && plan.contains("(table of 2.0 KiB)"),
            "{plan}"
        );
        let manifest = Manifest {
            job: "j".into(),
            epoch: 1,
            created_unix_ms: 0,
            world_size: 1,
            chunk_size: 1 << 20,
            ranks: vec![rank],
        };
        assert_eq!(
            warnings(&manifest),
            vec![
                "rank 3: fd 6 (/work/f6) will not be restored: socket".to_owned(),
                "rank 3: fd 3 (/work/f3) holds a file lock".to_owned()
            ]
        );
    }

    #[test]
    fn a_file_of_each_nodes_own_at_one_path_is_named_at_the_checkpoint() {
        // Ranks 0-4 on node a and 5 on node b each wrote /tmp/node.log
        // on their node's own filesystem.
        let ranks = (0..6)
            .map(|r| {
                let node = if r < 5 { "a" } else { "b" };
                let mut record = RankRecord::new(r, node, 1);
                record.process.saved_files.push(SavedFile {
                    path: "/tmp/node.log".into(),
                    mode: None,
                    on_node: true,
                    written: true,
                    dev: 0,
                    ino: 0,
                });
                record.regions.push(region(
                    "cryo:closed:0",
                    0,
                    RegionKind::NodeFileContents {
                        path: "/tmp/node.log".into(),
                    },
                ));
                record
            })
            .collect();
        let manifest = Manifest {
            job: "j".into(),
            epoch: 1,
            created_unix_ms: 0,
            world_size: 6,
            chunk_size: 1 << 20,
            ranks,
        };
        assert_eq!(
            warnings(&manifest),
            [
                "/tmp/node.log is a different file on node a (ranks 0, 1, 2, 3 and 1 more), \
              node b (rank 5), each on the node's own filesystem, written or unlike the \
              others: a restart refuses to put ranks of two of them on one node, where they \
              would share one file"
            ]
        );
    }
}
