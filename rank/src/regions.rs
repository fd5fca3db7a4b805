//! Regions: carving them from the reservation at deterministic addresses,
//! registering application buffers (`protect`), write tracking, and filling
//! them from the checkpoint on a restart.

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use cryo_core::dirty::WriteTracker;
use cryo_core::format::manifest::{RegionKind, RegionRecord};
use cryo_core::names::check_region_name;
use cryo_core::protocol::RegionInfo;
use nix::errno::Errno;
use nix::sys::mman::{mmap, mmap_anonymous, MapFlags, ProtFlags};

use crate::error::RegionError;
use crate::runtime::{lock, move_high, Region, Restored, Runtime, PAGE};

/// How a region's memory is provided.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// Anonymous memory; contents saved and restored.
    Anonymous,
    /// A file mapping from `offset`. Shared: the file holds the contents,
    /// saved too, and a restart writes them back into the file (unless
    /// `CRYO_FILE_POLICY=keep`) before it is mapped again. Private:
    /// contents saved and restored.
    File {
        /// The file.
        path: &'a Path,
        /// Offset into the file, a multiple of 4096.
        offset: u64,
        /// `MAP_SHARED` rather than `MAP_PRIVATE`.
        shared: bool,
    },
}

impl Runtime {
    fn check_new(&self, name: &str) -> Result<(), RegionError> {
        let rank = self.config.rank;
        check_region_name(name)?;
        if name.starts_with(cryo_core::format::fds::RESERVED_REGION_PREFIX) {
            return Err(RegionError::Name(cryo_core::names::NameError::Region {
                name: name.into(),
                why: "names starting with 'cryo:' are the runtime's own",
            }));
        }
        if self.names.contains_key(name) {
            return Err(RegionError::Duplicate {
                rank,
                name: name.into(),
            });
        }
        Ok(())
    }

    /// The application's regions of the checkpoint this rank restarted
    /// from that it has not registered again (`cryo_region`,
    /// `cryo_protect`), whose saved contents are therefore not back: one
    /// line each, naming the region, its size and the epoch.
    pub(crate) fn unclaimed_regions(&self) -> Vec<String> {
        let Some(restored) = self.restored.as_ref() else {
            return Vec::new();
        };
        (restored.record.regions.iter())
            .filter(|r| {
                matches!(
                    r.kind,
                    RegionKind::Anonymous
                        | RegionKind::FileShared { .. }
                        | RegionKind::FilePrivate { .. }
                        | RegionKind::Protected
                ) && !self.names.contains_key(&r.name)
            })
            .map(|r| {
                format!(
                    "region '{}' ({} bytes) of epoch {} has not been registered again since \
                     the restart (cryo_region or cryo_protect with that name), so its saved \
                     contents are not back",
                    r.name, r.len, restored.epoch
                )
            })
            .collect()
    }

    fn saved(&self, name: &str) -> Option<(&Restored, &RegionRecord)> {
        let restored = self.restored.as_ref()?;
        let record = restored.record.regions.iter().find(|r| r.name == name)?;
        Some((restored, record))
    }

