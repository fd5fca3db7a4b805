//! The parked copy, rank side: at its agent's request a parked rank copies
//! pieces of its own memory into the agent's copy budget (a memfd the
//! agent sends with the request, mapped here once), then answers.
//!
//! The agent's `process_vm_readv` pins every page it reads, which caps it
//! well below a memcpy; a rank reading its own memory copies at memcpy
//! speed, and a node's parked ranks copy at once. The agent names only
//! memory inside the regions the rank parked with, and only those that
//! its `/proc/<pid>/maps` shows readable; this side checks the first again
//! and declines anything else, so that a confused request is refused, not
//! copied.
//!
//! The view of the budget stays mapped between checkpoints: a page of it
//! costs a page-table fill the first time this rank writes it, and the
//! agent gives a rank back the slots it had. Per 256 MiB of slots the
//! agent has warmed, here: 83 ms on first touch, 55–68 ms with
//! `MADV_POPULATE_WRITE` (one fault per page), 15–17 ms with
//! `MADV_POPULATE_READ`: a read fault on a shared mapping maps the pages
//! around it that are already in the memfd (fault-around), writable, since
//! a memfd needs no write notification, so the copy that follows runs at
//! warm speed. Slots the agent has not warmed yet are filled for writing:
//! there a read fault allocates page by page, slower than a write fault
//! (268 against 149 ms per 256 MiB). `mincore` tells the two apart (4 ms
//! per 256 MiB). The view is `MADV_DONTFORK`, so neither a snapshot nor a
//! child of the application inherits it.
//!
//! So that not even the first parked copy fills page tables in the pause,
//! the agent names the slots of a rank's next copy as it resumes it
//! (`FillView`), and [`fill_later`] fills them on a thread at the lowest
//! priority while the rank computes.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cryo_core::protocol::{CopyOutcome, CopyPiece, RegionInfo};
use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};
use nix::sys::stat::fstat;

use crate::stream_copy::{stream_copy, Kernel, KernelTrial};

/// `madvise` advice that faults a range in as if read (Linux 5.14).
const MADV_POPULATE_READ: libc::c_int = 22;
/// `madvise` advice that faults a range in for writing (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// What is filled in the view at once: the page tables of a unit are
/// populated the first time a piece touches it.
const UNIT: usize = 64 << 10;

/// This rank's view of its agent's budget, if it has one.
static VIEW: Mutex<Option<View>> = Mutex::new(None);

/// Tests that use the process-wide view take turns.
#[cfg(test)]
pub(crate) static TEST_TURN: Mutex<()> = Mutex::new(());

