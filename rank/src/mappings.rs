//! Re-establishing the file mappings the application made itself (a plain
//! `mmap` after `cryo_init`) at restart: same address, length, offset and
//! protection, from the same file. A private mapping gets its saved
//! contents; a writable shared mapping gets them too (written through to
//! the file, as files opened for writing are cut back to their checkpoint
//! state), unless `CRYO_FILE_POLICY=keep`.
//!
//! The files behind shared file regions (`cryo_region_file` with `shared`)
//! are put back the same way before the application maps them again: the
//! steps a restart runs again start from the region's contents at the
//! checkpoint, not from what later steps wrote into the file.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;

use cryo_core::format::manifest::{RankRecord, RegionKind, RegionRecord};
use cryo_core::store::JobStore;
use nix::sys::mman::{mmap, mprotect, munmap, MapFlags, ProtFlags};

use crate::error::RestoreError;
use crate::files::FilePolicy;

struct Saved<'a> {
    region: &'a RegionRecord,
    path: &'a str,
    offset: u64,
    shared: bool,
    prot: u32,
    map_len: u64,
}

fn saved_mappings(record: &RankRecord) -> impl Iterator<Item = Saved<'_>> {
    record
        .regions
        .iter()
        .filter_map(|region| match &region.kind {
            RegionKind::AppMapping {
                path,
                offset,
                shared,
                prot,
                map_len,
            } => Some(Saved {
                region,
                path,
                offset: *offset,
                shared: *shared,
                prot: *prot,
                map_len: *map_len,
            }),
            _ => None,
        })
}

fn prot_flags(bits: u32) -> ProtFlags {
    let mut prot = ProtFlags::empty();
    if bits & 1 != 0 {
        prot |= ProtFlags::PROT_READ;
    }
    if bits & 2 != 0 {
        prot |= ProtFlags::PROT_WRITE;
    }
    if bits & 4 != 0 {
        prot |= ProtFlags::PROT_EXEC;
    }
    prot
}

/// Writes the saved contents of each shared file region of `record` into
/// its file (made again where it is missing), unless the policy keeps
/// files as they are. It runs before the ranks' exchange at `cryo_init`,
/// so no rank computes on the file while another puts it back.
pub fn restore_region_files(
    record: &RankRecord,
    store: &JobStore,
    policy: FilePolicy,
) -> Result<(), RestoreError> {
    if policy == FilePolicy::Keep {
        return Ok(());
    }
    for region in &record.regions {
        if let RegionKind::FileShared { path, offset } = &region.kind {
            restore_region_file(record.rank, store, region, path, *offset)?;
        }
    }
    Ok(())
}

fn restore_region_file(
    rank: u32,
    store: &JobStore,
    region: &RegionRecord,
    path: &str,
    offset: u64,
) -> Result<(), RestoreError> {
    let fail = |step: &'static str, source: io::Error| RestoreError::Mapping {
        rank,
        path: path.to_owned(),
        addr: region.addr,
        len: region.len,
        step,
        source,
    };
    let (Some(len), Ok(at)) = (
        usize::try_from(region.len).ok().and_then(NonZeroUsize::new),
        i64::try_from(offset),
    ) else {
        return Err(fail("restore", io::Error::other("bad length or offset")));
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|err| fail("open", err))?;
    let end = offset.saturating_add(region.len);
    let size = file.metadata().map_err(|err| fail("stat", err))?.len();
    if size < end {
        file.set_len(end).map_err(|err| fail("extend", err))?;
    }
    // SAFETY: a new shared mapping of the file, placed by the kernel, so it
    // aliases nothing; the file is at least `offset + len` bytes long.
    let mapped = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            file.as_fd(),
            at,
        )
    }
    .map_err(|errno| fail("mmap", errno.into()))?;
    // SAFETY: the mapping just made is `len` bytes, writable, and only this
    // function refers to it until it is unmapped below.
    let dest = unsafe { std::slice::from_raw_parts_mut(mapped.as_ptr().cast::<u8>(), len.get()) };
    let restored = crate::restore_threads::restore(|| store.restore_region(region, dest));
    // SAFETY: the mapping made above; `dest` is not used after this.
    let _ = unsafe { munmap(mapped, len.get()) };
    restored.map_err(|source| RestoreError::Contents {
        rank,
        what: format!("the file {path} of region '{}'", region.name),
        source,
    })?;
    tracing::debug!(rank, path, region = %region.name, "region_file.restored");
    Ok(())
}