    fn check_saved(
        &self,
        info: &RegionInfo,
    ) -> Result<Option<(&Restored, &RegionRecord)>, RegionError> {
        let Some((restored, record)) = self.saved(&info.name) else {
            return Ok(None);
        };
        let mismatch = |problem: String| RegionError::Mismatch {
            rank: self.config.rank,
            name: info.name.clone(),
            epoch: restored.epoch,
            problem,
        };
        if record.len != info.len {
            return Err(mismatch(format!(
                "{} bytes now, {} bytes saved",
                info.len, record.len
            )));
        }
        let protected = matches!(info.kind, RegionKind::Protected);
        if !protected && record.addr != info.addr {
            return Err(mismatch(format!(
                "mapped at {:#x} now, {:#x} saved (regions must be created in the same order with the same CRYO_REGION_BASE)",
                info.addr, record.addr
            )));
        }
        let same_kind = match (&record.kind, &info.kind) {
            (RegionKind::FileShared { path: a, .. }, RegionKind::FileShared { path: b, .. })
            | (RegionKind::FilePrivate { path: a, .. }, RegionKind::FilePrivate { path: b, .. }) => {
                if a != b {
                    return Err(mismatch(format!("backed by {b} now, {a} saved")));
                }
                true
            }
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        if !same_kind {
            return Err(mismatch(format!(
                "{:?} now, {:?} saved",
                info.kind, record.kind
            )));
        }
        Ok(Some((restored, record)))
    }

    fn fill(&self, info: &RegionInfo, dest: &mut [u8]) -> Result<(), RegionError> {
        let Some((restored, record)) = self.check_saved(info)? else {
            return Ok(());
        };
        if matches!(record.kind, RegionKind::FileShared { .. }) {
            // Its file got the saved contents back at `cryo_init`
            // (`mappings::restore_region_files`), or is kept as it is
            // (`CRYO_FILE_POLICY=keep`); the mapping shows the file.
            return Ok(());
        }
        // A region made here is a fresh anonymous mapping, zeros already:
        // its chunks of zeros are left unwritten, so a large region the
        // rank used sparsely comes back sparse rather than faulted in
        // whole (a protected buffer holds what the set-up put there).
        let onto_zeros = matches!(info.kind, RegionKind::Anonymous)
            && matches!(record.kind, RegionKind::Anonymous);
        crate::restore_threads::restore(|| {
            if onto_zeros {
                restored.store.restore_region_onto_zeros(record, dest)
            } else {
                restored.store.restore_region(record, dest)
            }
        })
        .map_err(|source| RegionError::Restore {
            rank: self.config.rank,
            epoch: restored.epoch,
            source,
        })?;
        tracing::debug!(job = %self.job, rank = self.config.rank, epoch = restored.epoch, region = %info.name, "region.restored");
        Ok(())
    }

    fn carve(&mut self, name: &str, len: u64) -> Result<u64, RegionError> {
        let left = self.config.region_reserve.saturating_sub(self.next);
        // A length near 2^64 (a negative size cast) has no page multiple.
        let map_len = len.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX);
        if map_len > left {
            return Err(RegionError::ReservationFull {
                rank: self.config.rank,
                name: name.into(),
                len,
                left,
            });
        }
        let addr = self.config.region_base + self.next;
        // One PROT_NONE guard page after each region catches overruns.
        self.next = (self.next + map_len + PAGE).min(self.config.region_reserve);
        Ok(addr)
    }

    /// Registers a region for write tracking; any failure only means that
    /// every checkpoint copies the whole region.
    fn track(&mut self, name: &str, addr: u64, len: u64) {
        let rank = self.config.rank;
        if !self.tracker_tried {
            self.tracker_tried = true;
            self.tracker = match self.config.dirty_tracking.resolve().and_then(|()| {
                WriteTracker::new()
                    .map_err(|e| format!("userfaultfd: {e} (needs Linux 6.7+)"))
                    .and_then(|t| {
                        t.relocate(move_high)
                            .map_err(|e| format!("moving the userfaultfd: {e}"))
                    })
            }) {
                Ok(tracker) => Some(tracker),
                Err(why) => {
                    tracing::info!(job = %self.job, rank, why = %why, "regions.untracked");
                    None
                }
            };
        }
        if let Some(tracker) = &self.tracker {
            if let Err(err) = tracker.register(addr, len) {
                tracing::info!(job = %self.job, rank, region = name, error = %err, "region.untracked");
            }
        }
    }

    fn push(&mut self, info: RegionInfo) {
        self.names.insert(info.name.clone(), self.regions.len());
        self.regions.push(Region { info });
        // For the agent, which keeps that much of its budget warm.
        if let Some(conn) = &self.conn {
            let bytes = self.regions.iter().map(|r| r.info.len).sum();
            conn.page().region_bytes.store(bytes, Ordering::Release);
        }
    }

