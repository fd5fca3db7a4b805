//! The process-wide runtime: connection to the agent, control page, region
//! reservation, and what was restored.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cryo_core::auth;
use cryo_core::dirty::{TrackingMode, WriteTracker};
use cryo_core::manifest::{RankRecord, RegionKind, RegionRecord};
use cryo_core::names::check_region_name;
use cryo_core::protocol::{
    read_message, send_message_with_fd, write_message, AgentToRank, ControlPage, Hello, Peer,
    RankToAgent, RegionInfo, StartMode, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC, ENV_AGENT_SOCKET,
    ENV_DIRTY_TRACKING, ENV_FILE_POLICY, ENV_JOB, ENV_RANK, ENV_REGION_BASE, ENV_TOKEN,
    PROTOCOL_VERSION,
};
use cryo_core::store::{JobStore, Store};
use cryo_core::token::JobToken;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, MapFlags, ProtFlags};
use nix::unistd::ftruncate;

use crate::error::{CheckpointError, InitError, RegionError, RestoreError};
use crate::files::{restore_files, FilePolicy, FilesRestored};
use crate::held::{self, Baseline, DEFAULT_UNLINKED_CAP, DEFAULT_WRITABLE_CAP};
use crate::mappings::restore_mappings;

use cryo_core::env::{ENV_FD_FLOOR, ENV_REGION_RESERVE, ENV_UNLINKED_CAP, ENV_WRITABLE_CAP};

/// Default base of the region reservation. Above where PIE executables and
/// their heap land with ASLR (0x55…–0x56…) and far below shared libraries
/// and stacks (0x7f…).
pub const DEFAULT_REGION_BASE: u64 = 0x5a00_0000_0000;
/// Default size of the region reservation: 64 GiB of address space (no
/// memory is committed until a region is mapped).
pub const DEFAULT_REGION_RESERVE: u64 = 64 << 30;
/// The runtime's own fds are moved at or above this number, out of the way
/// of the application's fds, which a restart re-creates by number.
pub const RUNTIME_FD_FLOOR: RawFd = 1000;
const PAGE: u64 = 4096;

/// The safe-point flag: points at [`IDLE`] until a control page is mapped,
/// then at its `checkpoint_requested` word. Never dangling: the control page
/// is never unmapped.
pub(crate) static FLAG: AtomicPtr<AtomicU64> =
    AtomicPtr::new(&IDLE as *const AtomicU64 as *mut AtomicU64);
static IDLE: AtomicU64 = AtomicU64::new(0);
/// The epoch restored from, 0 for none.
pub(crate) static RESTORED_EPOCH: AtomicU64 = AtomicU64::new(0);
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// What `init` learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitInfo {
    /// The job.
    pub job: String,
    /// This rank.
    pub rank: u32,
    /// The agent's node, if an agent is connected.
    pub node: Option<String>,
    /// The epoch restored from, if this is a restart.
    pub restored_epoch: Option<u64>,
    /// Fds re-opened from the checkpoint.
    pub restored_fds: Vec<i32>,
}

/// What a safe point did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafePoint {
    /// No checkpoint was pending.
    Continue,
    /// The rank was captured for this epoch and resumed.
    Checkpointed(u64),
    /// The agent abandoned this epoch; the rank resumed.
    Aborted(u64),
}

/// Settings read from the environment by `init`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Agent socket; `None` runs without an agent (no checkpoints).
    pub socket: Option<PathBuf>,
    /// Job name (empty: the agent's).
    pub job: String,
    /// Rank.
    pub rank: u32,
    /// Job token.
    pub token: String,
    /// Base of the region reservation.
    pub region_base: u64,
    /// Size of the region reservation.
    pub region_reserve: u64,
    /// Policy for files opened for writing.
    pub file_policy: FilePolicy,
    /// Whether region writes are tracked, so that a checkpoint copies only
    /// the chunks written since the previous one (`CRYO_DIRTY_TRACKING`).
    pub dirty_tracking: TrackingMode,
    /// Most bytes of unlinked files saved per checkpoint; beyond it the
    /// rank refuses the epoch (`CRYO_UNLINKED_CAP`, default 1 GiB).
    pub unlinked_cap: u64,
    /// Most bytes of files open for writing in place saved per checkpoint;
    /// beyond it they are named in a warning (`CRYO_WRITABLE_CAP`, default
    /// 1 GiB).
    pub writable_cap: u64,
    /// The lowest fd number the application's files get once connected to
    /// an agent (`CRYO_FD_FLOOR`, default 64; 0 turns it off).
    pub fd_floor: RawFd,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_u64(var: &'static str, text: &str) -> Result<u64, InitError> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.replace('_', "").parse(),
    };
    parsed.map_err(|err| InitError::BadEnv {
        var,
        value: text.to_owned(),
        why: err.to_string(),
    })
}

