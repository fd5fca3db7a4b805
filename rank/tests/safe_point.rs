//! The rank runtime against a scripted agent: registration with the control
//! page fd, the cost of a safe point with no checkpoint pending, and a park
//! / resume round trip.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cryo_core::protocol::{
    read_message, recv_message_with_fd, write_message, AgentToRank, ControlPage, Hello, Peer,
    RankToAgent, StartMode, CONTROL_PAGE_LEN,
};
use cryo_rank::{Backing, Config, SafePoint};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};

#[test]
fn safe_point_is_cheap_and_parks_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (page_tx, page_rx) = std::sync::mpsc::channel::<usize>();
    let (parked_tx, parked_rx) = std::sync::mpsc::channel::<RankToAgent>();
    let agent = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let (hello, fd) = recv_message_with_fd::<Hello>(&sock).unwrap();
        assert!(matches!(hello.peer, Peer::Rank { rank: 7, .. }));
        // No token configured: the rank answers the challenge without one.
        let (_, proof) = cryo_core::auth::challenge(&mut &sock).unwrap();
        assert_eq!(proof.mac, None);
        let fd = fd.expect("control page fd");
        // SAFETY: a fresh shared mapping of the rank's 4 KiB memfd.
        let page = unsafe {
            mmap(
                None,
                NonZeroUsize::new(CONTROL_PAGE_LEN).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .unwrap();
        write_message(
            &mut &sock,
            &AgentToRank::Welcome {
                start: StartMode::Fresh,
                node: "n".into(),
            },
        )
        .unwrap();
        page_tx.send(page.as_ptr() as usize).unwrap();
        // A checkpoint asked for before the first safe point, then one
        // asked for once the safe point is on its fast path.
        for _ in 0..2 {
            let parked = read_message::<RankToAgent>(&mut &sock).unwrap();
            let epoch = match &parked {
                RankToAgent::Parked { epoch, .. } => *epoch,
                other => panic!("{other:?}"),
            };
            parked_tx.send(parked).unwrap();
            write_message(&mut &sock, &AgentToRank::Resume { epoch }).unwrap();
        }
        // Goodbye at finalize.
        assert_eq!(
            read_message::<RankToAgent>(&mut &sock).unwrap(),
            RankToAgent::Goodbye
        );
    });

    let info = cryo_rank::init_with(Config {
        socket: Some(socket),
        job: "j".into(),
        rank: 7,
        ..Config::alone(0x5b00_0000_0000, 1 << 30)
    })
    .unwrap();
    assert_eq!(info.restored_epoch, None);
    assert!(cryo_rank::init().is_err(), "a second init is refused");
    let grid = cryo_rank::region("grid", 10_000, Backing::Anonymous).unwrap();
    assert_eq!(grid.as_ptr() as u64, 0x5b00_0000_0000);
    grid[9_999] = 1;
    let second = cryo_rank::region("second", 1, Backing::Anonymous).unwrap();
    // 10 000 bytes take 3 pages, then one guard page
    assert_eq!(second.as_ptr() as u64, 0x5b00_0000_0000 + 4 * 4096);
    assert!(
        cryo_rank::region("grid", 1, Backing::Anonymous).is_err(),
        "duplicate name"
    );

    let page_addr = page_rx.recv().unwrap();
    // SAFETY: the scripted agent's mapping of the control page stays alive
    // (it is never unmapped) and holds only atomics.
    let page = unsafe { &*(page_addr as *const ControlPage) };
    // The bytes of its regions, for the agent to keep warm before the
    // first checkpoint.
    assert_eq!(page.region_bytes.load(Ordering::Acquire), 10_001);

    // The rank marks its first safe point, after which the agent warms its
    // budget; a checkpoint asked for before it is taken there.
    assert_eq!(page.computing.load(Ordering::Acquire), 0);
    page.checkpoint_requested.store(4, Ordering::Release);
    assert_eq!(
        cryo_rank::checkpoint_point().unwrap(),
        SafePoint::Checkpointed(4)
    );
    assert_eq!(page.computing.load(Ordering::Acquire), 1);
    assert!(matches!(
        parked_rx.recv().unwrap(),
        RankToAgent::Parked { epoch: 4, .. }
    ));

    // No checkpoint pending: measure the safe point.
    let n = 20_000_000u32;
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(
            std::hint::black_box(cryo_rank::checkpoint_point()).unwrap(),
            SafePoint::Continue
        );
    }
    let per_call = start.elapsed().as_nanos() as f64 / f64::from(n);
    eprintln!("checkpoint_point with nothing pending: {per_call:.2} ns per call");
    assert!(per_call < 100.0, "{per_call} ns per safe point");

    // A pending checkpoint parks the rank until the agent resumes it.
    page.checkpoint_requested.store(5, Ordering::Release);
    assert_eq!(
        cryo_rank::checkpoint_point().unwrap(),
        SafePoint::Checkpointed(5)
    );
    assert_eq!(page.checkpoint_requested.load(Ordering::Acquire), 0);
    match parked_rx.recv().unwrap() {
        RankToAgent::Parked {
            epoch,
            regions,
            runtime_fds,
            ..
        } => {
            assert_eq!(epoch, 5);
            assert_eq!(
                // The test process may hold unlinked files of its own
                // (`cryo:fd:N`), which the runtime saves too.
                regions
                    .iter()
                    .map(|r| r.name.as_str())
                    .filter(|name| !name.starts_with("cryo:"))
                    .collect::<Vec<_>>(),
                vec!["grid", "second"]
            );
            assert!(
                runtime_fds
                    .iter()
                    .all(|fd| *fd >= cryo_rank::RUNTIME_FD_FLOOR),
                "{runtime_fds:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cryo_rank::checkpoint_point().unwrap(), SafePoint::Continue);
    cryo_rank::finalize();
    agent.join().unwrap();
}
