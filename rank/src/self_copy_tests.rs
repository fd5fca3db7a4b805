//! The parked copy's tests, rank side.
use super::*;

const U: u64 = UNIT as u64;
use cryo_core::format::manifest::RegionKind;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::os::fd::AsRawFd;

fn budget(len: usize) -> OwnedFd {
    let fd = memfd_create(c"cryo-pool-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, i64::try_from(len).unwrap()).unwrap();
    fd
}

fn region_of(data: &[u8]) -> RegionInfo {
    RegionInfo {
        name: "state".into(),
        addr: data.as_ptr() as u64,
        len: data.len() as u64,
        kind: RegionKind::Anonymous,
    }
}

fn read_back(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let n = nix::sys::uio::pread(fd.as_fd(), &mut out, i64::try_from(offset).unwrap()).unwrap();
    assert_eq!(n, len);
    out
}

#[test]
fn copies_into_the_budget_and_refuses_what_lies_outside() {
    let _turn = TEST_TURN.lock().unwrap_or_else(|p| p.into_inner());
    let data: Vec<u8> = (0..3 * U).map(|i| (i * 7 % 251) as u8).collect();
    let regions = [region_of(&data)];
    let fd = budget(8 * UNIT);
    let dup = || fd.try_clone().unwrap();
    let addr = data.as_ptr() as u64;
    // Two pieces, to slots out of order, on two threads.
    let pieces = [
        CopyPiece {
            addr,
            len: U,
            offset: 5 * U,
        },
        CopyPiece {
            addr: addr + U,
            len: 2 * U - 3,
            offset: U,
        },
    ];
    assert_eq!(copy(Some(dup()), &pieces, 2, &regions), CopyOutcome::Copied);
    assert_eq!(read_back(&fd, 5 * U, UNIT), data[..UNIT]);
    assert_eq!(read_back(&fd, U, 2 * UNIT - 3), data[UNIT..3 * UNIT - 3]);
    // The view stays: a later request without the fd copies too.
    let again = [CopyPiece {
        addr: addr + 7,
        len: 100,
        offset: 0,
    }];
    assert_eq!(copy(None, &again, 1, &regions), CopyOutcome::Copied);
    assert_eq!(read_back(&fd, 0, 100), data[7..107]);
    // Outside the regions, or past the budget: declined, nothing read.
    let outside = [CopyPiece {
        addr: addr + 3 * U - 1,
        len: 2,
        offset: 0,
    }];
    assert!(matches!(
        copy(None, &outside, 1, &regions),
        CopyOutcome::Failed { .. }
    ));
    let wrapping = [CopyPiece {
        addr: u64::MAX - 1,
        len: 4,
        offset: 0,
    }];
    assert!(matches!(
        copy(None, &wrapping, 1, &regions),
        CopyOutcome::Failed { .. }
    ));
    let past = [CopyPiece {
        addr,
        len: 16,
        offset: 8 * U - 8,
    }];
    assert!(matches!(
        copy(None, &past, 1, &regions),
        CopyOutcome::Failed { .. }
    ));
    // Another budget replaces the view.
    let other = budget(2 * UNIT);
    let small = [CopyPiece {
        addr,
        len: 10,
        offset: U,
    }];
    assert_eq!(
        copy(Some(other.try_clone().unwrap()), &small, 1, &regions),
        CopyOutcome::Copied
    );
    assert_eq!(read_back(&other, U, 10), data[..10]);
    assert!(other.as_raw_fd() >= 0);
}

#[test]
fn warm_units_are_filled_as_read_and_cold_ones_for_writing() {
    let page = 4096;
    let per = UNIT / page;
    // Units: warm, warm, one page missing, cold, warm (the last one
    // shorter: the view's end).
    let mut resident = vec![1u8; 4 * per + 3];
    resident[2 * per + 5] = 0;
    resident[3 * per..4 * per].fill(0);
    let to = 4 * UNIT + 3 * page;
    assert_eq!(
        runs(0, to, page, Some(&resident)),
        vec![
            (0, 2 * UNIT, true),
            (2 * UNIT, 4 * UNIT, false),
            (4 * UNIT, to, true)
        ]
    );
    // From an offset, and with no answer from mincore.
    assert_eq!(
        runs(UNIT, 3 * UNIT, page, Some(&resident[..2 * per])),
        vec![(UNIT, 3 * UNIT, true)]
    );
    assert_eq!(
        runs(UNIT, 2 * UNIT, page, None),
        vec![(UNIT, 2 * UNIT, false)]
    );
}

#[test]
fn the_view_finds_which_pages_the_agent_warmed() {
    let _turn = TEST_TURN.lock().unwrap_or_else(|p| p.into_inner());
    let data = vec![9u8; 2 * UNIT];
    let regions = [region_of(&data)];
    let fd = budget(4 * UNIT);
    // The agent's side warms the first two units.
    nix::sys::uio::pwrite(fd.as_fd(), &vec![1u8; 2 * UNIT], 0).unwrap();
    let piece = [CopyPiece {
        addr: data.as_ptr() as u64,
        len: 2 * U,
        offset: U,
    }];
    assert_eq!(
        copy(Some(fd.try_clone().unwrap()), &piece, 1, &regions),
        CopyOutcome::Copied
    );
    let view = VIEW.lock().unwrap_or_else(|p| p.into_inner());
    let view = view.as_ref().unwrap();
    let resident = resident(view.addr, 0, 4 * UNIT, page_size()).unwrap();
    let per = UNIT / page_size();
    assert!(resident[..3 * per].iter().all(|b| b & 1 == 1));
    assert!(resident[3 * per..].iter().all(|b| b & 1 == 0));
    assert_eq!(read_back(&fd, U, 2 * UNIT), data);
    assert_eq!(read_back(&fd, 0, UNIT), vec![1u8; UNIT]);
}

#[test]
fn the_slots_set_aside_are_filled_in_the_background() {
    let _turn = TEST_TURN.lock().unwrap_or_else(|p| p.into_inner());
    let fd = budget(8 * UNIT);
    // The fds open on this budget's memfd.
    let ino = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
    let open_on_budget = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
            .filter(|m| std::os::unix::fs::MetadataExt::ino(m) == ino)
            .count()
    };
    let sent = fd.try_clone().unwrap();
    assert_eq!(open_on_budget(), 2);
    // Past the budget's end: ignored, the rest filled.
    fill_later(Some(sent), vec![(2 * U, 3 * U), (7 * U, 4 * U)]);
    // The fd the agent sent is closed before the rank runs on.
    assert_eq!(open_on_budget(), 1);
    let filled = |unit: usize| {
        let view = VIEW.lock().unwrap_or_else(|p| p.into_inner());
        view.as_ref()
            .is_some_and(|v| v.len == 8 * UNIT && v.is_populated(unit))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(2..5).all(filled) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!((2..5).all(filled));
    assert!(!filled(0) && !filled(1) && !filled(5) && !filled(7));
    // Without the budget's fd nothing happens.
    fill_later(None, vec![(0, U)]);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!filled(0));
    // The copy into filled units copies as before.
    let data = vec![5u8; UNIT];
    let piece = [CopyPiece {
        addr: data.as_ptr() as u64,
        len: U,
        offset: 3 * U,
    }];
    assert_eq!(
        copy(None, &piece, 1, &[region_of(&data)]),
        CopyOutcome::Copied
    );
    assert_eq!(read_back(&fd, 3 * U, UNIT), data);
}