impl Config {
    /// Reads the configuration from the environment.
    pub fn from_env() -> Result<Config, InitError> {
        let mut rank = 0u32;
        for var in [ENV_RANK, "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"] {
            if let Some(value) = env_var(var) {
                rank = value
                    .trim()
                    .parse()
                    .map_err(|err: std::num::ParseIntError| InitError::BadEnv {
                        var: ENV_RANK,
                        value: value.clone(),
                        why: format!("not a rank number ({err}), read from {var}"),
                    })?;
                break;
            }
        }
        let region_base = match env_var(ENV_REGION_BASE) {
            Some(text) => {
                let base = parse_u64(ENV_REGION_BASE, &text)?;
                if base == 0 || base % PAGE != 0 {
                    return Err(InitError::BadEnv {
                        var: ENV_REGION_BASE,
                        value: text,
                        why: "must be a non-zero multiple of 4096".into(),
                    });
                }
                base
            }
            None => DEFAULT_REGION_BASE,
        };
        let region_reserve = match env_var(ENV_REGION_RESERVE) {
            Some(text) => parse_u64(ENV_REGION_RESERVE, &text)?.div_ceil(PAGE) * PAGE,
            None => DEFAULT_REGION_RESERVE,
        };
        let file_policy = match env_var(ENV_FILE_POLICY) {
            Some(text) => FilePolicy::parse(&text).ok_or_else(|| InitError::BadEnv {
                var: ENV_FILE_POLICY,
                value: text.clone(),
                why: "expected `truncate` or `keep`".into(),
            })?,
            None => FilePolicy::Truncate,
        };
        let dirty_tracking = match env_var(ENV_DIRTY_TRACKING) {
            Some(text) => TrackingMode::parse(&text).ok_or_else(|| InitError::BadEnv {
                var: ENV_DIRTY_TRACKING,
                value: text.clone(),
                why: "expected `auto`, `on` or `off`".into(),
            })?,
            None => TrackingMode::Auto,
        };
        let unlinked_cap = match env_var(ENV_UNLINKED_CAP) {
            Some(text) => parse_u64(ENV_UNLINKED_CAP, &text)?,
            None => DEFAULT_UNLINKED_CAP,
        };
        let writable_cap = match env_var(ENV_WRITABLE_CAP) {
            Some(text) => parse_u64(ENV_WRITABLE_CAP, &text)?,
            None => DEFAULT_WRITABLE_CAP,
        };
        let fd_floor = match env_var(ENV_FD_FLOOR) {
            Some(text) => RawFd::try_from(parse_u64(ENV_FD_FLOOR, &text)?)
                .ok()
                .filter(|floor| *floor < RUNTIME_FD_FLOOR)
                .ok_or_else(|| InitError::BadEnv {
                    var: ENV_FD_FLOOR,
                    value: text.clone(),
                    why: format!("must be below {RUNTIME_FD_FLOOR}"),
                })?,
            None => crate::floor::DEFAULT_FD_FLOOR,
        };
        Ok(Config {
            unlinked_cap,
            writable_cap,
            fd_floor,
            dirty_tracking,
            socket: env_var(ENV_AGENT_SOCKET).map(PathBuf::from),
            job: env_var(ENV_JOB).unwrap_or_default(),
            rank,
            token: env_var(ENV_TOKEN).unwrap_or_default(),
            region_base,
            region_reserve,
            file_policy,
        })
    }
}

