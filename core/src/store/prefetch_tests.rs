//! The prefetch on a real store: what it plans to ask for, that the pages
//! come into the page cache, and that failures and a stop only count.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::errno::Errno;

use super::PrefetchPlan;
use crate::format::chunk::ChunkCodec;
use crate::format::limits::MIN_CHUNK_SIZE;
use crate::format::manifest::{Manifest, RankRecord, RegionKind};
use crate::format::pack::{ChunkPlace, ENTRY_HEADER_LEN};
use crate::store::fault_fs::{FaultFs, FsOp};
use crate::store::writer::{ChunkLayout, WriterConfig};
use crate::store::{JobStore, Store};

const CHUNK: usize = MIN_CHUNK_SIZE;

fn noise(seed: u64, chunks: usize) -> Vec<u8> {
    crate::store::test_support::noise(seed, CHUNK * chunks)
}

fn record(rank: u32) -> RankRecord {
    crate::store::test_support::empty_record(rank)
}

/// A committed epoch 1 of two ranks, each with two regions: `states[r]`.
fn store_with(
    layout: ChunkLayout,
    states: [Vec<u8>; 2],
) -> (tempfile::TempDir, JobStore, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let job = Store::create(dir.path().join("store"))
        .unwrap()
        .job("heat")
        .unwrap();
    let config = WriterConfig {
        chunk_size: CHUNK,
        codec: ChunkCodec::default(),
        layout,
    };
    let writer = job.begin_epoch(1, config).unwrap();
    for (rank, state) in (0u32..).zip(&states) {
        let rank_writer = writer.rank(rank);
        let mut rec = record(rank);
        let (a, b) = state.split_at(state.len() / 2);
        for (name, data, addr) in [("a", a, 0x7f00_0000_0000u64), ("b", b, 0x7f10_0000_0000)] {
            rec.regions.push(
                rank_writer
                    .store_region(name, addr, RegionKind::Anonymous, data)
                    .unwrap(),
            );
        }
        rank_writer.finish(rec).unwrap();
    }
    let manifest = job.commit_epoch(1, 2, CHUNK as u32).unwrap();
    (dir, job, manifest)
}

fn packed() -> ChunkLayout {
    ChunkLayout::default()
}

/// Each packed chunk of `record` as (pack, entry offset, entry length).
fn entries(record: &RankRecord) -> Vec<(crate::format::pack::PackId, u64, u64)> {
    record
        .regions
        .iter()
        .flat_map(|r| &r.chunks)
        .filter_map(|c| match c.place {
            ChunkPlace::Pack { pack, offset } => Some((
                pack,
                offset,
                ENTRY_HEADER_LEN as u64 + u64::from(c.stored_len),
            )),
            ChunkPlace::Loose => None,
        })
        .collect()
}

#[test]
fn the_plan_covers_every_chunk_of_the_rank_and_no_other_ranks() {
    let (_dir, _job, manifest) = store_with(packed(), [noise(1, 8), noise(2, 8)]);
    let plan = PrefetchPlan::for_rank(&manifest.ranks[0]);
    let ranges: Vec<_> = plan.pack_ranges().collect();
    let ours = entries(&manifest.ranks[0]);
    for (pack, offset, len) in &ours {
        assert!(
            ranges
                .iter()
                .any(|(p, o, l)| p == pack && o <= offset && offset + len <= o + l),
            "chunk at {offset} of its pack is not read"
        );
    }
    for (pack, offset, len) in entries(&manifest.ranks[1]) {
        assert!(
            !ranges
                .iter()
                .any(|(p, o, l)| *p == pack && offset < o + l && *o < offset + len),
            "rank 1's chunk at {offset} would be read for rank 0"
        );
    }
    // A rank's chunks are appended one after the other: one range, the
    // exact bytes of its entries.
    assert_eq!(plan.reads(), 1, "{ranges:?}");
    assert_eq!(plan.pack_bytes(), ours.iter().map(|e| e.2).sum::<u64>());
}

#[test]
fn a_chunk_repeated_in_the_rank_is_asked_for_once() {
    let block = noise(3, 1);
    let mut repeated = Vec::new();
    for _ in 0..8 {
        repeated.extend_from_slice(&block);
    }
    let (_dir, _job, manifest) = store_with(packed(), [repeated, noise(4, 8)]);
    let rank = &manifest.ranks[0];
    assert_eq!(
        rank.regions.iter().map(|r| r.chunks.len()).sum::<usize>(),
        8
    );
    let plan = PrefetchPlan::for_rank(rank);
    let (_, _, entry) = entries(rank)[0];
    assert_eq!(plan.pack_bytes(), entry, "the one stored chunk, once");
}

