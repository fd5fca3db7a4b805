//! Write tracking for incremental captures.
//!
//! A rank registers its anonymous regions with a userfaultfd in
//! asynchronous write-protect mode (Linux 6.7+): the kernel resolves a
//! write to a protected page by itself (no handler thread, no signal) and
//! only records that the page was written. At each capture the agent asks
//! `/proc/<pid>/pagemap` (`PAGEMAP_SCAN`) which pages were written since
//! the previous capture, and protects them again in the same call. Chunks
//! with no written page keep the previous epoch's chunk and are neither
//! copied, hashed nor written.
//!
//! Soft-dirty bits (`/proc/<pid>/clear_refs`) would do the same, but many
//! kernels are built without `CONFIG_MEM_SOFT_DIRTY`.
//!
//! What the kernel cannot see: writes that do not go through the page
//! tables, i.e. a device writing by DMA into pages pinned earlier (RDMA
//! memory registrations, io_uring fixed buffers). A region such writes may
//! reach must not be tracked; see [`TrackingMode`].

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Whether a rank tracks writes to its regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingMode {
    /// Track unless the node has RDMA devices (whose writes the kernel
    /// does not see).
    Auto,
    /// Always track (the application promises no DMA writes into regions).
    On,
    /// Never track: every capture copies every chunk.
    Off,
}

impl TrackingMode {
    /// Parses `auto`, `on` or `off`.
    pub fn parse(text: &str) -> Option<TrackingMode> {
        match text.trim() {
            "auto" | "" => Some(TrackingMode::Auto),
            "on" | "1" | "yes" => Some(TrackingMode::On),
            "off" | "0" | "no" => Some(TrackingMode::Off),
            _ => None,
        }
    }