struct Connection {
    sock: UnixStream,
    memfd: OwnedFd,
    /// Address of the mapped control page (never unmapped).
    page: usize,
}

impl Connection {
    fn page(&self) -> &ControlPage {
        // SAFETY: `page` is a live MAP_SHARED mapping of CONTROL_PAGE_LEN
        // bytes, page-aligned (so aligned for ControlPage), never unmapped,
        // and ControlPage holds only atomics, which tolerate concurrent
        // access by the agent.
        unsafe { &*(self.page as *const ControlPage) }
    }
}

struct Restored {
    epoch: u64,
    store: JobStore,
    record: RankRecord,
}

struct Region {
    info: RegionInfo,
}

struct Runtime {
    config: Config,
    job: String,
    conn: Option<Connection>,
    restored: Option<Restored>,
    /// Next free offset in the reservation.
    next: u64,
    regions: Vec<Region>,
    names: HashMap<String, usize>,
    /// Tracks writes to regions; opened with the first region, `None`
    /// where tracking is off or the kernel cannot do it.
    tracker: Option<WriteTracker>,
    tracker_tried: bool,
    /// What was open and mapped when the runtime started.
    baseline: Baseline,
    /// The fds that keep the application's above the floor.
    placeholders: Vec<OwnedFd>,
}

fn lock() -> MutexGuard<'static, Option<Runtime>> {
    // A panic while holding the lock (caught at the C boundary) leaves the
    // runtime usable: every field is consistent between statements.
    RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Describes what occupies `[base, base+len)` in our address space.
fn occupant(base: u64, len: u64) -> String {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return "an unknown mapping".into();
    };
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let Some(range) = parts.next() else { continue };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if start < base + len && end > base {
            let what = parts.nth(4).unwrap_or("");
            let what = if what.is_empty() { "[anonymous]" } else { what };
            return format!("{what} at {start:#x}-{end:#x}");
        }
    }
    "a mapping not listed in /proc/self/maps".into()
}

fn reserve(base: u64, len: u64) -> Result<(), InitError> {
    let fail = |source| InitError::Reserve {
        base,
        len,
        occupant: occupant(base, len),
        source,
    };
    let (Some(addr), Some(size)) = (
        NonZeroUsize::new(usize::try_from(base).map_err(|_| fail(Errno::EINVAL))?),
        NonZeroUsize::new(usize::try_from(len).map_err(|_| fail(Errno::EINVAL))?),
    ) else {
        return Err(fail(Errno::EINVAL));
    };
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no
    // memory in use by anyone is affected; the new range is PROT_NONE.
    let ptr = unsafe {
        mmap_anonymous(
            Some(addr),
            size,
            ProtFlags::PROT_NONE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED_NOREPLACE,
        )
    }
    .map_err(fail)?;
    if ptr.as_ptr() as usize != addr.get() {
        // A kernel older than 4.17 treats the flag as a hint.
        // SAFETY: we just created this mapping and nothing refers to it.
        let _ = unsafe { nix::sys::mman::munmap(ptr, size.get()) };
        return Err(fail(Errno::EEXIST));
    }
    Ok(())
}

/// Moves `fd` to a number at or above [`RUNTIME_FD_FLOOR`], close-on-exec.
fn move_high(fd: OwnedFd) -> Result<OwnedFd, Errno> {
    let new = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(RUNTIME_FD_FLOOR))?;
    drop(fd);
    // SAFETY: fcntl just returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Connects to the agent, waiting up to 10 s for its socket to appear: on a
/// cluster the node's agent is started by the batch system next to the
/// ranks, and may still be binding when the first rank gets here.
fn connect_patiently(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(err) => return Err(err),
        }
    }
}