    fn region(
        &mut self,
        name: &str,
        len: u64,
        backing: Backing<'_>,
    ) -> Result<&'static mut [u8], RegionError> {
        let rank = self.config.rank;
        let map_err = |step| {
            move |source| RegionError::Map {
                rank,
                name: name.to_owned(),
                step,
                source,
            }
        };
        if len == 0 && matches!(backing, Backing::Anonymous) {
            return self.empty_region(name);
        }
        let (len, file, kind) = match backing {
            Backing::Anonymous => (len, None, RegionKind::Anonymous),
            Backing::File {
                path,
                offset,
                shared,
            } => {
                let file_err = |step| {
                    move |source| RegionError::File {
                        rank,
                        name: name.to_owned(),
                        path: path.to_owned(),
                        step,
                        source,
                    }
                };
                if offset % PAGE != 0 {
                    return Err(RegionError::BadFile {
                        rank,
                        name: name.into(),
                        problem: format!("offset {offset} is not a multiple of 4096"),
                    });
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(shared)
                    .open(path)
                    .map_err(file_err("open"))?;
                let size = file.metadata().map_err(file_err("stat"))?.len();
                let len = if len == 0 {
                    size.saturating_sub(offset)
                } else {
                    len
                };
                if offset.saturating_add(len) > size {
                    return Err(RegionError::BadFile {
                        rank,
                        name: name.into(),
                        problem: format!(
                            "{} is {size} bytes, the region needs {len} bytes from offset {offset}",
                            path.display()
                        ),
                    });
                }
                let abs = std::fs::canonicalize(path).map_err(file_err("canonicalize"))?;
                let abs = abs.to_string_lossy().into_owned();
                let kind = if shared {
                    RegionKind::FileShared { path: abs, offset }
                } else {
                    RegionKind::FilePrivate { path: abs, offset }
                };
                (len, Some((file, offset, shared)), kind)
            }
        };
        self.check_new(name)?;
        // A mapping cannot be empty (a protected buffer can: see `protect`).
        if len == 0 {
            return Err(RegionError::ZeroLength {
                rank,
                name: name.into(),
            });
        }
        let addr = self.carve(name, len)?;
        let map_len = usize::try_from(len.div_ceil(PAGE) * PAGE)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| RegionError::ZeroLength {
                rank,
                name: name.into(),
            })?;
        let at = usize::try_from(addr).ok().and_then(NonZeroUsize::new);
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let ptr: NonNull<libc::c_void> = match &file {
            None => {
                // SAFETY: `addr..addr+map_len` lies inside our PROT_NONE
                // reservation, which nothing else uses, so MAP_FIXED replaces
                // only our own placeholder.
                unsafe {
                    mmap_anonymous(
                        at,
                        map_len,
                        prot,
                        MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
                    )
                }
                .map_err(map_err("mmap anonymous"))?
            }
            Some((file, offset, shared)) => {
                let share = if *shared {
                    MapFlags::MAP_SHARED
                } else {
                    MapFlags::MAP_PRIVATE
                };
                let offset =
                    i64::try_from(*offset).map_err(|_| map_err("mmap file")(Errno::EINVAL))?;
                // SAFETY: as above, the range is our own reservation; the
                // file is open and large enough for `len` bytes.
                unsafe {
                    mmap(
                        at,
                        map_len,
                        prot,
                        share | MapFlags::MAP_FIXED,
                        file.as_fd(),
                        offset,
                    )
                }
                .map_err(map_err("mmap file"))?
            }
        };
        if file.is_none() {
            // Huge pages make the agent's process_vm_readv pin 512 times
            // fewer pages; a kernel without THP refuses, which is harmless.
            // SAFETY: advice on our own fresh mapping; it changes no contents.
            let _ = unsafe {
                nix::sys::mman::madvise(
                    ptr,
                    map_len.get(),
                    nix::sys::mman::MmapAdvise::MADV_HUGEPAGE,
                )
            };
        }
        // The mapping keeps the file; the fd would only be noise in the
        // next checkpoint's fd table.
        drop(file);
        let len_usize = usize::try_from(len).map_err(|_| map_err("mmap")(Errno::EOVERFLOW))?;
        // SAFETY: the mapping is `map_len >= len` bytes, readable and
        // writable, and is never unmapped while the process lives; region
        // names are unique, so this is the only slice ever made over it.
        let slice: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<u8>(), len_usize) };
        let info = RegionInfo {
            name: name.to_owned(),
            addr,
            len,
            kind,
        };
        self.fill(&info, slice)?;
        // Registered after the restore's fill: its pages count as written
        // until the first checkpoint, which therefore copies them all. A
        // shared file region is never tracked: writes to its file (by
        // `write(2)`, or by another process's mapping) bypass this
        // mapping's page tables.
        if !matches!(info.kind, RegionKind::FileShared { .. }) {
            self.track(name, addr, map_len.get() as u64);
        }
        tracing::debug!(job = %self.job, rank, region = name, addr, len, "region.created");
        self.push(info);
        Ok(slice)
    }
}

