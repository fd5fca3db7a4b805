//! What a rank holds beyond its regions, gathered on the checkpoint path
//! only (a safe point with nothing pending never comes here):
//!
//! * its buffered streams, flushed so that what the application wrote is in
//!   its files before the agent records their sizes and offsets;
//! * which fds were open at `cryo_init` and still are (the MPI library's and
//!   the launcher's: left alone at restart, without a warning);
//! * the contents of regular files it holds open but that have no path any
//!   more (unlinked), of files it holds open for writing in place (not
//!   `O_APPEND`: bytes it overwrites after the checkpoint must be put back)
//!   or at all (for writing or only for reading) on a filesystem of its
//!   node (a restart on another node makes them again), the file mappings
//!   it made itself after `cryo_init`, and the whole files behind those of
//!   them on a filesystem of its node that no fd saves: all handed to the
//!   agent as extra regions (`cryo:fd:<fd>`, `cryo:file:<fd>`,
//!   `cryo:map:<start>`, `cryo:mapped-file:<n>`), so they are chunked,
//!   deduplicated and verified like region data;
//! * the table of files it wrote and closed (`closed_files`), as the region
//!   `cryo:closed-files`;
//! * what it changed of its process since `cryo_init` (`process_state`), as
//!   the region `cryo:process-state`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::OnceLock;

use cryo_core::format::closed::CLOSED_FILES_REGION;
use cryo_core::format::fds::{
    closed_contents_region_name, closed_read_region_name, contents_region_name,
    mapped_file_region_name, mapping_region_name, unlinked_region_name,
};
use cryo_core::format::manifest::RegionKind;
use cryo_core::locality::{unreachable_elsewhere, Filesystem};
use cryo_core::maps;
use cryo_core::protocol::RegionInfo;
use nix::fcntl::{open, OFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};

/// Default cap on the unlinked-file bytes saved per rank and checkpoint.
pub const DEFAULT_UNLINKED_CAP: u64 = 1 << 30;
/// Default cap on the bytes of files open for writing in place saved per
/// rank and checkpoint.
pub const DEFAULT_WRITABLE_CAP: u64 = 1 << 30;

/// What was open and mapped when the runtime started.
#[derive(Debug, Default)]
pub(crate) struct Baseline {
    /// Each fd open at `cryo_init` with its file's `(dev, ino)`.
    fds: HashMap<RawFd, (u64, u64)>,
    /// File mappings present at `cryo_init`: `(start, end, inode)`.
    mappings: HashSet<(u64, u64, u64)>,
    /// The MPI library's session directories.
    library_dirs: crate::library_dirs::LibraryDirs,
    /// The TCP ports the MPI library listens on (`library_sockets`).
    pub(crate) ports: crate::library_sockets::LibraryPorts,
}

fn fd_identity(fd: RawFd) -> Option<(u64, u64)> {
    let meta = fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
    Some((meta.dev(), meta.ino()))
}

pub(crate) fn open_fds() -> Vec<RawFd> {
    let mut out: Vec<RawFd> = fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    out.sort_unstable();
    out
}

impl Baseline {
    /// Records what is open and mapped now.
    pub(crate) fn take() -> Baseline {
        let fds = open_fds()
            .into_iter()
            .filter_map(|fd| fd_identity(fd).map(|id| (fd, id)))
            .collect();
        let mappings = fs::read_to_string("/proc/self/maps")
            .map(|text| {
                parse_maps(&text)
                    .into_iter()
                    .map(|m| (m.start, m.end, m.inode))
                    .collect()
            })
            .unwrap_or_default();
        Baseline {
            fds,
            mappings,
            library_dirs: crate::library_dirs::LibraryDirs::from_env(),
            ports: Default::default(),
        }
    }

    /// The TCP ports the fds open at `cryo_init` listen on.
    pub(crate) fn listening_ports(&self) -> Vec<u16> {
        crate::library_sockets::LibraryPorts::listening(self.fds.keys().copied())
    }