/// Waits up to 10 s for the view of a `len`-byte budget to have the page
/// tables of the unit at `offset` filled.
#[cfg(test)]
pub(crate) fn wait_filled(len: usize, offset: usize) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let filled = VIEW
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|v| v.len == len && v.is_populated(offset / UNIT));
        if filled || std::time::Instant::now() > deadline {
            return filled;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

struct View {
    addr: usize,
    len: usize,
    /// The memfd it maps (`st_dev`, `st_ino`): an agent's budget is one
    /// memfd for the agent's life.
    id: (u64, u64),
    /// One bit per [`UNIT`]: its page tables are filled.
    populated: Vec<u64>,
}

// SAFETY: the view is a shared mapping owned by this struct, reached only
// under `VIEW`'s lock.
unsafe impl Send for View {}

impl Drop for View {
    fn drop(&mut self) {
        if let (Some(ptr), Some(len)) = (
            NonNull::new(self.addr as *mut libc::c_void),
            std::num::NonZeroUsize::new(self.len),
        ) {
            // SAFETY: exactly the range this view mapped; nothing borrows
            // it past the view's life (copies run under `VIEW`'s lock).
            let _ = unsafe { munmap(ptr, len.get()) };
        }
    }
}

/// Copies `pieces` of this process's memory into the budget `fd` (sent
/// with the request; `None` if the agent sent none), on up to `threads`
/// threads. `regions`: what this rank parked with; every piece must lie
/// inside one of them.
pub(crate) fn copy(
    fd: Option<OwnedFd>,
    pieces: &[CopyPiece],
    threads: u32,
    regions: &[RegionInfo],
) -> CopyOutcome {
    match try_copy(fd, pieces, threads, regions) {
        Ok(()) => CopyOutcome::Copied,
        Err(reason) => CopyOutcome::Failed { reason },
    }
}

fn try_copy(
    fd: Option<OwnedFd>,
    pieces: &[CopyPiece],
    threads: u32,
    regions: &[RegionInfo],
) -> Result<(), String> {
    if let Some(piece) = pieces.iter().find(|p| !inside_regions(p, regions)) {
        return Err(format!(
            "{} bytes at {:#x} are not inside a region this rank parked with",
            piece.len, piece.addr
        ));
    }
    let mut view = VIEW.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(fd) = fd {
        map_view(&mut view, &fd)?;
    }
    let Some(view) = view.as_mut() else {
        return Err("no copy budget was sent".into());
    };
    let moves = pieces
        .iter()
        .map(|p| Move::inside(p, view.len))
        .collect::<Result<Vec<_>, _>>()?;
    let started = std::time::Instant::now();
    view.populate(&moves);
    let populated = started.elapsed();
    let base = view.addr;
    let threads = usize::try_from(threads.max(1))
        .unwrap_or(1)
        .min(moves.len().max(1));
    if threads == 1 {
        copy_moves(moves.as_slice(), base);
    } else {
        let per = moves.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for share in moves.chunks(per) {
                let copy = move || copy_moves(share, base);
                // No thread to be had (a limit on threads): this one copies.
                if std::thread::Builder::new()
                    .name("cryo-copy".into())
                    .spawn_scoped(scope, move || {
                        crate::quiet_thread::block_signals();
                        copy()
                    })
                    .is_err()
                {
                    copy();
                }
            }
        });
    }
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    tracing::debug!(
        pieces = moves.len(),
        threads,
        populate_us = micros(populated),
        copy_us = micros(started.elapsed().saturating_sub(populated)),
        "rank.self_copy_took"
    );
    Ok(())
}

/// Copies `moves` into the view at `base`, with the copy kernel that
/// measures faster on this machine (see [`KernelTrial`]).
fn copy_moves(moves: &[Move], base: usize) {
    let mut trial = KernelTrial::default();
    for m in moves {
        let kernel = trial.next_kernel();
        if trial.timing(m.len) {
            let t = std::time::Instant::now();
            m.copy(base, kernel);
            trial.record(kernel, m.len, t.elapsed());
        } else {
            m.copy(base, kernel);
        }
    }
}

/// What the background fill claims at a time.
const FILL_STEP: usize = 1 << 20;

/// Background fills running: while there are any, a view that another
/// budget replaces is left mapped (never the case with one agent per rank
/// for the process's life), since a fill may be populating it.
static FILLS: AtomicUsize = AtomicUsize::new(0);

/// Fills this rank's view of `ranges` of the budget `fd` (`(offset,
/// length)`, the slots the agent set aside for its next parked copy) on a
/// thread of its own at the lowest priority, while the rank runs: the copy
/// then finds their page tables filled. The thread claims a unit under the
/// view's lock and fills it outside, so a parked copy never waits for a
/// fill that the scheduler holds back; a unit claimed and not yet filled
/// costs that copy its first-touch faults. Nothing happens without an fd,
/// or if no thread can be had.
pub(crate) fn fill_later(fd: Option<OwnedFd>, ranges: Vec<(u64, u64)>) {
    let Some(fd) = fd else {
        return;
    };
    // Mapped here, while parked (an fstat and an mmap), and the fd closed
    // before the rank runs on: an fd of the budget still open at the next
    // checkpoint would be counted among the application's.
    let id = {
        let mut view = VIEW.lock().unwrap_or_else(|p| p.into_inner());
        if map_view(&mut view, &fd).is_err() {
            return;
        }
        view.as_ref().map(|v| v.id)
    };
    drop(fd);
    let Some(id) = id else {
        return;
    };
    FILLS.fetch_add(1, Ordering::AcqRel);
    let fill = move || {
        crate::quiet_thread::block_signals();
        // SAFETY: `setpriority` with `who` 0 changes only the calling
        // thread's nice value on Linux; a refusal leaves it at the
        // application's priority, which is only less polite.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        fill_ranges(id, ranges);
        FILLS.fetch_sub(1, Ordering::AcqRel);
    };
    if std::thread::Builder::new()
        .name("cryo-fill".into())
        .spawn(fill)
        .is_err()
    {
        FILLS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Fills `ranges` of the view of the budget `id`, unit by unit.
fn fill_ranges(id: (u64, u64), ranges: Vec<(u64, u64)>) {
    for (offset, len) in ranges {
        let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
            continue;
        };
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let step = FILL_STEP.min(end - at);
            let (addr, claimed) = {
                let mut view = VIEW.lock().unwrap_or_else(|p| p.into_inner());
                // Another budget replaced the view meanwhile: stop.
                let Some(view) = view.as_mut().filter(|v| v.id == id) else {
                    return;
                };
                if at + step > view.len {
                    break;
                }
                (view.addr, view.claim(at, step))
            };
            for (from, to) in claimed {
                // SAFETY: claimed inside the view, which stays mapped while
                // this fill runs (`FILLS`).
                unsafe { fill(addr, from, to) };
            }
            at += step;
        }
    }
}