#[test]
fn a_prefetch_asks_for_the_whole_plan() {
    let (_dir, job, manifest) = store_with(packed(), [noise(5, 16), noise(6, 16)]);
    let plan = PrefetchPlan::for_rank(&manifest.ranks[1]);
    let report = job.prefetch(&plan, 2, &AtomicBool::new(false));
    assert_eq!(report.bytes, plan.pack_bytes());
    assert_eq!(report.reads, plan.reads() as u64);
    assert_eq!((report.failed, report.stopped), (0, false));
}

#[test]
fn a_prefetch_of_loose_chunks_asks_for_each_file() {
    let (_dir, job, manifest) = store_with(ChunkLayout::Loose, [noise(7, 4), noise(8, 4)]);
    let rank = &manifest.ranks[0];
    let plan = PrefetchPlan::for_rank(rank);
    assert_eq!((plan.reads(), plan.pack_bytes()), (4, 0));
    let report = job.prefetch(&plan, 3, &AtomicBool::new(false));
    let on_disk: u64 = rank
        .regions
        .iter()
        .flat_map(|r| &r.chunks)
        .map(|c| std::fs::metadata(job.chunk_path(&c.hash)).unwrap().len())
        .sum();
    assert_eq!((report.bytes, report.reads, report.failed), (on_disk, 4, 0));
}

#[test]
fn a_stopped_prefetch_asks_for_nothing() {
    let (_dir, job, manifest) = store_with(packed(), [noise(9, 8), noise(10, 8)]);
    let plan = PrefetchPlan::for_rank(&manifest.ranks[0]);
    let report = job.prefetch(&plan, 2, &AtomicBool::new(true));
    assert_eq!((report.bytes, report.reads, report.stopped), (0, 0, true));
}

#[test]
fn failing_requests_and_a_missing_pack_are_counted_not_raised() {
    let (dir, _job, manifest) = store_with(packed(), [noise(11, 8), noise(12, 8)]);
    let fs = Arc::new(FaultFs::real().fail_matching(FsOp::Advise, |_| true, Errno::EIO));
    let job = Store::open_with_fs(dir.path().join("store"), Arc::clone(&fs) as _)
        .unwrap()
        .job("heat")
        .unwrap();
    let plan = PrefetchPlan::for_rank(&manifest.ranks[0]);
    let report = job.prefetch(&plan, 2, &AtomicBool::new(false));
    assert_eq!((report.bytes, report.failed), (0, plan.reads() as u64));
    assert!(fs.injected() > 0);
    // A missing pack is a failure too, not a panic.
    let gone = Store::open(dir.path().join("store"))
        .unwrap()
        .job("heat")
        .unwrap();
    for (pack, _, _) in plan.pack_ranges() {
        std::fs::remove_file(gone.pack_path(&pack)).unwrap();
    }
    let report = gone.prefetch(&plan, 1, &AtomicBool::new(false));
    assert_eq!(report.failed, plan.reads() as u64);
}

/// Pages of `path`'s `[offset, offset+len)` in the page cache.
fn resident_pages(path: &Path, offset: u64, len: u64) -> usize {
    let file = std::fs::File::open(path).unwrap();
    let page = 4096u64;
    let start = offset / page * page;
    let map_len = usize::try_from(offset + len - start).unwrap();
    // SAFETY: a fresh read-only shared mapping of a file we opened; it is
    // only inspected with mincore and unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            i64::try_from(start).unwrap(),
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut vec = vec![0u8; map_len.div_ceil(4096)];
    // SAFETY: `addr` maps `map_len` bytes and `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr, map_len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above, unused from here on.
    unsafe { libc::munmap(addr, map_len) };
    assert_eq!(rc, 0);
    vec.iter().filter(|b| *b & 1 == 1).count()
}

/// Drops `path`'s clean pages from the page cache.
fn evict(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

#[test]
fn a_prefetch_brings_an_evicted_pack_into_the_page_cache() {
    let (_dir, job, manifest) = store_with(packed(), [noise(13, 64), noise(14, 64)]);
    let plan = PrefetchPlan::for_rank(&manifest.ranks[0]);
    let ranges: Vec<_> = plan.pack_ranges().collect();
    for (pack, _, _) in &ranges {
        evict(&job.pack_path(pack));
    }
    let cached = |ranges: &[(crate::format::pack::PackId, u64, u64)]| -> usize {
        ranges
            .iter()
            .map(|(p, o, l)| resident_pages(&job.pack_path(p), *o, *l))
            .sum()
    };
    if cached(&ranges) > 0 {
        // Some filesystems (tmpfs) keep every page: nothing to show there.
        eprintln!("this filesystem keeps evicted pages cached; skipped");
        return;
    }
    let report = job.prefetch(&plan, 2, &AtomicBool::new(false));
    assert_eq!(report.bytes, plan.pack_bytes());
    let pages: usize = ranges
        .iter()
        .map(|(_, o, l)| usize::try_from((o + l).div_ceil(4096) - o / 4096).unwrap())
        .sum();
    // The kernel reads in the background: wait for it, not for long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cached(&ranges) < pages && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(cached(&ranges), pages, "every page of the plan is cached");
}