/// Creates a region of `len` bytes at its deterministic address. On a
/// restart, a region of the same name gets its saved contents back.
pub fn region(
    name: &str,
    len: usize,
    backing: Backing<'_>,
) -> Result<&'static mut [u8], RegionError> {
    let mut guard = lock();
    let runtime = guard.as_mut().ok_or(RegionError::NotInitialized)?;
    runtime.region(name, len as u64, backing)
}

/// A page-aligned type, whose dangling pointer is an aligned address no
/// mapping holds.
#[repr(align(4096))]
struct Page;

impl Runtime {
    /// An anonymous region of no bytes (a rank whose share is empty, a
    /// NumPy shape with a 0): registered like an empty protected buffer,
    /// so that its name is taken and a restart that finds it with another
    /// length says so, and nothing mapped. Its pointer is aligned, not
    /// NULL, and must not be read.
    fn empty_region(&mut self, name: &str) -> Result<&'static mut [u8], RegionError> {
        self.check_new(name)?;
        let at = std::ptr::NonNull::<Page>::dangling().cast::<u8>();
        // SAFETY: a non-null, aligned pointer and no bytes: an empty slice
        // reads and writes nothing.
        let empty = unsafe { std::slice::from_raw_parts_mut(at.as_ptr(), 0) };
        let info = RegionInfo {
            name: name.to_owned(),
            addr: at.as_ptr() as u64,
            len: 0,
            kind: RegionKind::Protected,
        };
        self.fill(&info, &mut [])?;
        self.push(info);
        Ok(empty)
    }
}

/// Registers an application-owned buffer. On a restart its saved contents
/// are copied back into it.
///
/// # Safety
///
/// `ptr` must be valid for reads and writes of `len` bytes for as long as
/// the process lives (or until `finalize`), and nothing may access it while
/// this call runs.
pub unsafe fn protect(name: &str, ptr: *mut u8, len: usize) -> Result<(), RegionError> {
    let mut guard = lock();
    let runtime = guard.as_mut().ok_or(RegionError::NotInitialized)?;
    runtime.check_new(name)?;
    if len == 0 {
        // An empty array (a rank that owns no particles; Fortran passes a
        // null pointer for one): nothing to save, but registered like any
        // other, so that its name is taken and a restart that finds it
        // with another length says so.
        let info = RegionInfo {
            name: name.to_owned(),
            addr: ptr as u64,
            len: 0,
            kind: RegionKind::Protected,
        };
        runtime.fill(&info, &mut [])?;
        runtime.push(info);
        return Ok(());
    }
    if ptr.is_null() {
        return Err(RegionError::BadFile {
            rank: runtime.config.rank,
            name: name.into(),
            problem: "null pointer".into(),
        });
    }
    if let Some(problem) = crate::writable::unwritable(ptr as u64, len as u64) {
        return Err(RegionError::NotWritable {
            rank: runtime.config.rank,
            name: name.into(),
            addr: ptr as u64,
            len: len as u64,
            problem,
        });
    }
    let info = RegionInfo {
        name: name.to_owned(),
        addr: ptr as u64,
        len: len as u64,
        kind: RegionKind::Protected,
    };
    // SAFETY: the caller guarantees `ptr` is valid for `len` bytes and not
    // accessed concurrently.
    let dest = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    runtime.fill(&info, dest)?;
    // Write tracking covers the whole pages the buffer touches: a write to
    // other heap data on those pages only makes a chunk look written (it is
    // copied again), never hides a write to the buffer.
    // Memory shared with other processes is written through their page
    // tables too, which tracking does not see: it is copied whole.
    let start = info.addr / PAGE * PAGE;
    let end = (info.addr + info.len).div_ceil(PAGE) * PAGE;
    match crate::writable::shared_memory(start, end - start) {
        None if end > start => runtime.track(name, start, end - start),
        None => {}
        Some(shared) => {
            tracing::info!(job = %runtime.job, rank = runtime.config.rank, region = name, shared = %shared, "region.untracked_shared");
        }
    }
    runtime.push(info);
    Ok(())
}
