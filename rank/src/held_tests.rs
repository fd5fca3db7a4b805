//! What a rank holds beyond its regions, on real files and mappings.

use super::*;

const MAPS: &str = "\
55d1c8a00000-55d1c8a02000 r--p 00000000 fd:01 1234                       /usr/bin/app
55d1c8a02000-55d1c8a04000 r-xp 00002000 fd:01 1234                       /usr/bin/app
7f0000000000-7f0000002000 rw-s 00000000 fd:01 99                         /work/out put.dat
7f0000002000-7f0000003000 r--p 00001000 fd:01 98                         /work/in.dat
7f0000003000-7f0000004000 r--p 00000000 fd:01 97                         /opt/mpi/lib/libmpi.so
7f0000004000-7f0000005000 r-xp 00001000 fd:01 97                         /opt/mpi/lib/libmpi.so
7f0000005000-7f0000006000 rw-s 00000000 00:05 96                         /dev/shm/seg
7f0000005000-7f0000006000 rw-s 00000000 00:05 90                         /dev/shm/vader_segment.vm.0.79c30001.1
7f0000005000-7f0000006000 rw-s 00000000 00:05 89                         /dev/shm/ucx_shm_posix_29826eb2 (deleted)
7f0000005000-7f0000006000 rw-s 00000000 00:05 88                         /dev/zero (deleted)
7f0000006000-7f0000007000 rw-p 00000000 fd:01 95                         /work/gone (deleted)
7f0000007000-7f0000008000 rw-s 00000000 00:01 93                         /memfd:app (deleted)
7f0000008000-7f0000009000 rw-s 00000000 00:01 92                         /memfd:cryo-control (deleted)
7f0000100000-7f0000200000 rw-s 00000000 00:01 91                         /memfd:cryo-pool (deleted)
7f0000009000-7f000000a000 rw-s 00000000 00:01 0                          /SYSV00000000 (deleted)
7f000000a000-7f000000b000 rw-s 00000000 00:01 5                          /SYSV0000beef (deleted)
5a0000000000-5a0000001000 rw-s 00000000 fd:01 94                         /work/region.dat
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

#[test]
fn the_applications_own_mappings_are_told_apart() {
    let maps = parse_maps(MAPS);
    let mut baseline = Baseline::default();
    baseline
        .mappings
        .insert((0x7f00_0000_2000, 0x7f00_0000_3000, 98));
    let (mine, lost) = app_mappings(&maps, &baseline, (0x5a00_0000_0000, 1 << 36));
    let paths: Vec<&str> = mine.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(paths, vec!["/work/out put.dat"]);
    assert!(mine[0].shared);
    assert_eq!(mine[0].prot, 3);
    // The runtime's control page, its view of the agent's copy budget,
    // MPICH's IPC_PRIVATE segment and the MPI libraries' /dev/shm
    // segments are not the application's; a keyed System V segment and
    // POSIX shared memory it made are, and are named.
    let lost: Vec<&str> = lost.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(
        lost,
        vec![
            "/dev/shm/seg",
            "/work/gone (deleted)",
            "/memfd:app (deleted)",
            "/SYSV0000beef (deleted)"
        ]
    );
    // Without the baseline, the input mapping counts as the application's.
    let (mine, _) = app_mappings(&maps, &Baseline::default(), (0x5a00_0000_0000, 1 << 36));
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[1].offset, 0x1000);
}

/// Files on a filesystem of the node (a disk, while the store is on a
/// shared filesystem) that the rank only reads, or maps and closed, are
/// saved whole; beside a store on that disk they are not; past the cap
/// each is named.
#[test]
fn node_local_files_read_or_mapped_are_saved_whole() {
    use std::os::fd::AsRawFd;

    use cryo_core::locality::NFS_MAGIC;

    let _serial = crate::test_support::SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let (input, mesh) = (disk.path().join("input"), disk.path().join("mesh"));
    fs::write(&input, vec![7u8; 10_000]).unwrap();
    fs::write(&mesh, vec![9u8; 5000]).unwrap();
    // Staged by someone else: not written by the rank.
    crate::closed_files::forget_all();
    let read = fs::File::open(&input).unwrap();
    let len = NonZeroUsize::new(5000).unwrap();
    let mapped = {
        let file = fs::File::open(&mesh).unwrap();
        // SAFETY: a new private read-only mapping at an address the kernel
        // chooses; unmapped at the end of the test.
        let mapped = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                file.as_fd(),
                0,
            )
        }
        .unwrap();
        // Closed past the runtime's `close`, which would note it as a
        // file read and closed: only its mapping names it.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: the fd was just taken from its File.
        unsafe { libc::syscall(libc::SYS_close, fd) };
        mapped
    };
    let shared_store = Some(Filesystem {
        magic: NFS_MAGIC,
        dev: u64::MAX,
    });
    let gathered = |writable, store| {
        let caps = Caps {
            unlinked: 1 << 30,
            writable,
        };
        gather(
            0,
            &Baseline::default(),
            [&open_fds(), &[], &[]],
            (0, 0),
            caps,
            store,
        )
        .unwrap()
    };
    let (input_fd, mesh_path) = (read.as_raw_fd(), mesh.to_str().unwrap().to_owned());
    let input_contents = RegionKind::FileContents { fd: input_fd };
    let mesh_contents = RegionKind::NodeFileContents {
        path: mesh_path.clone(),
    };

    let held = gathered(1 << 40, shared_store);
    let find = |kind: &RegionKind| held.regions.iter().find(|r| &r.kind == kind);
    let saved = find(&input_contents).expect("the input read on the node's disk is not saved");
    assert_eq!(saved.len, 10_000);
    // SAFETY: the region's bytes are the Held's temporary mapping of the
    // file, alive until `held` drops.
    let bytes = unsafe { std::slice::from_raw_parts(saved.addr as *const u8, 10_000) };
    assert!(bytes.iter().all(|&b| b == 7));
    let whole = find(&mesh_contents).expect("the mapped file on the node's disk is not saved");
    assert_eq!(whole.len, 5000);
    assert!(
        whole.name.starts_with("cryo:mapped-file:"),
        "{}",
        whole.name
    );
    let mapping = held
        .regions
        .iter()
        .any(|r| matches!(&r.kind, RegionKind::AppMapping { path, .. } if *path == mesh_path));
    assert!(mapping, "the mapping itself is saved too");
    drop(held);

    // The store on the same disk: a restart elsewhere finds them.
    let held = gathered(1 << 40, Filesystem::of(disk.path()).ok());
    let find = |kind: &RegionKind| held.regions.iter().find(|r| &r.kind == kind);
    assert!(find(&input_contents).is_none() && find(&mesh_contents).is_none());
    drop(held);

    let held = gathered(100, shared_store);
    let find = |kind: &RegionKind| held.regions.iter().find(|r| &r.kind == kind);
    assert!(find(&input_contents).is_none() && find(&mesh_contents).is_none());
    let named = |what: &str| {
        held.warnings
            .iter()
            .any(|w| w.contains(what) && w.contains("over CRYO_WRITABLE_CAP"))
    };
    assert!(
        named(&format!(
            "fd {input_fd} ({}) is open for reading",
            input.display()
        )),
        "{:?}",
        held.warnings
    );
    assert!(
        named(&format!("the mapped file {mesh_path} is 5000 bytes")),
        "{:?}",
        held.warnings
    );
    // SAFETY: the mapping made above, used by nothing else.
    unsafe { munmap(mapped, len.get()) }.unwrap();
}