    /// Resolves `Auto` on this node: `Err` says why tracking stays off.
    pub fn resolve(self) -> Result<(), String> {
        match self {
            TrackingMode::On => Ok(()),
            TrackingMode::Off => Err("CRYO_DIRTY_TRACKING=off".into()),
            TrackingMode::Auto => {
                if let Some(devices) = rdma_devices(Path::new("/sys/class/infiniband")) {
                    return Err(format!(
                        "this node has RDMA devices ({devices}), whose writes into pinned memory the kernel does not track; set CRYO_DIRTY_TRACKING=on if no region is ever an RDMA target"
                    ));
                }
                if Path::new(XPMEM_DEVICE).exists() {
                    return Err(format!(
                        "this node has XPMEM ({XPMEM_DEVICE}), through which an MPI library's peers write into a rank's memory by their own page tables, unseen by its write tracking; set CRYO_DIRTY_TRACKING=on if your MPI does not use it"
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The device of XPMEM, the cross-process memory mapping that Open MPI,
/// MPICH and Cray MPI use for single-copy transfers between ranks of a
/// node.
const XPMEM_DEVICE: &str = "/dev/xpmem";

fn rdma_devices(class: &Path) -> Option<String> {
    let names: Vec<String> = std::fs::read_dir(class)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

// Linux uapi, <linux/userfaultfd.h> and <linux/fs.h> (6.7+); Debian's
// headers predate PAGEMAP_SCAN, so the definitions live here.
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATTERING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

mod sys {
    use super::{PmScanArg, UffdioApi, UffdioRegister};
    nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
    nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
    nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);
}
use sys::{pagemap_scan, uffdio_api, uffdio_register};

/// The rank's side: a userfaultfd in asynchronous write-protect mode. It
/// must stay open for as long as tracking should last (closing it
/// unregisters every range).
#[derive(Debug)]
pub struct WriteTracker {
    fd: OwnedFd,
}

impl WriteTracker {
    /// Opens the userfaultfd. Fails on kernels before 6.7 (no
    /// `UFFD_FEATURE_WP_ASYNC`) or where userfaultfd is forbidden.
    pub fn new() -> io::Result<WriteTracker> {
        // SAFETY: a plain syscall with integer flags; a non-negative
        // result is a new fd that we own.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(raw).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: `raw` is a fresh fd returned to us above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        // SAFETY: `api` is a properly laid out `struct uffdio_api` that
        // outlives the call.
        unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(io::Error::from)?;
        Ok(WriteTracker { fd })
    }

    /// Tracks writes to `addr..addr+len` (page-aligned, anonymous or shmem
    /// memory). Pages count as written until the agent's first scan
    /// protects them.
    pub fn register(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a properly laid out `struct uffdio_register`;
        // registering changes no memory contents.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }.map_err(io::Error::from)?;
        Ok(())
    }

    /// Moves the userfaultfd to another fd number (the runtime keeps its
    /// fds above the application's).
    pub fn relocate<E>(
        self,
        to: impl FnOnce(OwnedFd) -> Result<OwnedFd, E>,
    ) -> Result<WriteTracker, E> {
        Ok(WriteTracker { fd: to(self.fd)? })
    }

    /// The fd, so the runtime can keep it out of the captured fd table.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The agent's side: a process's pagemap, opened once per capture.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

/// Page ranges `[start, end)` written since the previous scan.
pub type WrittenRanges = Vec<(u64, u64)>;

impl Pagemap {
    /// Opens `/proc/<pid>/pagemap` (needs the same access as
    /// `process_vm_readv`).
    pub fn open(pid: u32) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// The pages of `addr..addr+len` written since they were last
    /// protected; with `rearm`, protects them again in the same walk, so a
    /// write racing the scan is either reported now or next time. Fails
    /// with `EPERM` where the range is not registered for asynchronous
    /// write-protection, and with `ENOTTY`/`EINVAL` on kernels before 6.7.
    pub fn written(&self, addr: u64, len: u64, rearm: bool) -> io::Result<WrittenRanges> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut out = Vec::new();
        let mut vec = vec![PageRegion::default(); 4096];
        let mut start = addr;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_CHECK_WPASYNC | if rearm { PM_SCAN_WP_MATTERING } else { 0 },
                start,
                end,
                walk_end: 0,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: `arg` is a properly laid out `struct pm_scan_arg`
            // whose `vec` points at `vec.len()` writable `page_region`s
            // that outlive the call.
            let found = unsafe { pagemap_scan(self.file.as_raw_fd(), &mut arg) }
                .map_err(io::Error::from)?;
            let found = usize::try_from(found).unwrap_or(0).min(vec.len());
            for region in &vec[..found] {
                // A walk that needed more than one round of the kernel's
                // buffer (over 512 ranges) and then finished reports the
                // `walk_end` of its last full round (Linux 6.7-6.18), so
                // the next call walks part of the range again: what is
                // reported twice is skipped.
                let covered = out.last().map_or(0, |&(_, end)| end);
                let region_start = region.start.max(covered);
                if region.end <= region_start {
                    continue;
                }
                match out.last_mut() {
                    Some((_, last_end)) if *last_end == region_start => *last_end = region.end,
                    _ => out.push((region_start, region.end)),
                }
            }
            if arg.walk_end <= start {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            start = arg.walk_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn anonymous(len: usize) -> *mut u8 {
        // SAFETY: a fresh private anonymous mapping; the test owns it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        ptr.cast()
    }

    /// A fresh mapping of `len` bytes, written once and registered for
    /// tracking: its memory, the tracker that must outlive the scans, and
    /// this process's pagemap.
    fn tracked(len: usize) -> (&'static mut [u8], WriteTracker, Pagemap) {
        let base = anonymous(len);
        // SAFETY: `base` is a live mapping of `len` bytes, leaked for the test.
        let mem = unsafe { std::slice::from_raw_parts_mut(base, len) };
        mem.fill(1);
        let tracker = WriteTracker::new().expect("userfaultfd with WP_ASYNC (Linux 6.7+)");
        tracker.register(base as u64, len as u64).unwrap();
        (mem, tracker, Pagemap::open(std::process::id()).unwrap())
    }

    #[test]
    fn parses_modes() {
        assert_eq!(TrackingMode::parse("auto"), Some(TrackingMode::Auto));
        assert_eq!(TrackingMode::parse("off"), Some(TrackingMode::Off));
        assert_eq!(TrackingMode::parse("on"), Some(TrackingMode::On));
        assert_eq!(TrackingMode::parse("sometimes"), None);
        assert!(TrackingMode::Off.resolve().is_err());
        assert!(TrackingMode::On.resolve().is_ok());
    }

    #[test]
    fn rdma_devices_turn_auto_off() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(rdma_devices(dir.path()), None);
        std::fs::create_dir(dir.path().join("mlx5_0")).unwrap();
        assert_eq!(rdma_devices(dir.path()).as_deref(), Some("mlx5_0"));
        assert_eq!(rdma_devices(&dir.path().join("absent")), None);
    }

    /// Needs Linux 6.7+; the suite's machines have it, and a kernel
    /// without it must fail here rather than silently copy everything.
    #[test]
    fn reports_exactly_the_pages_written_since_the_last_scan() {
        let len = 64 * PAGE;
        let (mem, _tracker, pagemap) = tracked(len);
        let addr = mem.as_ptr() as u64;
        // Registered but never protected: everything counts as written.
        assert_eq!(
            pagemap.written(addr, len as u64, true).unwrap(),
            vec![(addr, addr + len as u64)]
        );
        assert_eq!(pagemap.written(addr, len as u64, true).unwrap(), vec![]);
        mem[5 * PAGE + 17] = 2;
        mem[6 * PAGE] = 3;
        mem[40 * PAGE + 4095] = 4;
        let page = |n: u64| addr + n * PAGE as u64;
        assert_eq!(
            pagemap.written(addr, len as u64, false).unwrap(),
            vec![(page(5), page(7)), (page(40), page(41))]
        );
        // Without rearming the pages stay written; with it they are clean.
        assert_eq!(pagemap.written(addr, len as u64, true).unwrap().len(), 2);
        assert_eq!(pagemap.written(addr, len as u64, true).unwrap(), vec![]);
        // A sub-range scan sees only its own pages.
        mem[63 * PAGE] = 9;
        assert_eq!(
            pagemap.written(addr, 32 * PAGE as u64, true).unwrap(),
            vec![]
        );
        assert_eq!(
            pagemap.written(addr, len as u64, true).unwrap(),
            vec![(page(63), page(64))]
        );
        assert_eq!(mem[5 * PAGE + 17], 2, "tracking never changes contents");
    }

    #[test]
    fn many_written_ranges_are_each_reported_once() {
        // More ranges than the kernel's buffer holds in one round (512).
        let pages = 4096;
        let len = pages * PAGE;
        let (mem, _tracker, pagemap) = tracked(len);
        let addr = mem.as_ptr() as u64;
        pagemap.written(addr, len as u64, true).unwrap();
        for page in (0..pages).step_by(3) {
            mem[page * PAGE] = 2;
        }
        let expected: WrittenRanges = (0..pages)
            .step_by(3)
            .map(|p| (addr + (p * PAGE) as u64, addr + ((p + 1) * PAGE) as u64))
            .collect();
        assert_eq!(pagemap.written(addr, len as u64, false).unwrap(), expected);
        assert_eq!(pagemap.written(addr, len as u64, true).unwrap(), expected);
        assert_eq!(pagemap.written(addr, len as u64, true).unwrap(), vec![]);
    }

    #[test]
    fn untracked_memory_is_refused_not_reported_clean() {
        let len = 4 * PAGE;
        let base = anonymous(len);
        let pagemap = Pagemap::open(std::process::id()).unwrap();
        let err = pagemap.written(base as u64, len as u64, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
