//! The process-wide runtime: connection to the agent, control page, region
//! reservation, and what was restored.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cryo_core::auth;
use cryo_core::dirty::{TrackingMode, WriteTracker};
use cryo_core::format::manifest::RankRecord;
use cryo_core::maps;
use cryo_core::protocol::{
    read_frame, send_message_with_fd, write_message_as, AgentToRank, ControlPage, FrameError,
    Hello, Peer, RankToAgent, RegionInfo, StartMode, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC,
    ENV_AGENT_SOCKET, ENV_DIRTY_TRACKING, ENV_FILE_POLICY, ENV_JOB, ENV_RANK, ENV_REGION_BASE,
    ENV_TOKEN, PROTOCOL_VERSION,
};
use cryo_core::store::JobStore;
use cryo_core::token::JobToken;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, MapFlags, ProtFlags};
use nix::unistd::ftruncate;

use crate::error::InitError;
use crate::files::{FilePolicy, FilesRestored};
use crate::held::{Baseline, DEFAULT_UNLINKED_CAP, DEFAULT_WRITABLE_CAP};
pub(crate) use crate::park::{note_seen, park, park_decided, refuse, requested_epoch};

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
pub(crate) const PAGE: u64 = 4096;

/// The safe-point flag: points at [`IDLE`] until a control page is mapped,
/// then at [`crate::park::FIRST`] until the first safe point, then at the
/// page's `checkpoint_requested` word. Never dangling: the control page is
/// never unmapped.
pub(crate) static FLAG: AtomicPtr<AtomicU64> =
    AtomicPtr::new(&IDLE as *const AtomicU64 as *mut AtomicU64);
pub(crate) static IDLE: AtomicU64 = AtomicU64::new(0);
/// Where the rank notes the request it saw at a safe point: [`SEEN_IDLE`]
/// until a control page is mapped, then its `seen_epoch` word.
pub(crate) static SEEN: AtomicPtr<AtomicU64> =
    AtomicPtr::new(&SEEN_IDLE as *const AtomicU64 as *mut AtomicU64);
pub(crate) static SEEN_IDLE: AtomicU64 = AtomicU64::new(0);
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