/// One piece in this process's terms: its address, its offset in the view
/// and its length, each checked to fit.
#[derive(Debug, Clone, Copy)]
struct Move {
    src: usize,
    offset: usize,
    len: usize,
}

impl Move {
    /// `piece`, if it fits in a view of `view_len` bytes.
    fn inside(piece: &CopyPiece, view_len: usize) -> Result<Move, String> {
        let misfit = || {
            format!(
                "{} bytes at offset {} do not fit in the {view_len}-byte budget",
                piece.len, piece.offset
            )
        };
        let (Ok(src), Ok(offset), Ok(len)) = (
            usize::try_from(piece.addr),
            usize::try_from(piece.offset),
            usize::try_from(piece.len),
        ) else {
            return Err(misfit());
        };
        match offset.checked_add(len) {
            Some(end) if end <= view_len => Ok(Move { src, offset, len }),
            _ => Err(misfit()),
        }
    }

    fn copy(&self, base: usize, kernel: Kernel) {
        let (src, dst) = (self.src as *const u8, (base + self.offset) as *mut u8);
        // SAFETY: the source lies inside a region this rank parked with
        // (its own memory, readable: the agent asks only for memory its
        // maps show readable); the destination lies inside the view
        // (`Move::inside`), this process's own shared mapping, disjoint
        // from every region; the rank is parked, so the application does
        // not run here.
        unsafe { stream_copy(dst, src, self.len, kernel) }
    }
}

fn inside_regions(piece: &CopyPiece, regions: &[RegionInfo]) -> bool {
    let Some(end) = piece.addr.checked_add(piece.len) else {
        return false;
    };
    regions
        .iter()
        .any(|r| piece.addr >= r.addr && r.addr.checked_add(r.len).is_some_and(|e| end <= e))
}

/// Maps the budget `fd` unless the view already maps it.
fn map_view(view: &mut Option<View>, fd: &OwnedFd) -> Result<(), String> {
    let stat = fstat(fd.as_raw_fd()).map_err(|e| format!("fstat of the budget: {e}"))?;
    let id = (stat.st_dev, stat.st_ino);
    let len = usize::try_from(stat.st_size).map_err(|_| "the budget has no size".to_owned())?;
    if view.as_ref().is_some_and(|v| v.id == id && v.len == len) {
        return Ok(());
    }
    match view.take() {
        // A fill may be populating it: left mapped.
        Some(old) if FILLS.load(Ordering::Acquire) > 0 => std::mem::forget(old),
        old => drop(old),
    }
    let size = std::num::NonZeroUsize::new(len).ok_or("the budget is empty")?;
    // SAFETY: a new shared mapping of the agent's memfd at an address the
    // kernel picks; it replaces nothing.
    let ptr = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd.as_fd(),
            0,
        )
    }
    .map_err(|e| format!("mapping the budget ({len} bytes): {e}"))?;
    // SAFETY: advice on our own fresh mapping; it changes no contents.
    let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTFORK) };
    *view = Some(View {
        addr: ptr.as_ptr() as usize,
        len,
        id,
        populated: vec![0; len.div_ceil(UNIT).div_ceil(64)],
    });
    Ok(())
}