fn connect(config: &Config, path: &Path) -> Result<(Connection, StartMode, String), InitError> {
    let rank = config.rank;
    let page_err = |step| move |source| InitError::ControlPage { rank, step, source };
    let sock = connect_patiently(path).map_err(|source| InitError::Connect {
        rank,
        path: path.to_owned(),
        source,
    })?;
    let sock = UnixStream::from(
        move_high(OwnedFd::from(sock)).map_err(page_err("fcntl F_DUPFD_CLOEXEC"))?,
    );
    let memfd = memfd_create(
        c"cryo-control",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(page_err("memfd_create"))?;
    let memfd = move_high(memfd).map_err(page_err("fcntl F_DUPFD_CLOEXEC"))?;
    ftruncate(&memfd, i64::try_from(CONTROL_PAGE_LEN).unwrap_or(4096))
        .map_err(page_err("ftruncate"))?;
    // Sealed, so the agent that maps the page can trust its size: a page
    // that shrank under the agent would crash it with SIGBUS.
    fcntl(
        memfd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(page_err("fcntl F_ADD_SEALS"))?;
    let len = NonZeroUsize::new(CONTROL_PAGE_LEN).ok_or(InitError::ControlPage {
        rank,
        step: "mmap",
        source: Errno::EINVAL,
    })?;
    // SAFETY: a fresh shared mapping of our own memfd at an address the
    // kernel picks; it replaces nothing.
    let page = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            memfd.as_fd(),
            0,
        )
    }
    .map_err(page_err("mmap"))?;
    let conn = Connection {
        sock,
        memfd,
        page: page.as_ptr() as usize,
    };
    conn.page()
        .magic
        .store(CONTROL_PAGE_MAGIC, Ordering::Release);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: config.job.clone(),
        peer: Peer::Rank {
            rank,
            pid: std::process::id(),
        },
    };
    let proto = |source| InitError::Protocol { rank, source };
    send_message_with_fd(&conn.sock, &hello, conn.memfd.as_fd()).map_err(proto)?;
    // A malformed token proves nothing; the agent then names the problem.
    let token = JobToken::parse(&config.token, ENV_TOKEN).ok();
    auth::answer(&mut &conn.sock, &hello, token.as_ref()).map_err(proto)?;
    match read_message::<AgentToRank>(&mut &conn.sock).map_err(proto)? {
        AgentToRank::Welcome { start, node } => Ok((conn, start, node)),
        AgentToRank::Refused { reason } => Err(InitError::Refused { rank, reason }),
        other => Err(InitError::Unexpected {
            rank,
            what: format!("{other:?}"),
        }),
    }
}

fn load_restore(rank: u32, epoch: u64, store: &str, job: &str) -> Result<Restored, RestoreError> {
    let store = Store::open(store)
        .and_then(|store| store.existing_job(job))
        .map_err(|source| RestoreError::Store {
            rank,
            epoch,
            source,
        })?;
    // Another user's job (or a job directory swapped for a link) is refused
    // before anything of it is read.
    cryo_core::durable::check_private_dir(store.dir()).map_err(|source| RestoreError::Store {
        rank,
        epoch,
        source: source.into(),
    })?;
    let manifest = store
        .load_manifest(epoch)
        .map_err(|source| RestoreError::Manifest {
            rank,
            epoch,
            source,
        })?;
    let record = manifest
        .ranks
        .iter()
        .find(|r| r.rank == rank)
        .cloned()
        .ok_or_else(|| RestoreError::RankMissing {
            rank,
            epoch,
            job: job.to_owned(),
            world_size: manifest.world_size,
        })?;
    Ok(Restored {
        epoch,
        store,
        record,
    })
}

/// Initializes the runtime from the environment. See the crate docs.
pub fn init() -> Result<InitInfo, InitError> {
    init_with(Config::from_env()?)
}