/// The MPI rank the launcher gave this process, and the variable that
/// said so: ours, then those of MPICH's Hydra, Open MPI, PMIx and Slurm.
pub(crate) fn rank_from_env() -> Option<(&'static str, String)> {
    [
        ENV_RANK,
        "PMI_RANK",
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ]
    .into_iter()
    .find_map(|name| env_var(name).map(|value| (name, value)))
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
    /// A process without an agent (no checkpoints) whose regions are carved
    /// from `region_reserve` bytes at `region_base`, with the default file
    /// policy, tracking and caps, and no fd floor: for embedding the
    /// runtime, and for its tests.
    pub fn alone(region_base: u64, region_reserve: u64) -> Config {
        Config {
            socket: None,
            job: String::new(),
            rank: 0,
            token: String::new(),
            region_base,
            region_reserve,
            file_policy: FilePolicy::Truncate,
            dirty_tracking: TrackingMode::Auto,
            unlinked_cap: DEFAULT_UNLINKED_CAP,
            writable_cap: DEFAULT_WRITABLE_CAP,
            fd_floor: 0,
        }
    }

    /// Reads the configuration from the environment.
    pub fn from_env() -> Result<Config, InitError> {
        let mut rank = 0u32;
        if let Some((var, value)) = rank_from_env() {
            rank = value
                .trim()
                .parse()
                .map_err(|err: std::num::ParseIntError| InitError::BadEnv {
                    var: ENV_RANK,
                    value: value.clone(),
                    why: format!("not a rank number ({err}), read from {var}"),
                })?;
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

pub(crate) struct Connection {
    pub(crate) sock: UnixStream,
    pub(crate) memfd: OwnedFd,
    /// Address of the mapped control page (never unmapped).
    pub(crate) page: usize,
    /// The protocol version the agent answers in.
    pub(crate) agent_version: u16,
}

impl Connection {
    /// Sends `msg` in the version the agent speaks (an older agent's own).
    pub(crate) fn send(&self, msg: &RankToAgent) -> Result<(), FrameError> {
        write_message_as(&mut &self.sock, msg, self.agent_version)
    }

    pub(crate) fn page(&self) -> &ControlPage {
        // SAFETY: `page` is a live MAP_SHARED mapping of CONTROL_PAGE_LEN
        // bytes, page-aligned (so aligned for ControlPage), never unmapped,
        // and ControlPage holds only atomics, which tolerate concurrent
        // access by the agent.
        unsafe { &*(self.page as *const ControlPage) }
    }
}

pub(crate) struct Restored {
    pub(crate) epoch: u64,
    pub(crate) store: JobStore,
    pub(crate) record: RankRecord,
    /// What the rank changed of its process after `cryo_init`, made again
    /// at the end of this one.
    pub(crate) process: cryo_core::format::process_state::ProcessState,
    /// When the checkpoint was taken (its manifest's `created_unix_ms`).
    pub(crate) taken_unix_ms: u64,
}

pub(crate) struct Region {
    pub(crate) info: RegionInfo,
}

pub(crate) struct Runtime {
    pub(crate) config: Config,
    pub(crate) job: String,
    pub(crate) conn: Option<Connection>,
    pub(crate) restored: Option<Restored>,
    /// Next free offset in the reservation.
    pub(crate) next: u64,
    pub(crate) regions: Vec<Region>,
    pub(crate) names: HashMap<String, usize>,
    /// Tracks writes to regions; opened with the first region, `None`
    /// where tracking is off or the kernel cannot do it.
    pub(crate) tracker: Option<WriteTracker>,
    pub(crate) tracker_tried: bool,
    /// What was open and mapped when the runtime started.
    pub(crate) baseline: Baseline,
    /// The process's environment, limits and signals as `cryo_init` left
    /// them (before a restart made its saved changes again).
    pub(crate) process_base: crate::process_state::Baseline,
    /// The fds that keep the application's above the floor.
    pub(crate) placeholders: Vec<OwnedFd>,
}

pub(crate) fn lock() -> MutexGuard<'static, Option<Runtime>> {
    // A panic while holding the lock (caught at the C boundary) leaves the
    // runtime usable: every field is consistent between statements.
    RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The runtime, unless another thread holds it now.
pub(crate) fn try_lock() -> Option<MutexGuard<'static, Option<Runtime>>> {
    match RUNTIME.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Describes what occupies `[base, base+len)` in our address space.
fn occupant(base: u64, len: u64) -> String {
    let Ok(text) = std::fs::read_to_string("/proc/self/maps") else {
        return "an unknown mapping".into();
    };
    let found = maps::lines(&text).find(|line| line.overlaps(base, base.saturating_add(len)));
    found.map_or_else(
        || "a mapping not listed in /proc/self/maps".into(),
        |line| format!("{} at {:#x}-{:#x}", line.what(), line.start, line.end),
    )
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
pub(crate) fn move_high(fd: OwnedFd) -> Result<OwnedFd, Errno> {
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
    // Named crate::held::CONTROL_MEMFD, so that its mapping is known for
    // the runtime's own.
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
    let mut conn = Connection {
        sock,
        memfd,
        page: page.as_ptr() as usize,
        agent_version: 0,
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
    let proto = |source: FrameError| {
        if source.is_disconnect() {
            InitError::AgentClosed {
                rank,
                version: PROTOCOL_VERSION,
                source,
            }
        } else {
            InitError::Protocol { rank, source }
        }
    };
    send_message_with_fd(&conn.sock, &hello, conn.memfd.as_fd()).map_err(proto)?;
    // A malformed token proves nothing; the agent then names the problem.
    let token = JobToken::parse(&config.token, ENV_TOKEN).ok();
    conn.agent_version = auth::answer(&mut &conn.sock, &hello, token.as_ref()).map_err(proto)?;
    let answer = read_frame(&mut &conn.sock).map_err(proto)?;
    match answer.decode::<AgentToRank>().map_err(proto)? {
        AgentToRank::Welcome { start, node } => {
            crate::ptracer::allow_agent(&conn.sock, &config.job, rank);
            Ok((conn, start, node))
        }
        AgentToRank::Refused { reason } => Err(InitError::Refused { rank, reason }),
        other => Err(InitError::Unexpected {
            rank,
            what: format!("{other:?}"),
        }),
    }
}

/// Initializes the runtime from the environment. See the crate docs.
pub fn init() -> Result<InitInfo, InitError> {
    init_with(Config::from_env()?)
}

/// Initializes the runtime with an explicit configuration.
pub fn init_with(config: Config) -> Result<InitInfo, InitError> {
    init_with_peers(config, &mut crate::closed_files::Alone)
}

/// [`init_with`] for a rank with peers: on a restart, the ranks settle the
/// files they wrote and closed together (`closed_files::settle`).
pub(crate) fn init_with_peers(
    config: Config,
    peers: &mut dyn crate::closed_files::Peers,
) -> Result<InitInfo, InitError> {
    let mut guard = lock();
    if guard.is_some() {
        return Err(InitError::AlreadyInitialized);
    }
    let rank = config.rank;
    // Before anything of the runtime's or of a restore is opened or mapped.
    let mut baseline = Baseline::take();
    // Every rank exchanges the MPI library's listening ports first, before
    // anything that may fail on one rank alone.
    let listening = baseline.listening_ports();
    let words: Vec<u64> = listening.iter().map(|&port| u64::from(port)).collect();
    let job_ports = match peers.exchange(&words) {
        Ok(all) => all.into_iter().flatten(),
        Err(err) => {
            tracing::warn!(rank, error = %err, "init.ports_not_exchanged");
            vec![words].into_iter().flatten()
        }
    };
    let job_ports = job_ports.filter_map(|word| u16::try_from(word).ok());
    baseline.ports = crate::library_sockets::LibraryPorts::new(&listening, job_ports);
    reserve(config.region_base, config.region_reserve)?;
    let (conn, start, node) = match &config.socket {
        Some(path) => {
            let (conn, start, node) = connect(&config, path)?;
            (Some(conn), start, Some(node))
        }
        None => (None, StartMode::Fresh, None),
    };
    if start == StartMode::Fresh {
        crate::prefetch::discard();
    }
    let mut job = config.job.clone();
    let mut restored = None;
    let mut files = FilesRestored::default();
    if let StartMode::Restart {
        epoch,
        store,
        job: store_job,
    } = &start
    {
        let (r, f) = crate::restart::restore_at_start(
            &config,
            (*epoch, store, store_job),
            &mut job,
            conn.as_ref(),
            peers,
        )?;
        restored = Some(r);
        files = f;
        if let Some(conn) = &conn {
            let _ = conn.send(&RankToAgent::Restored { epoch: *epoch });
        }
        RESTORED_EPOCH.store(*epoch, Ordering::Release);
        tracing::info!(job = %job, rank, epoch, fds = files.restored.len(), prefetch = %crate::prefetch_status(), "restart.files_restored");
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
        SEEN.store(
            &conn.page().seen_epoch as *const AtomicU64 as *mut AtomicU64,
            Ordering::Release,
        );
        crate::park::arm_first_safe_point(conn.page());
        crate::offers::listen(&conn.sock);
        crate::exit_note::arm();
        crate::warning::install(conn.agent_version, &job, rank);
        crate::termination::install(conn.agent_version, &job, rank);
        crate::gfortran::warn_if_bypassed(rank);
    }
    // Last, so that nothing of the runtime's own start counts as a change.
    let process_base = crate::process_state::Baseline::take();
    if let Some(restored) = &restored {
        // The set-up that follows may open its output again.
        crate::reopen::offer(&restored.record);
        for line in crate::process_state::apply(&restored.process, restored.taken_unix_ms) {
            tracing::warn!(job = %job, rank, epoch = restored.epoch, warning = %line, "restart.process_state");
            cryo_core::say!("cryo: rank {rank}: WARNING: {line}");
        }
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
        process_base,
        placeholders,
    });
    Ok(info)
}

pub use crate::regions::{protect, region, Backing};

/// The epoch this process restarted from, if any.
pub fn restored_epoch() -> Option<u64> {
    match RESTORED_EPOCH.load(Ordering::Acquire) {
        0 => None,
        epoch => Some(epoch),
    }
}

pub use crate::finalize::finalize;