impl View {
    /// Fills the page tables of every unit `moves` write that this rank has
    /// not written before, in one call per run of such units.
    fn populate(&mut self, moves: &[Move]) {
        for m in moves {
            for (from, to) in self.claim(m.offset, m.len) {
                // SAFETY: claimed inside the view, which stays mapped
                // while `self` is borrowed.
                unsafe { fill(self.addr, from, to) };
            }
        }
    }

    /// Marks the units of `offset..offset + len` not filled before as
    /// filled, and returns them as runs of offsets `(from, to)`: whoever
    /// claims a unit fills it.
    fn claim(&mut self, offset: usize, len: usize) -> Vec<(usize, usize)> {
        let mut claimed = Vec::new();
        let last = (offset + len).div_ceil(UNIT);
        let mut unit = offset / UNIT;
        while unit < last {
            if self.is_populated(unit) {
                unit += 1;
                continue;
            }
            let start = unit;
            while unit < last && !self.is_populated(unit) {
                self.mark(unit);
                unit += 1;
            }
            claimed.push((start * UNIT, (unit * UNIT).min(self.len)));
        }
        claimed
    }

    fn is_populated(&self, unit: usize) -> bool {
        self.populated
            .get(unit / 64)
            .is_some_and(|w| w & (1 << (unit % 64)) != 0)
    }

    fn mark(&mut self, unit: usize) {
        if let Some(w) = self.populated.get_mut(unit / 64) {
            *w |= 1 << (unit % 64);
        }
    }
}

/// Fills the page tables of `from..to` (offsets in the view at `addr`):
/// the units already in the memfd as if read, the others for writing.
///
/// # Safety
/// `addr + from .. addr + to` must lie inside the view, mapped for the
/// whole call.
unsafe fn fill(addr: usize, from: usize, to: usize) {
    let page = page_size();
    let resident = resident(addr, from, to, page);
    for (start, end, warm) in runs(from, to, page, resident.as_deref()) {
        let advice = if warm {
            MADV_POPULATE_READ
        } else {
            MADV_POPULATE_WRITE
        };
        // A refusal (a kernel before 5.14) only means the copy faults the
        // pages in itself.
        // SAFETY: the range lies inside the view (the caller's contract);
        // populating a shared mapping changes no contents.
        let _ = unsafe { libc::madvise((addr + start) as *mut libc::c_void, end - start, advice) };
    }
}

/// One byte per page of `from..to` of the view at `addr`, bit 0 set where
/// the page is in the memfd; `None` if `mincore` fails.
fn resident(addr: usize, from: usize, to: usize, page: usize) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; (to - from).div_ceil(page)];
    // SAFETY: `mincore` only reads the page tables of the range and writes
    // one byte per page into `vec`, which holds that many; a range not
    // mapped is refused (ENOMEM), not touched. `from` is a multiple of
    // `UNIT` in a page-aligned view.
    let rc = unsafe {
        libc::mincore(
            (addr + from) as *mut libc::c_void,
            to - from,
            vec.as_mut_ptr(),
        )
    };
    (rc == 0).then_some(vec)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// `from..to` (multiples of [`UNIT`] but for the view's end) cut into runs
/// of units whose pages are all `resident` (warm: `true`) or not, in
/// order. Without `resident` the whole range is one cold run.
fn runs(from: usize, to: usize, page: usize, resident: Option<&[u8]>) -> Vec<(usize, usize, bool)> {
    let Some(resident) = resident else {
        return vec![(from, to, false)];
    };
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + UNIT).min(to);
        let pages = (start - from) / page..(end - from).div_ceil(page);
        let warm = resident
            .get(pages)
            .is_some_and(|p| p.iter().all(|b| b & 1 == 1));
        match out.last_mut() {
            Some(last) if last.2 == warm => last.1 = end,
            _ => out.push((start, end, warm)),
        }
        start = end;
    }
    out
}

#[cfg(test)]
#[path = "self_copy_tests.rs"]
mod tests;