    /// The fds open at `cryo_init` that still refer to the same file, but
    /// for a standard stream the program sent elsewhere before `cryo_init`
    /// (`freopen` after `MPI_Init`): that one is its own output. And the
    /// MPI library's connections to other ranks made since
    /// (`library_sockets`), among `open` (the fds open now).
    pub(crate) fn library_fds(&self, runtime: &[RawFd], open: &[RawFd]) -> Vec<RawFd> {
        let mut out: Vec<RawFd> = self
            .fds
            .iter()
            .filter(|(fd, id)| !runtime.contains(fd) && fd_identity(**fd) == Some(**id))
            .filter(|(fd, id)| !crate::std_streams::redirected_since_start(**fd, **id))
            .map(|(fd, _)| *fd)
            .collect();
        let since: Vec<RawFd> = (open.iter().copied())
            .filter(|fd| !runtime.contains(fd) && !out.contains(fd))
            .collect();
        out.extend(self.ports.connections(&since));
        out.sort_unstable();
        out
    }
}

/// Flushes the C library's output streams and, when the process uses
/// gfortran's runtime, every Fortran unit connected to a file, so that
/// buffered output is in its files before they are recorded.
pub(crate) fn flush_streams() {
    // SAFETY: fflush(NULL) flushes every output stream; it takes each
    // stream's own lock, so it is safe with other threads writing.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    // SAFETY: dlsym with RTLD_DEFAULT only looks the symbol up.
    let flush = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_gfortran_flush_i4".as_ptr()) };
    if !flush.is_null() {
        // SAFETY: libgfortran's `flush_i4(GFC_INTEGER_4 *unit)` is the FLUSH
        // intrinsic: it flushes the unit `*unit` if it is connected (looking
        // it up, never creating it), or every unit numbered 0 and up when
        // `unit` is NULL.
        let flush: extern "C" fn(*const i32) = unsafe { std::mem::transmute(flush) };
        flush(std::ptr::null());
        // NEWUNIT= units are negative and flush(NULL) skips them. Only
        // those an OPEN connected to a file are flushed by number: an
        // internal unit left under a negative number crashes flush_i4.
        for unit in crate::gfortran::file_units() {
            flush(&unit);
        }
    }
}

/// One line of `/proc/self/maps` with a file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMap {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) prot: u32,
    pub(crate) shared: bool,
    pub(crate) offset: u64,
    pub(crate) inode: u64,
    pub(crate) path: String,
}

/// The file-backed lines of a maps text.
pub(crate) fn parse_maps(text: &str) -> Vec<FileMap> {
    maps::lines(text)
        .filter_map(|line| {
            Some(FileMap {
                start: line.start,
                end: line.end,
                prot: line.prot(),
                shared: line.shared(),
                offset: line.offset,
                inode: line.inode,
                path: line.file()?.to_owned(),
            })
        })
        .collect()
}

/// Paths whose mappings belong to the system, not the application.
const SYSTEM_PREFIXES: [&str; 8] = [
    "/usr/", "/lib/", "/lib32/", "/lib64/", "/etc/", "/proc/", "/sys/", "/dev/",
];

/// The runtime's own control page with the agent (`memfd:cryo-control`).
pub(crate) const CONTROL_MEMFD: &str = "cryo-control";

/// The agent's copy budget as a rank maps it (`memfd:cryo-pool`, see
/// `self_copy`).
pub(crate) const POOL_MEMFD: &str = "cryo-pool";

/// Whose mappings these are when they appear after `cryo_init`: the
/// runtime's control page and its view of the agent's copy budget, and
/// System V shared memory made with `IPC_PRIVATE` (key 0, shown as
/// `/SYSV00000000`), which is how MPICH's intra-node transport maps its
/// segments when ranks first talk. A program sharing System V memory on
/// purpose gives it a key, so its segments are still named when they cannot
/// be restored.
fn is_runtime_or_library(path: &str) -> bool {
    path.strip_prefix("/memfd:").is_some_and(|name| {
        let name = name.trim_end_matches(" (deleted)");
        name == CONTROL_MEMFD || name == POOL_MEMFD
    }) || path.starts_with("/SYSV00000000 ")
}