/// Initializes the runtime with an explicit configuration.
pub fn init_with(config: Config) -> Result<InitInfo, InitError> {
    let mut guard = lock();
    if guard.is_some() {
        return Err(InitError::AlreadyInitialized);
    }
    let rank = config.rank;
    // Before anything of the runtime's or of a restore is opened or mapped.
    let baseline = Baseline::take();
    reserve(config.region_base, config.region_reserve)?;
    let (conn, start, node) = match &config.socket {
        Some(path) => {
            let (conn, start, node) = connect(&config, path)?;
            (Some(conn), start, Some(node))
        }
        None => (None, StartMode::Fresh, None),
    };
    let mut job = config.job.clone();
    let mut restored = None;
    let mut files = FilesRestored::default();
    if let StartMode::Restart {
        epoch,
        store,
        job: store_job,
    } = &start
    {
        let reserved: Vec<RawFd> = conn
            .iter()
            .flat_map(|c| [c.sock.as_raw_fd(), c.memfd.as_raw_fd()])
            .collect();
        // An image of another job must never be poured into this process.
        let result = if !job.is_empty() && job != *store_job {
            Err(RestoreError::OtherJob {
                rank,
                epoch: *epoch,
                offered: store_job.clone(),
                ours: job.clone(),
            })
        } else {
            job = store_job.clone();
            load_restore(rank, *epoch, store, store_job)
        }
        .and_then(|r| {
            let files = restore_files(&r.record, &r.store, config.file_policy, &reserved)?;
            restore_mappings(&r.record, &r.store, config.file_policy)?;
            Ok((r, files))
        });
        match result {
            Ok((r, f)) => {
                restored = Some(r);
                files = f;
            }
            Err(err) => {
                if let Some(conn) = &conn {
                    let _ = write_message(
                        &mut &conn.sock,
                        &RankToAgent::RestoreFailed {
                            epoch: *epoch,
                            error: err.to_string(),
                        },
                    );
                }
                tracing::error!(job = %job, rank, epoch, error = %err, "restart.failed");
                return Err(err.into());
            }
        }
        if let Some(conn) = &conn {
            let _ = write_message(&mut &conn.sock, &RankToAgent::Restored { epoch: *epoch });
        }
        RESTORED_EPOCH.store(*epoch, Ordering::Release);
        tracing::info!(job = %job, rank, epoch, fds = files.restored.len(), "restart.files_restored");
    }
    // After a restore, so that the application's fds are back first; with
    // or without an agent, so that the application's fds are numbered the
    // same way in every run.
    let placeholders =
        crate::floor::fill_below(config.fd_floor).map_err(|source| InitError::FdFloor {
            floor: config.fd_floor,
            source,
        })?;
    if let Some(conn) = &conn {
        FLAG.store(
            &conn.page().checkpoint_requested as *const AtomicU64 as *mut AtomicU64,
            Ordering::Release,
        );
    }
    let info = InitInfo {
        job: job.clone(),
        rank,
        node,
        restored_epoch: restored.as_ref().map(|r| r.epoch),
        restored_fds: files.restored,
    };
    *guard = Some(Runtime {
        config,
        job,
        conn,
        restored,
        next: 0,
        regions: Vec::new(),
        names: HashMap::new(),
        tracker: None,
        tracker_tried: false,
        baseline,
        placeholders,
    });
    Ok(info)
}