/// Re-establishes every application mapping of `record`.
pub fn restore_mappings(
    record: &RankRecord,
    store: &JobStore,
    policy: FilePolicy,
) -> Result<(), RestoreError> {
    for saved in saved_mappings(record) {
        restore_one(record.rank, store, &saved, policy)?;
    }
    Ok(())
}

fn restore_one(
    rank: u32,
    store: &JobStore,
    saved: &Saved<'_>,
    policy: FilePolicy,
) -> Result<(), RestoreError> {
    let addr = saved.region.addr;
    let fail = |step: &'static str, source: io::Error| RestoreError::Mapping {
        rank,
        path: saved.path.to_owned(),
        addr,
        len: saved.map_len,
        step,
        source,
    };
    let writable = saved.prot & 2 != 0;
    // Contents go back into private mappings always, into writable shared
    // ones unless the policy keeps files as they are.
    let fill = !saved.shared || (writable && policy == FilePolicy::Truncate);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(saved.shared && writable)
        .open(saved.path)
        .map_err(|err| fail("open", err))?;
    let len = usize::try_from(saved.map_len)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| fail("mmap", io::Error::other("bad length")))?;
    let at = usize::try_from(addr)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| fail("mmap", io::Error::other("bad address")))?;
    let offset = i64::try_from(saved.offset)
        .map_err(|_| fail("mmap", io::Error::other("offset overflows off_t")))?;
    let mut prot = prot_flags(saved.prot);
    if fill && !saved.shared {
        prot |= ProtFlags::PROT_WRITE;
    }
    let flags = MapFlags::MAP_FIXED_NOREPLACE
        | if saved.shared {
            MapFlags::MAP_SHARED
        } else {
            MapFlags::MAP_PRIVATE
        };
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping (the
    // call fails with EEXIST instead), so no Rust object is aliased; the
    // application reaches this memory through the pointer it saved.
    let mapped = unsafe { mmap(Some(at), len, prot, flags, file.as_fd(), offset) }
        .map_err(|errno| fail("mmap", errno.into()))?;
    if mapped.as_ptr() as u64 != addr {
        return Err(fail(
            "mmap",
            io::Error::other("the kernel placed the mapping elsewhere (the address is taken)"),
        ));
    }
    if fill && (writable || !saved.shared) {
        let bytes = usize::try_from(saved.region.len)
            .map_err(|_| fail("restore", io::Error::other("bad length")))?;
        // SAFETY: the region's first `len` bytes lie within the mapping just
        // made (len <= map_len, checked at capture), writable, and nothing
        // else refers to them yet.
        let dest = unsafe { std::slice::from_raw_parts_mut(mapped.as_ptr().cast::<u8>(), bytes) };
        crate::restore_threads::restore(|| store.restore_region(saved.region, dest)).map_err(
            |source| RestoreError::Contents {
                rank,
                what: format!("the mapping of {} at {addr:#x}", saved.path),
                source,
            },
        )?;
    }
    if prot != prot_flags(saved.prot) {
        // SAFETY: the range is the mapping made above.
        unsafe { mprotect(mapped, len.get(), prot_flags(saved.prot)) }
            .map_err(|errno| fail("mprotect", errno.into()))?;
    }
    tracing::debug!(rank, path = %saved.path, addr, len = saved.map_len, "mapping.restored");
    Ok(())
}