/// Segments MPI libraries and their transports keep in `/dev/shm` under
/// their own names (Open MPI's `vader`/`sm`, UCX, MPICH, libfabric, PSM2,
/// Intel MPI), which may be mapped after `cryo_init`, when ranks first
/// talk: not the application's.
const LIBRARY_SHM_PREFIXES: [&str; 9] = [
    "vader_segment.",
    "sm_segment.",
    "ucx_shm_posix_",
    "mpich_shar_tmp",
    "fi_",
    "psm2_shm.",
    "shm-col-space-",
    "Intel_MPI_",
    "opal_shmem",
];

/// Whether the mapping of `path` is of POSIX shared memory the application
/// made (`shm_open`): a file of `/dev/shm`, still linked, not an MPI
/// library's. A checkpoint does not save it, and names it.
fn is_app_shm(path: &str) -> bool {
    path.strip_prefix("/dev/shm/").is_some_and(|name| {
        !name.ends_with(" (deleted)") && !LIBRARY_SHM_PREFIXES.iter().any(|p| name.starts_with(p))
    })
}

/// The application's own file mappings: made after `cryo_init`, outside
/// the region reservation, not of a shared object or executable (any file
/// with an executable mapping), not of a system path and not the runtime's
/// or the MPI library's ([`is_runtime_or_library`]). Mappings of a deleted
/// file, a memfd or the application's POSIX shared memory ([`is_app_shm`])
/// are returned apart: they are not re-established.
pub(crate) fn app_mappings(
    maps: &[FileMap],
    baseline: &Baseline,
    reservation: (u64, u64),
) -> (Vec<FileMap>, Vec<FileMap>) {
    let code: HashSet<&str> = maps
        .iter()
        .filter(|m| m.prot & maps::PROT_EXEC != 0)
        .map(|m| m.path.as_str())
        .collect();
    let mut keep = Vec::new();
    let mut lost = Vec::new();
    for map in maps {
        let (base, len) = reservation;
        let in_reservation = map.start >= base && map.end <= base.saturating_add(len);
        if in_reservation
            || baseline.mappings.contains(&(map.start, map.end, map.inode))
            || code.contains(map.path.as_str())
            || is_runtime_or_library(&map.path)
            || baseline.library_dirs.holds(&map.path)
        {
            continue;
        }
        if is_app_shm(&map.path) {
            lost.push(map.clone());
            continue;
        }
        if SYSTEM_PREFIXES.iter().any(|p| map.path.starts_with(p)) {
            continue;
        }
        // A memfd has no path to map again; a deleted file neither.
        if map.path.ends_with(" (deleted)") || map.path.starts_with("/memfd:") {
            lost.push(map.clone());
        } else {
            keep.push(map.clone());
        }
    }
    (keep, lost)
}

/// The extra regions of one capture, and the temporary read-only mappings
/// of unlinked files behind some of them (unmapped on drop, once the agent
/// has copied them).
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) regions: Vec<RegionInfo>,
    pub(crate) warnings: Vec<String>,
    temporary: Vec<(NonNull<libc::c_void>, usize)>,
    /// The bytes behind the regions the runtime encodes itself (the table
    /// of files written and closed, what changed of the process).
    encoded: Vec<Vec<u8>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for (addr, len) in self.temporary.drain(..) {
            // SAFETY: each entry is a mapping this Held made with mmap and
            // nothing else refers to it once the agent has copied it.
            let _ = unsafe { munmap(addr, len) };
        }
    }
}

impl Held {
    /// Hands `bytes` to the agent as the region `name` of `kind`; they
    /// live (at a fixed address) until the agent has copied them.
    pub(crate) fn push_encoded(&mut self, name: &str, kind: RegionKind, bytes: Vec<u8>) {
        self.regions.push(RegionInfo {
            name: name.into(),
            addr: bytes.as_ptr() as u64,
            len: bytes.len() as u64,
            kind,
        });
        // The heap buffer does not move when `encoded` grows.
        self.encoded.push(bytes);
    }