/// How a region's memory is provided.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// Anonymous memory; contents saved and restored.
    Anonymous,
    /// A file mapping from `offset`. Shared: the file holds the contents
    /// and is re-mapped on restart. Private: contents saved and restored.
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
    fn check_new(&self, name: &str, len: u64) -> Result<(), RegionError> {
        let rank = self.config.rank;
        check_region_name(name)?;
        if name.starts_with(cryo_core::fds::RESERVED_REGION_PREFIX) {
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
        if len == 0 {
            return Err(RegionError::ZeroLength {
                rank,
                name: name.into(),
            });
        }
        Ok(())
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
            // The file holds the contents; the mapping already shows them.
            return Ok(());
        }
        restored
            .store
            .restore_region(record, dest)
            .map_err(|source| RegionError::Restore {
                rank: self.config.rank,
                epoch: restored.epoch,
                source,
            })?;
        tracing::debug!(job = %self.job, rank = self.config.rank, epoch = restored.epoch, region = %info.name, "region.restored");
        Ok(())
    }

    fn carve(&mut self, name: &str, len: u64) -> Result<u64, RegionError> {
        let map_len = len.div_ceil(PAGE) * PAGE;
        let left = self.config.region_reserve.saturating_sub(self.next);
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
        self.check_new(name, len)?;
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
        // until the first checkpoint, which therefore copies them all.
        self.track(name, addr, map_len.get() as u64);
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
    runtime.check_new(name, len as u64)?;
    if ptr.is_null() {
        return Err(RegionError::BadFile {
            rank: runtime.config.rank,
            name: name.into(),
            problem: "null pointer".into(),
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
    runtime.push(info);
    Ok(())
}

/// The epoch this process restarted from, if any.
pub fn restored_epoch() -> Option<u64> {
    match RESTORED_EPOCH.load(Ordering::Acquire) {
        0 => None,
        epoch => Some(epoch),
    }
}

/// The safe point's slow path: a checkpoint is pending.
#[cold]
#[inline(never)]
pub(crate) fn park(requested: u64) -> Result<SafePoint, CheckpointError> {
    let guard = lock();
    let Some(runtime) = guard.as_ref() else {
        return Ok(SafePoint::Continue);
    };
    let Some(conn) = runtime.conn.as_ref() else {
        return Ok(SafePoint::Continue);
    };
    let page = conn.page();
    // Clear the request first so that the next safe point does not park
    // again for the same epoch; a newer request overwrites it later.
    let epoch = match page.checkpoint_requested.compare_exchange(
        requested,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(epoch) => epoch,
        Err(0) => return Ok(SafePoint::Continue),
        Err(newer) => {
            page.checkpoint_requested.store(0, Ordering::Release);
            newer
        }
    };
    let result = park_epoch(runtime, conn, epoch);
    detach_on_agent_loss(guard, result)
}

/// A rank whose agent vanished while it was parked carries on without
/// checkpoints rather than failing the application: the epoch is lost (the
/// coordinator aborts it), the job is not.
fn detach_on_agent_loss(
    mut guard: MutexGuard<'_, Option<Runtime>>,
    result: Result<SafePoint, CheckpointError>,
) -> Result<SafePoint, CheckpointError> {
    match result {
        Err(CheckpointError::Agent {
            rank,
            epoch,
            source,
        }) => {
            eprintln!(
                "cryo: rank {rank}: lost the node agent during the checkpoint of epoch {epoch} \
                 ({source}); the epoch is abandoned and this rank continues without checkpoints"
            );
            FLAG.store(
                &IDLE as *const AtomicU64 as *mut AtomicU64,
                Ordering::Release,
            );
            if let Some(runtime) = guard.as_mut() {
                // The control page stays mapped (see `finalize`).
                runtime.conn = None;
            }
            Ok(SafePoint::Aborted(epoch))
        }
        other => other,
    }
}

/// The epoch this rank's agent has requested (0 for none).
pub(crate) fn requested_epoch() -> u64 {
    let flag = FLAG.load(Ordering::Relaxed);
    // SAFETY: FLAG always points at a live AtomicU64 (see checkpoint_point).
    unsafe { &*flag }.load(Ordering::Acquire)
}

/// Parks for `epoch`, which all ranks agreed on (MPI mode). The local
/// request may not have been raised yet, or already withdrawn: the rank
/// parks all the same, and its agent answers `Resume` or `Abort`.
pub(crate) fn park_decided(epoch: u64) -> Result<SafePoint, CheckpointError> {
    let guard = lock();
    let Some((runtime, conn)) = guard
        .as_ref()
        .and_then(|runtime| runtime.conn.as_ref().map(|conn| (runtime, conn)))
    else {
        return Ok(SafePoint::Continue);
    };
    let _ = conn.page().checkpoint_requested.compare_exchange(
        epoch,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    let result = park_epoch(runtime, conn, epoch);
    detach_on_agent_loss(guard, result)
}

/// Tells the agent that this rank refuses `epoch` and why (MPI mode: a
/// message was in flight at the agreed safe point).
pub(crate) fn refuse(epoch: u64, reason: String) -> Result<SafePoint, CheckpointError> {
    let guard = lock();
    let Some((runtime, conn)) = guard
        .as_ref()
        .and_then(|runtime| runtime.conn.as_ref().map(|conn| (runtime, conn)))
    else {
        return Ok(SafePoint::Aborted(epoch));
    };
    let rank = runtime.config.rank;
    let _ = conn.page().checkpoint_requested.compare_exchange(
        epoch,
        0,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    tracing::warn!(job = %runtime.job, rank, epoch, reason = %reason, "rank.quiesce_refused");
    write_message(&mut &conn.sock, &RankToAgent::Refused { epoch, reason }).map_err(|source| {
        CheckpointError::Agent {
            rank,
            epoch,
            source,
        }
    })?;
    Ok(SafePoint::Aborted(epoch))
}

fn park_epoch(
    runtime: &Runtime,
    conn: &Connection,
    epoch: u64,
) -> Result<SafePoint, CheckpointError> {
    let rank = runtime.config.rank;
    let page = conn.page();
    let agent = |source| CheckpointError::Agent {
        rank,
        epoch,
        source,
    };
    held::flush_streams();
    let runtime_fds: Vec<RawFd> = [conn.sock.as_raw_fd(), conn.memfd.as_raw_fd()]
        .into_iter()
        .chain(runtime.tracker.as_ref().map(WriteTracker::raw_fd))
        .chain(runtime.placeholders.iter().map(AsRawFd::as_raw_fd))
        .collect();
    let reservation = (runtime.config.region_base, runtime.config.region_reserve);
    // Kept until the agent has copied what it maps.
    let library_fds = runtime.baseline.library_fds(&runtime_fds);
    let caps = held::Caps {
        unlinked: runtime.config.unlinked_cap,
        writable: runtime.config.writable_cap,
    };
    let held = match held::gather(
        rank,
        &runtime.baseline,
        [&runtime_fds, &library_fds],
        reservation,
        caps,
    ) {
        Ok(held) => held,
        Err(reason) => {
            tracing::warn!(job = %runtime.job, rank, epoch, reason = %reason, "rank.checkpoint_refused");
            write_message(&mut &conn.sock, &RankToAgent::Refused { epoch, reason })
                .map_err(agent)?;
            return Ok(SafePoint::Aborted(epoch));
        }
    };
    for warning in &held.warnings {
        tracing::warn!(job = %runtime.job, rank, epoch, warning = %warning, "rank.not_restorable");
    }
    page.parked_epoch.store(epoch, Ordering::Release);
    let parked = RankToAgent::Parked {
        epoch,
        regions: runtime
            .regions
            .iter()
            .map(|r| r.info.clone())
            .chain(held.regions.iter().cloned())
            .collect(),
        library_fds,
        runtime_fds,
        warnings: held.warnings.clone(),
    };
    tracing::debug!(job = %runtime.job, rank, epoch, "rank.parked");
    write_message(&mut &conn.sock, &parked).map_err(agent)?;
    loop {
        match read_message::<AgentToRank>(&mut &conn.sock).map_err(agent)? {
            AgentToRank::Resume { epoch: resumed } if resumed == epoch => {
                page.resumed_epoch.store(epoch, Ordering::Release);
                tracing::debug!(job = %runtime.job, rank, epoch, "rank.resumed");
                return Ok(SafePoint::Checkpointed(epoch));
            }
            AgentToRank::Abort {
                epoch: aborted,
                reason,
            } if aborted == epoch => {
                tracing::warn!(job = %runtime.job, rank, epoch, reason = %reason, "rank.checkpoint_aborted");
                return Ok(SafePoint::Aborted(epoch));
            }
            // An answer about an older epoch, left in the socket: skip it.
            AgentToRank::Resume { epoch: old } | AgentToRank::Abort { epoch: old, .. }
                if old < epoch =>
            {
                tracing::debug!(job = %runtime.job, rank, epoch, stale = old, "rank.stale_answer");
            }
            other => {
                return Err(CheckpointError::Unexpected {
                    rank,
                    epoch,
                    what: format!("{other:?}"),
                })
            }
        }
    }
}

/// Says goodbye to the agent and stops checkpointing. Regions stay mapped.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    crate::quiesce::detach();
    let mut guard = lock();
    FLAG.store(
        &IDLE as *const AtomicU64 as *mut AtomicU64,
        Ordering::Release,
    );
    if let Some(runtime) = guard.as_mut() {
        if let Some(conn) = runtime.conn.take() {
            let _ = write_message(&mut &conn.sock, &RankToAgent::Goodbye);
            // The control page stays mapped: FLAG may have been loaded by a
            // racing safe point. The fds close here.
            drop(conn);
        }
    }
}
