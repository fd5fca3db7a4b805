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
    tracked_pages(PAGES)
}

fn tracked_pages(pages: usize) -> Tracked {
    let len = pages * PAGE as usize;
    // Page-aligned memory of its own (the tracker works on whole pages),
    // leaked for the test.
    let layout = std::alloc::Layout::from_size_align(len, PAGE as usize).unwrap();
    // SAFETY: `layout` has a non-zero size.
    let base = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!base.is_null());
    // SAFETY: `base` is a live allocation of `len` bytes, used only here.
    let mem = unsafe { std::slice::from_raw_parts_mut(base, len) };
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
        usize::try_from(region.len).unwrap() / CHUNK,
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
    usize::try_from(region.len / PAGE - written).unwrap()
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

/// Pages per chunk in these tests.
const CHUNK_PAGES: usize = CHUNK / PAGE as usize;

#[test]
fn a_large_hot_region_is_probed_on_a_sample_and_stays_hot_unprotected() {
    let chunks = SAMPLE_MIN_CHUNKS;
    let mut t = tracked_pages(chunks * CHUNK_PAGES);
    let mut heat = Heat::Hot { left: 1 };
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert!(dirty.iter().all(|d| *d), "unprotected since it went hot");
    assert_eq!(heat, Heat::Sampled);
    // Only every SAMPLE_EVERYth chunk is protected.
    let sampled = chunks.div_ceil(SAMPLE_EVERY);
    assert_eq!(protected_pages(&t), sampled * CHUNK_PAGES);
    // Still rewritten whole: hot again, and nothing left protected.
    write_pages(&mut t, 0..chunks * CHUNK_PAGES);
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert!(dirty.iter().all(|d| *d));
    assert_eq!(heat, Heat::Hot { left: HOT_CAPTURES });
    assert_eq!(protected_pages(&t), 0);
}

#[test]
fn a_sampled_region_written_in_part_is_tracked_whole_again() {
    let chunks = SAMPLE_MIN_CHUNKS;
    let pages = chunks * CHUNK_PAGES;
    let mut t = tracked_pages(pages);
    let mut heat = Heat::Hot { left: 1 };
    scan_once(&t, &mut heat).unwrap();
    assert_eq!(heat, Heat::Sampled);
    // Two of the four sampled chunks written, and one other chunk.
    let first_page = |c: usize| c * CHUNK_PAGES;
    write_pages(
        &mut t,
        [first_page(0), first_page(16), first_page(5) + 3].into_iter(),
    );
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert_eq!(heat, Heat::Tracked);
    // The chunks not sampled were unprotected: they count as written. The
    // sampled ones are exact.
    for (c, d) in dirty.iter().enumerate() {
        let expected = c % SAMPLE_EVERY != 0 || c == 0 || c == 16;
        assert_eq!(*d, expected, "chunk {c}");
    }
    // Protected whole again: the next capture measures every chunk.
    assert_eq!(protected_pages(&t), pages);
    write_pages(&mut t, [first_page(7)].into_iter());
    let dirty = scan_once(&t, &mut heat).unwrap();
    assert_eq!(dirty, (0..chunks).map(|c| c == 7).collect::<Vec<_>>());
}

#[test]
fn pages_of_a_chunk_cover_an_unaligned_buffer_and_stay_inside_it() {
    let region = RegionInfo {
        name: "buffer".into(),
        addr: 0x10_0100,
        len: 3 * PAGE,
        kind: RegionKind::Anonymous,
    };
    assert_eq!(pages_of(&region, 0, region.len), (0x10_0000, 4 * PAGE));
    assert_eq!(pages_of(&region, PAGE, PAGE), (0x10_1000, 2 * PAGE));
    assert_eq!(
        pages_of(&region, 2 * PAGE, 10 * PAGE),
        (0x10_2000, 2 * PAGE)
    );
    assert_eq!(pages_of(&region, 5 * PAGE, PAGE), (0x10_3000, PAGE));
}