    /// Saves the first `len` bytes of the file at `path` (for an fd, its
    /// link `/proc/self/fd/N`) as the region `name` of `kind`, through a
    /// temporary read-only mapping.
    fn save_file(
        &mut self,
        path: &str,
        name: String,
        len: u64,
        kind: RegionKind,
    ) -> nix::Result<()> {
        let (addr, mapped) = map_file(path, len)?;
        if let Some(addr) = addr {
            self.temporary.push((addr, mapped));
        }
        self.regions.push(RegionInfo {
            name,
            addr: addr.map_or(0, |a| a.as_ptr() as u64),
            len,
            kind,
        });
        Ok(())
    }
}

/// The store's filesystem, from `CRYO_STORE` (which `cryo run`, `cryo
/// restart` and Slurm's plugin set), read once.
pub(crate) fn store_filesystem() -> Option<Filesystem> {
    static STORE: OnceLock<Option<Filesystem>> = OnceLock::new();
    *STORE.get_or_init(|| {
        let path = std::env::var_os(cryo_core::env::ENV_STORE)?;
        Filesystem::of(Path::new(&path)).ok()
    })
}

/// Whether a restart on another node will not find the file at `path`
/// (`/proc/self/fd/<n>` for an open one), when the store is on `store`
/// (the reason is the agent's to give).
fn off_node(path: &str, store: Option<Filesystem>) -> bool {
    let Ok(file) = Filesystem::of(Path::new(path)) else {
        return false;
    };
    store.is_some_and(|store| unreachable_elsewhere(file, store).is_some())
}

/// Why a rank refuses an epoch before parking.
pub(crate) type Refusal = String;

/// How many file bytes a rank saves per checkpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    /// Unlinked files: beyond it the epoch is refused (it could not
    /// restart).
    pub(crate) unlinked: u64,
    /// Files open for writing in place: beyond it they are not saved, and
    /// the checkpoint says that bytes overwritten after it stay.
    pub(crate) writable: u64,
}

