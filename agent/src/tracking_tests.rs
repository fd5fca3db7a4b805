//! The scan against the real kernel: this process's own memory, tracked by
//! a real userfaultfd and scanned through its own pagemap.

use std::time::Instant;

use cryo_core::dirty::{Pagemap, WriteTracker};
use cryo_core::format::manifest::RegionKind;
use cryo_core::protocol::RegionInfo;

use super::*;
use crate::procfs::LinuxProcess;

const PAGES: usize = 64;
const CHUNK: usize = 8 * PAGE as usize;

struct Tracked {
    mem: &'static mut [u8],
    _tracker: WriteTracker,
    parked: Parked,
}

fn tracked() -> Tracked {
    let len = PAGES * PAGE as usize;
    // SAFETY: a fresh private anonymous mapping, leaked for the test.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    // SAFETY: `base` is a live mapping of `len` bytes, used only here.
    let mem = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), len) };
    mem.fill(1);
    let tracker = WriteTracker::new().expect("userfaultfd with WP_ASYNC (Linux 6.7+)");
    tracker.register(base as u64, len as u64).unwrap();
    let parked = Parked {
        rank: 0,
        pid: std::process::id(),
        epoch: 1,
        regions: vec![RegionInfo {
            name: "state".into(),
            addr: base as u64,
            len: len as u64,
            kind: RegionKind::Anonymous,
        }],
        runtime_fds: Vec::new(),
        library_fds: Vec::new(),
        warnings: Vec::new(),
        since: Instant::now(),
    };
    Tracked {
        mem,
        _tracker: tracker,
        parked,
    }
}

fn scan_once(t: &Tracked, heat: &mut Heat) -> Option<Vec<bool>> {
    let region = &t.parked.regions[0];
    scan(
        &LinuxProcess,
        &t.parked,
        region,
        heat,
        CHUNK,
        PAGES * PAGE as usize / CHUNK,
    )
}

/// Whether any page of the region is protected now: a protected page reads
/// as not written until it is written.
fn protected_pages(t: &Tracked) -> usize {
    let region = &t.parked.regions[0];
    let written = Pagemap::open(t.parked.pid)
        .unwrap()
        .written(region.addr, region.len, false)
        .unwrap();
    let written: u64 = written.iter().map(|(s, e)| (e - s) / PAGE).sum();
    PAGES - written as usize
}

fn write_pages(t: &mut Tracked, pages: impl Iterator<Item = usize>) {
    for page in pages {
        t.mem[page * PAGE as usize] ^= 0xff;
    }
}

#[test]
fn a_region_found_rewritten_whole_goes_hot_unprotected() {
    let mut t = tracked();
    let mut heat = Heat::default();
    // The first scan measures nothing and protects the region.
    assert!(scan_once(&t, &mut heat).is_some());
    assert_eq!(heat, Heat::Tracked);
    assert_eq!(protected_pages(&t), PAGES);
    // Rewritten whole: hot, every chunk written, and left unprotected so
    // that the application takes no write fault per page.
    write_pages(&mut t, 0..PAGES);
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert!(dirty.iter().all(|d| *d));
    assert_eq!(heat, Heat::Hot { left: HOT_CAPTURES });
    assert_eq!(
        protected_pages(&t),
        0,
        "a region going hot stays unprotected"
    );
}

#[test]
fn a_region_written_in_part_is_protected_again_and_reports_exactly_its_chunks() {
    let mut t = tracked();
    let mut heat = Heat::default();
    scan_once(&t, &mut heat).unwrap();
    // Chunks 1 and 6 of 8.
    write_pages(&mut t, [9, 10, 50].into_iter());
    let dirty = scan_once(&t, &mut heat).unwrap();
    let expected: Vec<bool> = (0..8).map(|c| c == 1 || c == 6).collect();
    assert_eq!(dirty, expected);
    assert_eq!(heat, Heat::Tracked);
    assert_eq!(protected_pages(&t), PAGES, "protected again after the look");
    // The next capture sees only what was written since.
    write_pages(&mut t, [63].into_iter());
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert_eq!(dirty, (0..8).map(|c| c == 7).collect::<Vec<_>>());
}

#[test]
fn the_probe_after_the_hot_captures_protects_the_region_again() {
    let mut t = tracked();
    let mut heat = Heat::Hot { left: 1 };
    let dirty = scan_once(&t, &mut heat).unwrap();
    // Unprotected pages read as written: the probe measures nothing yet.
    assert!(dirty.iter().all(|d| *d));
    assert_eq!(heat, Heat::Tracked);
    assert_eq!(protected_pages(&t), PAGES);
    // Written little since the probe: it stays tracked.
    write_pages(&mut t, [0].into_iter());
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert_eq!(dirty.iter().filter(|d| **d).count(), 1);
    assert_eq!(heat, Heat::Tracked);
}

#[test]
fn an_untracked_region_is_copied_whole() {
    let t = tracked();
    let mut parked = Parked {
        regions: t.parked.regions.clone(),
        since: Instant::now(),
        runtime_fds: Vec::new(),
        library_fds: Vec::new(),
        warnings: Vec::new(),
        ..t.parked
    };
    // Memory no userfaultfd registered.
    let other = vec![0u8; PAGES * PAGE as usize];
    parked.regions[0].addr = (other.as_ptr() as u64).div_ceil(PAGE) * PAGE;
    parked.regions[0].len = (PAGES as u64 - 1) * PAGE;
    let mut heat = Heat::Tracked;
    let region = parked.regions[0].clone();
    assert!(scan(&LinuxProcess, &parked, &region, &mut heat, CHUNK, 8).is_none());
    assert_eq!(heat, Heat::Unmeasured);
}
