//! The manifest's validation: every rejection path, and the fd links.

use super::*;
use crate::format::pack::PackId;

pub(crate) fn sample_rank(rank: u32) -> RankRecord {
    RankRecord {
        rank,
        node: "n1".into(),
        pid: 100 + rank,
        fds: vec![FdRecord {
            fd: 3,
            kind: FdKind::Regular,
            path: "/tmp/log".into(),
            flags: 1,
            offset: 10,
            size_at_checkpoint: 10,
            restore: FdRestore::Restore,
            shares_with: None,
        }],
        mappings: vec![],
        regions: vec![RegionRecord {
            name: "grid".into(),
            addr: 0x7000_0000_0000,
            len: 10,
            kind: RegionKind::Anonymous,
            chunks: vec![ChunkRef {
                offset: 0,
                len: 10,
                stored_len: 74,
                hash: ChunkHash([1; 32]),
                place: ChunkPlace::Pack {
                    pack: PackId([3; 12]),
                    offset: 32,
                },
            }],
        }],
        stats: WriteStats::default(),
        warnings: vec![],
        cwd: String::new(),
        process: Default::default(),
    }
}

pub(crate) fn sample(world: u32) -> Manifest {
    Manifest {
        job: "job1".into(),
        epoch: 3,
        created_unix_ms: 1,
        world_size: world,
        chunk_size: 1 << 20,
        ranks: (0..world).map(sample_rank).collect(),
    }
}

#[test]
fn valid_manifest_passes() {
    sample(3).validate("job1", 3).expect("valid");
}

#[test]
fn rejections() {
    let mut m = sample(2);
    m.ranks[1].rank = 0;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::RankOrder { .. })
    ));

    let m = sample(2);
    assert!(matches!(
        m.validate("job2", 3),
        Err(ManifestError::WrongJob { .. })
    ));
    assert!(matches!(
        m.validate("job1", 4),
        Err(ManifestError::WrongEpoch { .. })
    ));

    let mut m = sample(2);
    m.world_size = 3;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::RankCount { .. })
    ));

    let mut m = sample(1);
    m.world_size = 0;
    m.ranks.clear();
    assert_eq!(m.validate("job1", 3), Err(ManifestError::EmptyWorld));

    let mut m = sample(1);
    let dup = m.ranks[0].regions[0].clone();
    m.ranks[0].regions.push(dup);
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::DuplicateRegion { .. })
    ));

    let mut m = sample(1);
    m.ranks[0].regions[0].len = 11;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::ChunkLayout { .. })
    ));

    let mut m = sample(1);
    m.ranks[0].regions[0].chunks[0].offset = 1;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::ChunkLayout { .. })
    ));

    let mut m = sample(1);
    m.ranks[0].regions[0].name = "../x".into();
    assert!(matches!(m.validate("job1", 3), Err(ManifestError::Name(_))));

    let mut m = sample(1);
    m.ranks[0].fds[0].path = "/tmp/../etc/passwd".into();
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::BadPath { .. })
    ));

    // A restart writes the file and changes into the directory: neither
    // may lead out of where it was.
    let mut m = sample(1);
    m.ranks[0].regions[0].kind = RegionKind::NodeFileContents {
        path: "/tmp/run/../../etc/cron.d/x".into(),
    };
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::BadPath { .. })
    ));
    for (cwd, ok) in [
        ("", true),
        ("/", true),
        ("/work/run 1", true),
        ("run", false),
        ("/work/../etc", false),
    ] {
        let mut m = sample(1);
        m.ranks[0].cwd = cwd.into();
        assert_eq!(m.validate("job1", 3).is_ok(), ok, "cwd {cwd:?}");
    }

    // A restart sets the umask and gives a file it makes its mode: both
    // in range, the file at a path it may write.
    let attrs = |umask: u32, path: &str, mode: u32| {
        let mut m = sample(1);
        m.ranks[0].process = ProcessAttrs {
            umask: Some(umask),
            machine: String::new(),
            saved_files: vec![crate::format::process::SavedFile {
                path: path.into(),
                mode: Some(mode),
                on_node: true,
                written: true,
                dev: 0,
                ino: 0,
            }],
            node_dirs: Vec::new(),
            tails: Vec::new(),
        };
        m.validate("job1", 3)
    };
    assert_eq!(attrs(0o077, "/tmp/in.dat", 0o640), Ok(()));
    assert_eq!(
        attrs(0o7077, "/tmp/in.dat", 0o640),
        Err(ManifestError::Attrs {
            rank: 0,
            source: AttrsError::Umask(0o7077)
        })
    );
    assert!(matches!(
        attrs(0o022, "/tmp/in.dat", 0o100_644),
        Err(ManifestError::Attrs { .. })
    ));
    assert!(matches!(
        attrs(0o022, "/tmp/../etc/passwd", 0o644),
        Err(ManifestError::BadPath { .. })
    ));
    // A directory of the node it makes again: at a path it may make.
    let mut m = sample(1);
    m.ranks[0]
        .process
        .node_dirs
        .push(crate::format::process::NodeDir {
            path: "/tmp/run/../../etc".into(),
            mode: Some(0o700),
        });
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::BadPath { path, .. }) if path == "/tmp/run/../../etc"
    ));

    let mut m = sample(1);
    let dup = m.ranks[0].fds[0].clone();
    m.ranks[0].fds.push(dup);
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::DuplicateFd { .. })
    ));

    let mut m = sample(1);
    m.chunk_size = 1;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::ChunkSize(1))
    ));

    let mut m = sample(1);
    m.ranks[0].regions[0].chunks[0].len = u32::MAX;
    m.chunk_size = MAX_CHUNK_SIZE as u32;
    assert!(matches!(
        m.validate("job1", 3),
        Err(ManifestError::ChunkLayout { .. })
    ));
}

#[test]
fn clean_paths() {
    assert!(is_clean_absolute_path("/a/b"));
    assert!(!is_clean_absolute_path("a/b"));
    assert!(!is_clean_absolute_path("/a/../b"));
    assert!(!is_clean_absolute_path("/a/./b"));
    assert!(!is_clean_absolute_path("/a//b"));
}

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

#[test]
fn a_second_open_of_an_unlinked_file_needs_the_first_restored() {
    let mut rank = sample_rank(0);
    rank.regions[0].kind = RegionKind::UnlinkedFile { fd: 5 };
    let mut first = fd(5, None);
    first.kind = FdKind::Deleted;
    let mut again = fd(6, None);
    again.kind = FdKind::Deleted;
    again.restore = FdRestore::ReopenOf(5);
    check_fd_links(0, &[first.clone(), again.clone()], &rank.regions).unwrap();
    // Through a file that is not restored, or one that is not unlinked.
    let mut lost = first.clone();
    lost.restore = FdRestore::NotRestored("pipe".into());
    assert!(check_fd_links(0, &[lost, again.clone()], &rank.regions).is_err());
    assert!(check_fd_links(0, &[again.clone()], &rank.regions).is_err());
    let mut named = again;
    named.kind = FdKind::Regular;
    assert!(check_fd_links(0, &[first, named], &rank.regions).is_err());
}