/// Gathers the application's file mappings, unlinked files and files open
/// for writing in place as regions, with the files open, written and
/// closed, or mapped on a filesystem of the node that a restart elsewhere
/// would not find (`store`: the store's filesystem, see
/// [`store_filesystem`]), of the fds `open` now. The runtime's fds are never saved, nor
/// the standard streams and the unlinked files that were open at
/// `cryo_init` (`library`: the launcher's and the MPI library's); regular
/// files open since then are the application's. Refuses (with the rank, fd,
/// path and size) when the unlinked files exceed their cap: such an epoch
/// would otherwise commit a checkpoint that cannot restart.
pub(crate) fn gather(
    rank: u32,
    baseline: &Baseline,
    [open, runtime, library]: [&[RawFd]; 3],
    reservation: (u64, u64),
    caps: Caps,
    store: Option<Filesystem>,
) -> Result<Held, Refusal> {
    let mut held = Held::default();
    let mapped = gather_mappings(&mut held, baseline, reservation);
    // The paths whose contents are saved, each once.
    let mut saved_paths: HashSet<String> = HashSet::new();
    let mut seen = HashSet::new();
    let (mut unlinked, mut writable) = (0u64, 0u64);
    let mut writing = HashSet::new();
    for &fd in open {
        if runtime.contains(&fd) || (library.contains(&fd) && (0..=2).contains(&fd)) {
            continue;
        }
        let Ok(link) = fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let Ok(meta) = fs::metadata(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let path = link.to_string_lossy().into_owned();
        // SAFETY: F_GETFL only reads the fd's status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if meta.is_file() && flags >= 0 && crate::files::is_writable(flags) {
            writing.insert(path.clone());
        }
        // A memfd is an anonymous inode to the agent, never restored by
        // path; it is named there.
        if !meta.is_file()
            || path.starts_with("/memfd:")
            || SYSTEM_PREFIXES.iter().any(|p| path.starts_with(p))
            || baseline.library_dirs.holds(&path)
        {
            continue;
        }
        let kind = if meta.nlink() == 0 {
            if library.contains(&fd) {
                continue;
            }
            RegionKind::UnlinkedFile { fd }
        } else if flags >= 0 && writes_in_place(flags) {
            RegionKind::FileContents { fd }
        } else if !library.contains(&fd) && off_node(&format!("/proc/self/fd/{fd}"), store) {
            // Written with O_APPEND or only read, on a filesystem of the
            // node: a restart on another node makes it again from these.
            // (An append-only file elsewhere needs only the cut back; one
            // open since before `cryo_init` the application opens again
            // itself before the restart can.)
            RegionKind::FileContents { fd }
        } else {
            continue;
        };
        // One copy per file, however many fds it is open through.
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let name = match kind {
            RegionKind::UnlinkedFile { .. } => {
                unlinked = unlinked.saturating_add(meta.len());
                if unlinked > caps.unlinked {
                    return Err(format!(
                        "rank {rank}: fd {fd} ({path}) is an unlinked file of {} bytes; unlinked \
                         files over CRYO_UNLINKED_CAP ({} bytes per rank) are not saved, so this \
                         checkpoint could not restart: the epoch is refused",
                        meta.len(),
                        caps.unlinked
                    ));
                }
                unlinked_region_name(fd)
            }
            _ => {
                writable = writable.saturating_add(meta.len());
                if writable > caps.writable {
                    // A file of the node is also named by the agent, as one
                    // a restart elsewhere will not find.
                    let (how, lost) = if writes_in_place(flags) {
                        (
                            "open for writing in place",
                            "a restart cuts it back to its size at the checkpoint but \
                             cannot undo bytes overwritten after it",
                        )
                    } else if crate::files::is_writable(flags) {
                        ("open for writing", "its contents are not saved")
                    } else {
                        ("open for reading", "its contents are not saved")
                    };
                    held.warnings.push(format!(
                        "fd {fd} ({path}) is {how} and is {} bytes, over CRYO_WRITABLE_CAP \
                         ({} bytes per rank): {lost}",
                        meta.len(),
                        caps.writable
                    ));
                    continue;
                }
                contents_region_name(fd)
            }
        };
        let saved = held.save_file(&format!("/proc/self/fd/{fd}"), name, meta.len(), kind);
        match saved {
            Ok(()) => {
                saved_paths.insert(path);
            }
            Err(err) => held.warnings.push(format!(
                "fd {fd} ({path}) could not be read to save its contents ({err}); a restart cannot give them back"
            )),
        }
    }
    let closed = crate::closed_files::capture(&writing, &mut held.warnings, store);
    let closed_node_files: Vec<_> = (closed.node_local.iter())
        .filter(|file| {
            // A file only read is saved through an fd that holds it now.
            !baseline.library_dirs.holds(&file.path)
                && (file.written || !saved_paths.contains(&file.path))
        })
        .collect();
    for (n, file) in closed_node_files.into_iter().enumerate() {
        writable = writable.saturating_add(file.size);
        let lost = if writable > caps.writable {
            Some(format!(
                "its {} bytes are over CRYO_WRITABLE_CAP ({} bytes per rank) and not saved",
                file.size, caps.writable
            ))
        } else {
            let kind = RegionKind::NodeFileContents {
                path: file.path.clone(),
            };
            let name = if file.written {
                closed_contents_region_name(n)
            } else {
                closed_read_region_name(n)
            };
            match held.save_file(&file.path, name, file.size, kind) {
                Ok(()) => {
                    saved_paths.insert(file.path.clone());
                    None
                }
                Err(err) => Some(format!("it could not be read to save it ({err})")),
            }
        };
        if let Some(lost) = lost {
            held.warnings.push(format!(
                "{} was {} and closed, and {}; {lost}, so what it held is lost there",
                file.path,
                if file.written { "written" } else { "read" },
                file.why
            ));
        }
    }
    let mapped = mapped_node_files(&mapped, &saved_paths, store);
    for (n, (path, size)) in mapped.into_iter().enumerate() {
        writable = writable.saturating_add(size);
        // Past the cap, or unreadable, the agent names it as a mapped file
        // a restart on another node will not find.
        if writable > caps.writable {
            held.warnings.push(format!(
                "the mapped file {path} is {size} bytes, over CRYO_WRITABLE_CAP ({} bytes per \
                 rank): its contents are not saved",
                caps.writable
            ));
            continue;
        }
        let kind = RegionKind::NodeFileContents { path: path.clone() };
        if let Err(err) = held.save_file(&path, mapped_file_region_name(n), size, kind) {
            held.warnings.push(format!(
                "the mapped file {path} could not be read to save its contents ({err})"
            ));
        }
    }
    if let Some(table) = closed.table {
        held.push_encoded(CLOSED_FILES_REGION, RegionKind::ClosedFiles, table);
    }
    Ok(held)
}

/// Whether an fd with status flags `flags` may write anywhere but the end
/// of its file: open for writing, not `O_APPEND`. Writes of an append-only
/// fd after the checkpoint are undone by cutting the file back to its
/// size; in-place writes need the file's contents.
fn writes_in_place(flags: i32) -> bool {
    crate::files::is_writable(flags) && flags & libc::O_APPEND == 0
}

/// The files of the application's mappings (`mapped`) on a filesystem of
/// the node that no fd saves (not in `saved`), with their sizes: a restart
/// on another node would not find them, so they are saved whole.
fn mapped_node_files(
    mapped: &[String],
    saved: &HashSet<String>,
    store: Option<Filesystem>,
) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    if store.is_none() {
        return out;
    }
    for path in mapped {
        if saved.contains(path) || out.iter().any(|(seen, _)| seen == path) {
            continue;
        }
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() && off_node(path, store) => {
                out.push((path.clone(), meta.len()));
            }
            _ => {}
        }
    }
    out
}

/// Gathers the application's own file mappings as regions (with warnings
/// for those a restart cannot re-establish) and returns their files' paths.
fn gather_mappings(held: &mut Held, baseline: &Baseline, reservation: (u64, u64)) -> Vec<String> {
    let maps = fs::read_to_string("/proc/self/maps")
        .map(|text| parse_maps(&text))
        .unwrap_or_default();
    let (mine, lost) = app_mappings(&maps, baseline, reservation);
    for map in lost {
        let what = if is_app_shm(&map.path) {
            "POSIX shared memory, which a checkpoint does not save"
        } else {
            "a deleted file or a memfd"
        };
        held.warnings.push(format!(
            "the mapping of {} at {:#x} ({} bytes) is of {what}; a restart does not re-establish \
             it or its contents",
            map.path,
            map.start,
            map.end - map.start
        ));
    }
    let mut paths = Vec::new();
    for map in mine {
        if map.prot & maps::PROT_READ == 0 {
            held.warnings.push(format!(
                "the mapping of {} at {:#x} is not readable; a restart does not re-establish it",
                map.path, map.start
            ));
            continue;
        }
        // Bytes past the file's end cannot be read (SIGBUS): save up to it.
        let size = fs::metadata(&map.path).map(|m| m.len()).unwrap_or(0);
        let within = size.saturating_sub(map.offset).div_ceil(4096) * 4096;
        let map_len = map.end - map.start;
        paths.push(map.path.clone());
        held.regions.push(RegionInfo {
            name: mapping_region_name(map.start),
            addr: map.start,
            len: within.min(map_len),
            kind: RegionKind::AppMapping {
                path: map.path,
                offset: map.offset,
                shared: map.shared,
                prot: map.prot,
                map_len,
            },
        });
    }
    paths
}

/// Maps the first `len` bytes of the file at `path` read-only, through a
/// fresh open (for an fd, of its link `/proc/self/fd/N`: the application's
/// own fd may be write-only, or the file unlinked), so the agent can copy
/// it like memory. An empty file needs no mapping.
fn map_file(path: &str, len: u64) -> nix::Result<(Option<NonNull<libc::c_void>>, usize)> {
    let Some(size) = usize::try_from(len).ok().and_then(NonZeroUsize::new) else {
        return Ok((None, 0));
    };
    let raw = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: open just returned this fd and nothing else owns it.
    let file: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    let stat = fstat(raw)?;
    if u64::try_from(stat.st_size).unwrap_or(0) < len {
        return Err(nix::errno::Errno::EAGAIN);
    }
    // SAFETY: a new read-only shared mapping of a file we just opened, at
    // an address the kernel chooses; it aliases no Rust object.
    let addr = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            file.as_fd(),
            0,
        )
    }?;
    Ok((Some(addr), size.get()))
}

#[cfg(test)]
#[path = "held_tests.rs"]
mod tests;
