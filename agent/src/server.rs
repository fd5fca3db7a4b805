//! The node agent daemon: registers local ranks over its Unix socket,
//! answers control requests on the same socket, runs checkpoints and hands
//! restart information to ranks that register after a restart was armed.
//!
//! Threads: one accept loop; one thread per connection (for a rank it reads
//! the rank's messages and forwards them to whoever waits for them); one
//! thread per checkpoint, with one scoped thread per rank inside it.
//!
//! Two modes. Standalone (no coordinator): checkpoints come from the control
//! socket and the agent commits each epoch itself. Coordinated
//! (`--coordinator HOST:PORT`, see [`crate::link`]): checkpoints also come
//! from the coordinator; the agent makes its ranks' parts durable, reports
//! `Copied`/`Durable` per rank and leaves the commit to the coordinator. With
//! MPI the ranks of all nodes agree on an epoch among themselves, so a rank
//! may park for epoch E before this agent has heard of E: in coordinated mode
//! such an early park is held (not answered) until `Checkpoint{E}` arrives,
//! and aborted if it does not arrive within the park timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::TcpStream;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::fault;
use cryo_core::format::chunk::ChunkCodec;
use cryo_core::format::manifest::{RegionRecord, WriteStats};
use cryo_core::protocol::{
    read_message, recv_message_with_fd, write_message, AgentStatus, AgentToCoordinator,
    AgentToRank, BusyPolicy, CheckpointReport, Completion, ControlPage, ControlRequest,
    ControlResponse, CoordinatorToAgent, Hello, Peer, RankCaptureReport, RankToAgent, StartMode,
    CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC,
};
use cryo_core::store::writer::WriterConfig;
use cryo_core::store::{JobStore, Store, StoreError};
use cryo_core::token::JobToken;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use thiserror::Error;

use crate::capture::{capture_rank, nanos, CaptureContext, CopyGate, Parked};
use crate::link::{self, CoordinatorLink, LinkError};
use crate::pool::{BufferPool, PoolError};
use crate::procfs::{mem_total_bytes, peak_rss_bytes, LinuxProcess, ProcessAccess};

/// Which epoch to restart from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFrom {
    /// The newest committed epoch.
    Latest,
    /// This epoch.
    Epoch(u64),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Unix socket for ranks and control clients.
    pub socket: PathBuf,
    /// The store root.
    pub store: PathBuf,
    /// The job.
    pub job: String,
    /// This node's name.
    pub node: String,
    /// Copy budget in bytes.
    pub copy_budget: u64,
    /// Expected number of local ranks (default: those registered).
    pub ranks: Option<u32>,
    /// Restart ranks that register from this epoch.
    pub restart_from: Option<RestartFrom>,
    /// How long to wait for every rank to reach a safe point.
    pub park_timeout: Duration,
    /// Chunk size.
    pub chunk_size: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// Threads used to copy rank memory.
    pub copy_threads: usize,
    /// Threads hashing, compressing and writing chunks.
    pub store_threads: usize,
    /// Coordinated mode: the job's coordinator, `HOST:PORT`. `None`:
    /// standalone (the agent commits epochs itself).
    pub coordinator: Option<String>,
    /// How long to keep trying to reach the coordinator at start.
    pub coordinator_wait: Duration,
    /// The job token. When set, ranks must present it (always set in
    /// coordinated mode).
    pub token: Option<JobToken>,
}

/// Default copy budget: an eighth of the node's RAM.
pub fn default_copy_budget() -> u64 {
    mem_total_bytes().map_or(1 << 30, |total| total / 8)
}

/// The agent could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The buffer pool could not be created.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The socket could not be bound.
    #[error("binding {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another agent is serving on the socket.
    #[error("another agent is already serving on {}", .0.display())]
    InUse(PathBuf),
    /// Arming the restart failed.
    #[error("cannot restart: {0}")]
    Restart(String),
    /// Thread pool creation failed.
    #[error("creating copy threads: {0}")]
    Threads(String),
    /// Coordinated mode without a job token.
    #[error("coordinated mode needs the job token: pass --token-file or set CRYO_TOKEN")]
    NoToken,
    /// The coordinator could not be reached or refused this agent.
    #[error(transparent)]
    Coordinator(#[from] LinkError),
}

enum RankEvent {
    Parked(Parked),
    Gone(String),
    /// The rank refused to park for the epoch (MPI: message in flight).
    Refused {
        epoch: u64,
        reason: String,
    },
}

/// The control page of a rank, mapped in the agent.
struct PageMap {
    addr: usize,
}

impl PageMap {
    fn map(fd: &OwnedFd) -> Result<PageMap, String> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|e| format!("control page fd: F_GET_SEALS: {e}"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err("control page memfd is not sealed against shrinking".into());
        }
        let size = nix::sys::stat::fstat(fd.as_raw_fd())
            .map_err(|e| format!("control page fd: fstat: {e}"))?
            .st_size;
        if u64::try_from(size).unwrap_or(0) < CONTROL_PAGE_LEN as u64 {
            return Err(format!(
                "control page is {size} bytes, expected {CONTROL_PAGE_LEN}"
            ));
        }
        let len = NonZeroUsize::new(CONTROL_PAGE_LEN).ok_or("zero page length")?;
        // SAFETY: a new shared mapping of the rank's sealed memfd at an
        // address the kernel picks; the seal guarantees it stays 4 KiB.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(|e| format!("mapping the control page: {e}"))?;
        let map = PageMap {
            addr: ptr.as_ptr() as usize,
        };
        if map.page().magic.load(Ordering::Acquire) != CONTROL_PAGE_MAGIC {
            return Err("control page has a bad magic".into());
        }
        Ok(map)
    }

    fn page(&self) -> &ControlPage {
        // SAFETY: `addr` is a live, page-aligned, 4 KiB shared mapping owned
        // by self, and ControlPage holds only atomics.
        unsafe { &*(self.addr as *const ControlPage) }
    }
}

impl Drop for PageMap {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.addr as *mut libc::c_void) {
            // SAFETY: we mapped exactly this range and nothing borrows it
            // past the PageMap's life.
            let _ = unsafe { munmap(ptr, CONTROL_PAGE_LEN) };
        }
    }
}

struct RankConn {
    rank: u32,
    pid: u32,
    writer: Mutex<UnixStream>,
    page: PageMap,
    events: Mutex<Receiver<RankEvent>>,
    alive: AtomicBool,
    /// Coordinated mode: the rank parked for an epoch this agent has not
    /// started yet (MPI ranks agree on the epoch among themselves).
    early: Mutex<Option<Parked>>,
    /// The regions as this process's last capture stored them, when that
    /// capture's part is durable: unwritten chunks are reused from it.
    /// Taken by each capture and put back only once its part is durable,
    /// since the write-tracking scan of a failed capture is lost.
    baseline: Mutex<Option<Vec<RegionRecord>>>,
    /// Which of this process's regions are hot (rewritten whole between
    /// captures) and so copied without being scanned and protected again.
    heat: Mutex<crate::capture::RegionHeat>,
}

impl RankConn {
    fn send(&self, msg: &AgentToRank) -> Result<(), String> {
        let mut sock = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut *sock, msg)
            .map_err(|e| format!("rank {} (pid {}): {e}", self.rank, self.pid))
    }
}

struct Armed {
    epoch: u64,
    pending: BTreeSet<u32>,
}

/// Stops an epoch in progress (coordinator `Abort`, lost coordinator,
/// shutdown) and, once the epoch is over, closes it to late parks.
#[derive(Default)]
struct Cancel {
    flag: AtomicBool,
    reason: Mutex<Option<String>>,
    coordinated: bool,
}

impl Cancel {
    fn new(coordinated: bool) -> Cancel {
        Cancel {
            coordinated,
            ..Cancel::default()
        }
    }

    /// Aborts the epoch; the first reason wins.
    fn cancel(&self, reason: &str) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason.to_owned());
        }
        self.flag.store(true, Ordering::Release);
    }

    /// The epoch is over: ranks parking for it now get `Abort` at once.
    fn close(&self) {
        self.flag.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }
}

#[derive(Default)]
struct State {
    busy: Option<u64>,
    /// Cancels the busy epoch.
    cancel: Option<Arc<Cancel>>,
    /// The newest epoch started, aborted or given up on.
    last_epoch: u64,
    armed: Option<Armed>,
    /// Coordinated: epochs ranks parked for before their `Checkpoint`
    /// arrived, and when to give up on them.
    early: BTreeMap<u64, Instant>,
    /// Coordinated: recent epochs the coordinator aborted.
    aborted: BTreeSet<u64>,
    /// Coordinated: the last epoch whose parts this agent wrote, and for
    /// which ranks (removed if the coordinator aborts it afterwards).
    written: Option<(u64, Vec<u32>)>,
}

/// One epoch to run.
struct EpochRun {
    epoch: u64,
    park_timeout: Duration,
    coordinated: bool,
    cancel: Arc<Cancel>,
    /// Ranks already parked for this epoch (early parks).
    early: BTreeMap<u32, Parked>,
    /// Ranks whose part this run wrote.
    written: Mutex<Vec<u32>>,
    /// Coordinated: the first rank failure, which stops the others.
    failed: Mutex<Option<String>>,
    /// Copy every chunk, ignoring write tracking.
    full: bool,
}

impl EpochRun {
    /// Coordinated: one rank failed, so the epoch is lost on every node;
    /// stop waiting for the others and abort those parked.
    fn fail(&self, reason: &str) {
        lock(&self.failed).get_or_insert_with(|| reason.to_owned());
        self.cancel.flag.store(true, Ordering::Release);
    }

    /// Why the epoch stopped early.
    fn stop_reason(&self) -> String {
        self.cancel.reason().unwrap_or_else(|| {
            format!(
                "was abandoned after a failure on this node ({})",
                lock(&self.failed).as_deref().unwrap_or("unknown")
            )
        })
    }
}

struct Shared {
    config: AgentConfig,
    job: JobStore,
    ranks: Mutex<BTreeMap<u32, Arc<RankConn>>>,
    state: Mutex<State>,
    idle: Condvar,
    pool: BufferPool,
    copy_threads: rayon::ThreadPool,
    store_threads: rayon::ThreadPool,
    gate: CopyGate,
    access: Box<dyn ProcessAccess>,
    /// Coordinated mode: the link to the coordinator.
    link: Option<CoordinatorLink>,
    /// Coordinated mode: the reading half, until `serve` takes it.
    link_reader: Mutex<Option<TcpStream>>,
    /// Set by the coordinator's `Shutdown`.
    shutdown: AtomicBool,
    /// Wakes the early-park watchdog.
    early_cv: Condvar,
}

/// A bound agent, ready to serve.
pub struct Agent {
    shared: Arc<Shared>,
    listener: UnixListener,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.shared.config.socket)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Opens the store, maps the copy pool and binds the socket.
    pub fn bind(config: AgentConfig) -> Result<Agent, ServeError> {
        let store = Store::create(&config.store)?;
        let job = store.job(&config.job)?;
        job.ensure_layout()
            .map_err(|e| ServeError::Store(e.into()))?;
        let pool = BufferPool::new(config.copy_budget, config.chunk_size)?;
        let copy_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(config.copy_threads.max(1))
            .thread_name(|i| format!("cryo-copy-{i}"))
            .build()
            .map_err(|e| ServeError::Threads(e.to_string()))?;
        let store_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(config.store_threads.max(1))
            .thread_name(|i| format!("cryo-store-{i}"))
            .build()
            .map_err(|e| ServeError::Threads(e.to_string()))?;
        if let Some(dir) = config.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Node-local and private: only the job's user reaches its agent.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ServeError::Bind {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        if config.socket.exists() {
            if UnixStream::connect(&config.socket).is_ok() {
                return Err(ServeError::InUse(config.socket.clone()));
            }
            let _ = fs::remove_file(&config.socket);
        }
        if config.coordinator.is_some() && config.token.is_none() {
            return Err(ServeError::NoToken);
        }
        // Bind before dialing the coordinator: it may start the ranks as
        // soon as this agent says hello, and a rank that connects before
        // `serve` runs simply waits in the listen backlog.
        let listener = UnixListener::bind(&config.socket).map_err(|source| ServeError::Bind {
            path: config.socket.clone(),
            source,
        })?;
        // Connecting needs write permission on the socket: only the job's
        // user may reach its ranks' agent, whatever the folder's mode.
        fs::set_permissions(
            &config.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|source| ServeError::Bind {
            path: config.socket.clone(),
            source,
        })?;
        let (link, link_reader) = match (&config.coordinator, &config.token) {
            (Some(addr), Some(token)) => {
                let (link, reader) = link::connect(
                    addr,
                    &config.job,
                    &config.node,
                    token,
                    config.coordinator_wait,
                )
                .inspect_err(|_| {
                    // A refused agent leaves no socket behind.
                    let _ = fs::remove_file(&config.socket);
                })?;
                tracing::info!(
                    job = %config.job,
                    node = %config.node,
                    coordinator = %addr,
                    world_size = link.world_size(),
                    "coordinator.connected"
                );
                (Some(link), Some(reader))
            }
            _ => (None, None),
        };
        let shared = Arc::new(Shared {
            job,
            ranks: Mutex::new(BTreeMap::new()),
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            pool,
            copy_threads,
            store_threads,
            gate: CopyGate::default(),
            access: Box::new(LinuxProcess),
            link,
            link_reader: Mutex::new(link_reader),
            shutdown: AtomicBool::new(false),
            early_cv: Condvar::new(),
            config,
        });
        if let Some(from) = shared.config.restart_from {
            let epoch = match from {
                RestartFrom::Latest => None,
                RestartFrom::Epoch(e) => Some(e),
            };
            match shared.arm_restart(epoch) {
                ControlResponse::RestartArmed { .. } => {}
                ControlResponse::Refused { reason } | ControlResponse::Failed { reason, .. } => {
                    let _ = fs::remove_file(&shared.config.socket);
                    return Err(ServeError::Restart(reason));
                }
                other => {
                    let _ = fs::remove_file(&shared.config.socket);
                    return Err(ServeError::Restart(format!("{other:?}")));
                }
            }
        }
        tracing::info!(
            job = %shared.config.job,
            node = %shared.config.node,
            socket = %shared.config.socket.display(),
            copy_budget = shared.pool.bytes(),
            coordinated = shared.link.is_some(),
            "agent.ready"
        );
        Ok(Agent { shared, listener })
    }

    /// Serves until the coordinator says `Shutdown` (standalone: forever),
    /// then removes the socket.
    pub fn serve(self) -> io::Result<()> {
        if let Some(reader) = lock(&self.shared.link_reader).take() {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("cryo-coordinator".into())
                .spawn(move || shared.serve_coordinator(&reader))?;
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("cryo-early-parks".into())
                .spawn(move || shared.watch_early_parks())?;
        }
        for conn in self.listener.incoming() {
            if self.shared.shutdown.load(Ordering::Acquire) {
                break;
            }
            let sock = match conn {
                Ok(sock) => sock,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
            };
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("cryo-conn".into())
                .spawn(move || shared.handle(sock));
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot spawn a connection thread");
            }
        }
        // Give an aborted epoch a moment to resume its ranks.
        self.shared.wait_idle(Duration::from_secs(5));
        let _ = fs::remove_file(&self.shared.config.socket);
        tracing::info!(
            job = %self.shared.config.job,
            node = %self.shared.config.node,
            "agent.shutdown"
        );
        Ok(())
    }
}

impl Shared {
    fn handle(self: Arc<Self>, sock: UnixStream) {
        let greeting = match auth::accept(&sock, recv_message_with_fd::<Hello>) {
            Ok(greeting) => greeting,
            Err(err) => {
                tracing::warn!(job = %self.config.job, node = %self.config.node, error = %err, "peer.rejected");
                return;
            }
        };
        let auth::Greeting {
            hello,
            extra: fd,
            nonce,
            proof,
        } = greeting;
        let refuse = |reason: String| {
            tracing::warn!(reason = %reason, "connection refused");
            match hello.peer {
                Peer::Rank { .. } => {
                    let _ = write_message(&mut &sock, &AgentToRank::Refused { reason });
                }
                _ => {
                    let _ = write_message(&mut &sock, &ControlResponse::Refused { reason });
                }
            }
        };
        if let Err(err) = hello.check_version() {
            return refuse(err.to_string());
        }
        if !hello.job.is_empty() && hello.job != self.config.job {
            return refuse(format!(
                "this agent serves job {:?}, not {:?}",
                self.config.job, hello.job
            ));
        }
        match hello.peer.clone() {
            Peer::Rank { rank, pid } => {
                if let Some(token) = &self.config.token {
                    if let Err(problem) = auth::verify(token, &nonce, &hello, &proof) {
                        let reason = if problem == auth::AuthError::Missing {
                            format!(
                                "rank {rank} (pid {pid}) presented no job token; set {} to the token of job {:?}",
                                cryo_core::protocol::ENV_TOKEN,
                                self.config.job
                            )
                        } else {
                            format!(
                                "rank {rank} (pid {pid}) presented a wrong job token for job {:?} ({problem})",
                                self.config.job
                            )
                        };
                        tracing::warn!(
                            job = %self.config.job,
                            node = %self.config.node,
                            rank,
                            pid,
                            reason = %reason,
                            "peer.rejected"
                        );
                        let _ = write_message(&mut &sock, &AgentToRank::Refused { reason });
                        return;
                    }
                }
                let Some(fd) = fd else {
                    return refuse("a rank must send its control page fd with its hello".into());
                };
                self.serve_rank(sock, rank, pid, fd);
            }
            Peer::Control { .. } => self.serve_control(sock),
            Peer::Agent { node } => refuse(format!(
                "agent {node:?}: this is a node agent, not a coordinator"
            )),
        }
    }

    fn serve_rank(self: &Arc<Self>, sock: UnixStream, rank: u32, pid: u32, fd: OwnedFd) {
        let refuse = |reason: String| {
            tracing::warn!(rank, pid, reason = %reason, "rank.refused");
            let _ = write_message(&mut &sock, &AgentToRank::Refused { reason });
        };
        match getsockopt(&sock, PeerCredentials) {
            Ok(cred) if u32::try_from(cred.pid()).ok() == Some(pid) => {}
            Ok(cred) => {
                return refuse(format!(
                    "rank {rank} claims pid {pid}, the socket says pid {}",
                    cred.pid()
                ))
            }
            Err(err) => return refuse(format!("SO_PEERCRED: {err}")),
        }
        let page = match PageMap::map(&fd) {
            Ok(page) => page,
            Err(reason) => return refuse(format!("rank {rank}: {reason}")),
        };
        drop(fd);
        let start = {
            let mut state = lock(&self.state);
            let taken = state
                .armed
                .as_mut()
                .map(|armed| (armed.pending.remove(&rank), armed.pending.is_empty()));
            match state.armed.as_ref() {
                Some(armed) if taken.is_some_and(|(removed, _)| removed) => {
                    let epoch = armed.epoch;
                    if taken.is_some_and(|(_, empty)| empty) {
                        state.armed = None;
                    }
                    StartMode::Restart {
                        epoch,
                        store: self.config.store.to_string_lossy().into_owned(),
                        job: self.config.job.clone(),
                    }
                }
                Some(armed) => {
                    let epoch = armed.epoch;
                    drop(state);
                    return refuse(format!(
                        "a restart from epoch {epoch} is armed, and it has no pending rank {rank}"
                    ));
                }
                None => StartMode::Fresh,
            }
        };
        let writer = match sock.try_clone() {
            Ok(w) => w,
            Err(err) => return refuse(format!("cloning the socket: {err}")),
        };
        let (tx, rx) = mpsc::channel();
        let conn = Arc::new(RankConn {
            rank,
            pid,
            writer: Mutex::new(writer),
            page,
            events: Mutex::new(rx),
            alive: AtomicBool::new(true),
            early: Mutex::new(None),
            baseline: Mutex::new(None),
            heat: Mutex::new(crate::capture::RegionHeat::new()),
        });
        if let Some(old) = lock(&self.ranks).insert(rank, Arc::clone(&conn)) {
            old.alive.store(false, Ordering::Release);
            tracing::warn!(
                rank,
                old_pid = old.pid,
                pid,
                "rank re-registered, replacing the old process"
            );
        }
        let restart_epoch = match &start {
            StartMode::Restart { epoch, .. } => Some(*epoch),
            StartMode::Fresh => None,
        };
        if conn
            .send(&AgentToRank::Welcome {
                start,
                node: self.config.node.clone(),
            })
            .is_err()
        {
            let _ = self.unregister(&conn);
            return;
        }
        tracing::info!(job = %self.config.job, node = %self.config.node, rank, pid, restart_epoch, "rank.registered");
        if let Some(link) = &self.link {
            link.send(&AgentToCoordinator::RankRegistered {
                rank,
                pid,
                restored_epoch: restart_epoch,
            });
        }
        self.read_rank(&sock, &conn, &tx);
    }

    fn read_rank(&self, sock: &UnixStream, conn: &Arc<RankConn>, tx: &Sender<RankEvent>) {
        let (rank, pid) = (conn.rank, conn.pid);
        let job = &self.config.job;
        let why = loop {
            match read_message::<RankToAgent>(&mut &*sock) {
                Ok(RankToAgent::Parked {
                    epoch,
                    regions,
                    runtime_fds,
                    library_fds,
                    warnings,
                }) => self.rank_parked(
                    conn,
                    tx,
                    Parked {
                        rank,
                        pid,
                        epoch,
                        regions,
                        runtime_fds,
                        library_fds,
                        warnings,
                        since: Instant::now(),
                    },
                ),
                Ok(RankToAgent::Restored { epoch }) => {
                    tracing::info!(job = %job, rank, pid, epoch, "restart.done");
                }
                Ok(RankToAgent::RestoreFailed { epoch, error }) => {
                    tracing::error!(job = %job, rank, pid, epoch, error = %error, "restart.failed");
                }
                Ok(RankToAgent::Refused { epoch, reason }) => {
                    tracing::warn!(job = %job, rank, pid, epoch, reason = %reason, "rank.refused");
                    let _ = tx.send(RankEvent::Refused { epoch, reason });
                }
                Ok(RankToAgent::Goodbye) => break "finalized".to_owned(),
                Err(err) if err.is_disconnect() => break "disconnected".to_owned(),
                Err(err) => break format!("protocol error: {err}"),
            }
        };
        tracing::info!(job = %job, rank, pid, why = %why, "rank.left");
        let _ = tx.send(RankEvent::Gone(why.clone()));
        let early = lock(&conn.early).take();
        if early.is_some() {
            tracing::info!(job = %job, rank, pid, "rank.early_park_dropped");
        }
        if self.unregister(conn) {
            if let Some(link) = &self.link {
                link.send(&AgentToCoordinator::RankLeft { rank, why });
            }
        }
    }

    /// A rank parked. Forwarded to the epoch in progress if it is for that
    /// epoch; held if it is for an epoch the coordinator has not asked this
    /// agent for yet (coordinated mode); otherwise answered `Abort` at once,
    /// so the rank is never left blocked.
    fn rank_parked(&self, conn: &Arc<RankConn>, tx: &Sender<RankEvent>, parked: Parked) {
        let (epoch, at) = (parked.epoch, parked.since);
        let mut state = lock(&self.state);
        let open = state.busy == Some(epoch) && state.cancel.as_ref().is_some_and(|c| !c.is_set());
        if open {
            let _ = tx.send(RankEvent::Parked(parked));
            return;
        }
        let linked = self
            .link
            .as_ref()
            .is_some_and(CoordinatorLink::is_connected);
        if linked && epoch > state.last_epoch && !self.shutdown.load(Ordering::Acquire) {
            let previous = lock(&conn.early).replace(parked);
            state
                .early
                .entry(epoch)
                .or_insert(at + self.config.park_timeout);
            drop(state);
            self.early_cv.notify_all();
            tracing::info!(
                job = %self.config.job, node = %self.config.node, rank = conn.rank, epoch,
                "rank.parked_early"
            );
            if let Some(previous) = previous.filter(|p| p.epoch != epoch) {
                let _ = conn.send(&AgentToRank::Abort {
                    epoch: previous.epoch,
                    reason: format!("the rank parked again, for epoch {epoch}"),
                });
            }
            return;
        }
        drop(state);
        // Parked too late for an epoch already given up: let it run rather
        // than leave it blocked.
        tracing::info!(
            job = %self.config.job, node = %self.config.node, rank = conn.rank, epoch,
            "rank.aborted"
        );
        let _ = conn.send(&AgentToRank::Abort {
            epoch,
            reason: format!(
                "no checkpoint of epoch {epoch} is in progress on node {}",
                self.config.node
            ),
        });
    }

    /// Unregisters a rank; false if another process had replaced it.
    fn unregister(&self, conn: &Arc<RankConn>) -> bool {
        conn.alive.store(false, Ordering::Release);
        let mut ranks = lock(&self.ranks);
        if ranks.get(&conn.rank).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            ranks.remove(&conn.rank);
            true
        } else {
            false
        }
    }

    fn serve_control(self: &Arc<Self>, sock: UnixStream) {
        let welcome = ControlResponse::Welcome {
            node: self.config.node.clone(),
            job: self.config.job.clone(),
        };
        if write_message(&mut &sock, &welcome).is_err() {
            return;
        }
        loop {
            let request = match read_message::<ControlRequest>(&mut &sock) {
                Ok(r) => r,
                Err(err) if err.is_disconnect() => return,
                Err(err) => {
                    let _ = write_message(
                        &mut &sock,
                        &ControlResponse::Refused {
                            reason: err.to_string(),
                        },
                    );
                    return;
                }
            };
            let response = match request {
                ControlRequest::Checkpoint {
                    epoch,
                    if_busy,
                    until,
                    full,
                } => self.checkpoint(epoch, if_busy, until, full),
                ControlRequest::ArmRestart { epoch } => self.arm_restart(epoch),
                ControlRequest::Status => ControlResponse::Status(self.status()),
            };
            if write_message(&mut &sock, &response).is_err() {
                return;
            }
        }
    }

    fn status(&self) -> AgentStatus {
        let state = lock(&self.state);
        AgentStatus {
            job: self.config.job.clone(),
            node: self.config.node.clone(),
            store: self.config.store.to_string_lossy().into_owned(),
            ranks: lock(&self.ranks)
                .values()
                .map(|c| (c.rank, c.pid))
                .collect(),
            busy: state.busy,
            last_committed: self.job.latest_committed().ok().flatten(),
            armed_restart: state.armed.as_ref().map(|a| a.epoch),
            copy_budget: self.pool.bytes(),
            copy_budget_warm: self.pool.warm_bytes(),
            peak_rss_bytes: peak_rss_bytes(),
        }
    }

    fn arm_restart(&self, epoch: Option<u64>) -> ControlResponse {
        let epoch = match epoch {
            Some(e) => e,
            None => match self.job.latest_committed() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    return ControlResponse::Refused {
                        reason: format!(
                            "job {:?} has no committed epoch to restart from",
                            self.config.job
                        ),
                    }
                }
                Err(err) => {
                    return ControlResponse::Refused {
                        reason: err.to_string(),
                    }
                }
            },
        };
        let manifest = match self.job.load_manifest(epoch) {
            Ok(m) => m,
            Err(err) => {
                return ControlResponse::Refused {
                    reason: err.to_string(),
                }
            }
        };
        let pending: BTreeSet<u32> = manifest.ranks.iter().map(|r| r.rank).collect();
        let ranks = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        lock(&self.state).armed = Some(Armed { epoch, pending });
        tracing::info!(job = %self.config.job, epoch, ranks, "restart.armed");
        ControlResponse::RestartArmed { epoch, ranks }
    }

    fn checkpoint(
        self: &Arc<Self>,
        epoch: Option<u64>,
        if_busy: BusyPolicy,
        until: Completion,
        full: bool,
    ) -> ControlResponse {
        let mut run = {
            let mut state = lock(&self.state);
            while let Some(busy) = state.busy {
                if if_busy == BusyPolicy::Refuse {
                    return ControlResponse::Busy {
                        epoch: busy,
                        reason: format!(
                            "checkpoint of epoch {busy} is still in progress (capturing or draining to the store); retry when it is committed, or ask to wait"
                        ),
                    };
                }
                state = self.idle.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let latest = match self.job.latest_committed() {
                Ok(latest) => latest.unwrap_or(0),
                Err(err) => {
                    return ControlResponse::Failed {
                        epoch: None,
                        reason: err.to_string(),
                    }
                }
            };
            let epoch = epoch.unwrap_or(latest.max(state.last_epoch) + 1);
            self.begin_busy(&mut state, epoch, self.config.park_timeout, false)
        };
        run.full = full;
        let epoch = run.epoch;
        let (tx, rx) = mpsc::channel::<Result<CheckpointReport, String>>();
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(format!("cryo-epoch-{epoch}")).spawn(move || {
            let result = shared.run_epoch(&run, Some(&tx));
            shared.end_epoch(&run, None);
            if let Err(reason) = &result {
                tracing::error!(job = %shared.config.job, epoch, reason = %reason, "checkpoint.failed");
            }
            let _ = tx.send(result);
        });
        if let Err(err) = spawned {
            {
                let mut state = lock(&self.state);
                state.busy = None;
                state.cancel = None;
            }
            self.idle.notify_all();
            return ControlResponse::Failed {
                epoch: Some(epoch),
                reason: format!("spawning: {err}"),
            };
        }
        // First message: all ranks resumed (Ok, not committed) or the end.
        let mut last = None;
        while let Ok(msg) = rx.recv() {
            let done = match &msg {
                Ok(report) => report.committed || until == Completion::Resumed,
                Err(_) => true,
            };
            last = Some(msg);
            if done {
                break;
            }
        }
        match last {
            Some(Ok(report)) => ControlResponse::Checkpoint(report),
            Some(Err(reason)) => ControlResponse::Failed {
                epoch: Some(epoch),
                reason,
            },
            None => ControlResponse::Failed {
                epoch: Some(epoch),
                reason: "checkpoint thread vanished".into(),
            },
        }
    }

    /// Marks `epoch` busy (the caller checked that nothing is) and takes the
    /// early parks for it. Early parks for older epochs are aborted.
    fn begin_busy(
        &self,
        state: &mut State,
        epoch: u64,
        park_timeout: Duration,
        coordinated: bool,
    ) -> EpochRun {
        let cancel = Arc::new(Cancel::new(coordinated));
        state.busy = Some(epoch);
        state.cancel = Some(Arc::clone(&cancel));
        state.last_epoch = state.last_epoch.max(epoch);
        state.early.retain(|e, _| *e > epoch);
        let mut early = BTreeMap::new();
        for (conn, parked) in self.take_early(|e| e <= epoch) {
            if parked.epoch == epoch {
                early.insert(conn.rank, parked);
            } else {
                let _ = conn.send(&AgentToRank::Abort {
                    epoch: parked.epoch,
                    reason: format!("epoch {} was abandoned", parked.epoch),
                });
            }
        }
        EpochRun {
            epoch,
            park_timeout,
            coordinated,
            cancel,
            early,
            written: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            full: false,
        }
    }

    /// Takes the early parks whose epoch satisfies `which`. The caller holds
    /// the state lock.
    fn take_early(&self, which: impl Fn(u64) -> bool) -> Vec<(Arc<RankConn>, Parked)> {
        let ranks: Vec<Arc<RankConn>> = lock(&self.ranks).values().cloned().collect();
        let mut out = Vec::new();
        for conn in ranks {
            let mut slot = lock(&conn.early);
            if slot.as_ref().is_some_and(|p| which(p.epoch)) {
                if let Some(parked) = slot.take() {
                    drop(slot);
                    out.push((conn, parked));
                }
            }
        }
        out
    }

    /// Ends the busy epoch: closes it to late parks, answers any park left
    /// in the ranks' queues with `Abort`, withdraws leftover requests and
    /// frees the agent. `written`: the ranks whose parts stay (coordinated
    /// success). Returns the cancel reason if the epoch was cancelled.
    fn end_epoch(&self, run: &EpochRun, written: Option<Vec<u32>>) -> Option<String> {
        let epoch = run.epoch;
        run.cancel.close();
        let ranks: Vec<Arc<RankConn>> = lock(&self.ranks).values().cloned().collect();
        for conn in &ranks {
            let _ = conn.page.page().checkpoint_requested.compare_exchange(
                epoch,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            let events = lock(&conn.events);
            while let Ok(event) = events.try_recv() {
                if let RankEvent::Parked(Parked { epoch: e, .. }) = event {
                    let _ = conn.send(&AgentToRank::Abort {
                        epoch: e,
                        reason: format!("epoch {e} is over"),
                    });
                }
            }
        }
        let reason = {
            let mut state = lock(&self.state);
            let reason = run.cancel.reason();
            if reason.is_none() {
                if let Some(ranks) = written {
                    state.written = Some((epoch, ranks));
                }
            }
            state.busy = None;
            state.cancel = None;
            reason
        };
        self.idle.notify_all();
        reason
    }

    /// Waits (bounded) until no epoch is in progress.
    fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        while state.busy.is_some() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .idle
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Removes this agent's parts of `epoch` (never other nodes' parts).
    fn remove_parts(&self, epoch: u64, ranks: &[u32]) {
        for &rank in ranks {
            let path = self.job.part_path(epoch, rank);
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(job = %self.config.job, node = %self.config.node, rank, epoch, path = %path.display(), "part.discarded");
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(job = %self.config.job, node = %self.config.node, rank, epoch, path = %path.display(), error = %err, "part.discard_failed");
                }
            }
        }
    }

    /// Reads the coordinator's requests until the link drops or it says
    /// `Shutdown`.
    fn serve_coordinator(self: Arc<Self>, reader: &TcpStream) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let (job, node) = (&self.config.job, &self.config.node);
        loop {
            let msg = match read_message::<CoordinatorToAgent>(&mut &*reader) {
                Ok(msg) => msg,
                Err(err) => {
                    let why = if err.is_disconnect() {
                        "the connection was closed".to_owned()
                    } else {
                        err.to_string()
                    };
                    self.coordinator_lost(&why);
                    return;
                }
            };
            match msg {
                CoordinatorToAgent::Checkpoint {
                    epoch,
                    park_timeout_ms,
                } => {
                    let shared = Arc::clone(&self);
                    let park_timeout = Duration::from_millis(park_timeout_ms.max(1));
                    let spawned = std::thread::Builder::new()
                        .name(format!("cryo-epoch-{epoch}"))
                        .spawn(move || shared.coordinated_checkpoint(epoch, park_timeout));
                    if let Err(err) = spawned {
                        link.send(&AgentToCoordinator::Failed {
                            epoch,
                            reason: format!("node {node}: spawning the epoch thread: {err}"),
                        });
                    }
                }
                CoordinatorToAgent::Abort { epoch, reason } => {
                    self.coordinator_abort(epoch, &format!("aborted by the coordinator: {reason}"));
                }
                CoordinatorToAgent::Committed { epoch } => {
                    let mut state = lock(&self.state);
                    if state.written.as_ref().is_some_and(|(e, _)| *e == epoch) {
                        state.written = None;
                    }
                    drop(state);
                    tracing::info!(job = %job, node = %node, epoch, "epoch.committed");
                }
                CoordinatorToAgent::ArmRestart { epoch } => match self.arm_restart(Some(epoch)) {
                    ControlResponse::RestartArmed { .. } => {}
                    ControlResponse::Refused { reason }
                    | ControlResponse::Failed { reason, .. } => {
                        tracing::error!(job = %job, node = %node, epoch, reason = %reason, "restart.refused");
                    }
                    other => {
                        tracing::error!(job = %job, node = %node, epoch, answer = ?other, "restart.refused");
                    }
                },
                CoordinatorToAgent::Shutdown => {
                    self.begin_shutdown();
                    return;
                }
                other @ (CoordinatorToAgent::Welcome { .. }
                | CoordinatorToAgent::Refused { .. }) => {
                    tracing::warn!(job = %job, node = %node, coordinator = %link.addr(), message = ?other, "coordinator.unexpected");
                }
            }
        }
    }

    /// Runs `Checkpoint { epoch }` from the coordinator: capture every local
    /// rank and make its part durable, reporting per rank; no commit.
    fn coordinated_checkpoint(self: Arc<Self>, epoch: u64, park_timeout: Duration) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let (job, node) = (&self.config.job, &self.config.node);
        let fail = |reason: String| {
            tracing::error!(job = %job, node = %node, epoch, reason = %reason, "checkpoint.failed");
            link.send(&AgentToCoordinator::Failed { epoch, reason });
        };
        let run = {
            let mut state = lock(&self.state);
            // An epoch still draining (say, one just aborted) gets the park
            // timeout to finish.
            let give_up = Instant::now() + park_timeout.max(Duration::from_secs(1));
            if state.busy == Some(epoch) {
                tracing::warn!(job = %job, node = %node, epoch, "checkpoint.duplicate");
                return;
            }
            loop {
                if state.aborted.contains(&epoch) {
                    tracing::info!(job = %job, node = %node, epoch, "checkpoint.skipped_aborted");
                    return;
                }
                if !link.is_connected() || self.shutdown.load(Ordering::Acquire) {
                    tracing::warn!(job = %job, node = %node, epoch, "checkpoint.skipped_unlinked");
                    return;
                }
                let Some(busy) = state.busy else { break };
                let now = Instant::now();
                if now >= give_up {
                    drop(state);
                    return fail(format!(
                        "node {node}: checkpoint of epoch {busy} is still in progress"
                    ));
                }
                state = self
                    .idle
                    .wait_timeout(state, give_up - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if epoch <= state.last_epoch {
                let last = state.last_epoch;
                drop(state);
                return fail(format!(
                    "node {node}: epoch {epoch} is not newer than epoch {last}, already started, aborted or given up on this node"
                ));
            }
            self.begin_busy(&mut state, epoch, park_timeout, true)
        };
        let result = self.run_epoch(&run, None);
        let written = lock(&run.written).clone();
        let cancelled = self.end_epoch(&run, result.is_ok().then(|| written.clone()));
        match (result, cancelled) {
            (_, Some(reason)) => {
                self.remove_parts(epoch, &written);
                tracing::warn!(job = %job, node = %node, epoch, reason = %reason, "checkpoint.aborted");
            }
            (Ok(report), None) => {
                tracing::info!(
                    job = %job, node = %node, epoch, ranks = report.ranks.len(),
                    "epoch.durable"
                );
            }
            (Err(reason), None) => {
                self.remove_parts(epoch, &written);
                let first = lock(&run.failed).clone();
                fail(format!(
                    "node {node}: epoch {epoch}: {}",
                    first.unwrap_or(reason)
                ));
            }
        }
    }

    /// `Abort { epoch }` from the coordinator.
    fn coordinator_abort(&self, epoch: u64, reason: &str) {
        let (victims, parts) = {
            let mut state = lock(&self.state);
            state.aborted.insert(epoch);
            while state.aborted.len() > 64 {
                state.aborted.pop_first();
            }
            state.last_epoch = state.last_epoch.max(epoch);
            state.early.retain(|e, _| *e > epoch);
            if state.busy == Some(epoch) {
                if let Some(cancel) = &state.cancel {
                    cancel.cancel(reason);
                }
            }
            let victims = self.take_early(|e| e <= epoch);
            let parts = match state.written.take() {
                Some((e, ranks)) if e == epoch => ranks,
                other => {
                    state.written = other;
                    Vec::new()
                }
            };
            (victims, parts)
        };
        self.abort_early(victims, reason);
        self.remove_parts(epoch, &parts);
        tracing::warn!(job = %self.config.job, node = %self.config.node, epoch, reason = %reason, "checkpoint.abort_requested");
    }

    fn abort_early(&self, victims: Vec<(Arc<RankConn>, Parked)>, reason: &str) {
        for (conn, parked) in victims {
            tracing::info!(
                job = %self.config.job, node = %self.config.node, rank = conn.rank,
                epoch = parked.epoch, reason = %reason, "rank.aborted"
            );
            let _ = conn.send(&AgentToRank::Abort {
                epoch: parked.epoch,
                reason: reason.to_owned(),
            });
        }
    }

    /// Aborts the coordinated epoch in progress and every early park.
    fn abort_coordinated(&self, reason: &str) {
        let victims = {
            let mut state = lock(&self.state);
            if let Some(cancel) = state.cancel.as_ref().filter(|c| c.coordinated) {
                cancel.cancel(reason);
            }
            if let Some(max) = state.early.keys().next_back().copied() {
                state.last_epoch = state.last_epoch.max(max);
            }
            state.early.clear();
            self.take_early(|_| true)
        };
        self.abort_early(victims, reason);
    }

    /// The coordinator went away: abort what it asked for, keep serving the
    /// ranks (the job computes on; only the control socket can checkpoint).
    fn coordinator_lost(&self, why: &str) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        link.lost();
        if self.shutdown.load(Ordering::Acquire) {
            return;
        }
        tracing::error!(
            job = %self.config.job,
            node = %self.config.node,
            coordinator = %link.addr(),
            error = %why,
            "coordinator.lost"
        );
        self.abort_coordinated(&format!("lost the coordinator at {}: {why}", link.addr()));
        self.early_cv.notify_all();
    }

    /// `Shutdown` from the coordinator: abort, stop accepting, let `serve`
    /// return.
    fn begin_shutdown(&self) {
        tracing::info!(job = %self.config.job, node = %self.config.node, "agent.shutdown_requested");
        self.shutdown.store(true, Ordering::Release);
        self.abort_coordinated("the job is shutting down");
        self.early_cv.notify_all();
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.config.socket);
    }

    /// Gives up on early parks whose `Checkpoint` never came.
    fn watch_early_parks(self: Arc<Self>) {
        let timeout = self.config.park_timeout;
        let mut state = lock(&self.state);
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            let Some(max) = state
                .early
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(e, _)| *e)
                .max()
            else {
                let wait = state
                    .early
                    .values()
                    .min()
                    .map_or(Duration::from_secs(1), |at| {
                        at.saturating_duration_since(now)
                    });
                state = self
                    .early_cv
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            };
            state.early.retain(|e, _| *e > max);
            state.last_epoch = state.last_epoch.max(max);
            let victims = self.take_early(|e| e <= max);
            drop(state);
            for (conn, parked) in victims {
                let reason = format!(
                    "no checkpoint request for epoch {} reached node {} within {timeout:?} of the rank parking",
                    parked.epoch, self.config.node
                );
                tracing::warn!(
                    job = %self.config.job, node = %self.config.node, rank = conn.rank,
                    epoch = parked.epoch, "checkpoint.unsolicited_timeout"
                );
                let _ = conn.send(&AgentToRank::Abort {
                    epoch: parked.epoch,
                    reason,
                });
            }
            state = lock(&self.state);
        }
    }

    /// Runs one epoch. Standalone: sends a not-yet-committed report on `tx`
    /// once every rank has resumed, commits, and returns the final report.
    /// Coordinated: reports `Copied`/`Durable` per rank to the coordinator
    /// and does not commit.
    fn run_epoch(
        &self,
        run: &EpochRun,
        tx: Option<&Sender<Result<CheckpointReport, String>>>,
    ) -> Result<CheckpointReport, String> {
        let epoch = run.epoch;
        let t0 = Instant::now();
        let job = &self.config.job;
        let node = &self.config.node;
        let link = if run.coordinated {
            self.link.as_ref()
        } else {
            None
        };
        let ranks: Vec<Arc<RankConn>> = lock(&self.ranks).values().cloned().collect();
        let world: Vec<u32> = ranks.iter().map(|r| r.rank).collect();
        let world_size = u32::try_from(ranks.len()).unwrap_or(u32::MAX);
        let n_ranks = ranks.len();
        let empty_report = || CheckpointReport {
            job: job.clone(),
            node: node.clone(),
            epoch,
            committed: false,
            ranks: Vec::new(),
            resumed_ns: 0,
            total_ns: 0,
            stats: WriteStats::default(),
            peak_rss_bytes: peak_rss_bytes(),
            copy_budget: self.pool.bytes(),
        };
        if run.coordinated {
            if ranks.is_empty() {
                tracing::warn!(job = %job, node = %node, epoch, "checkpoint.no_local_ranks");
                return Ok(empty_report());
            }
        } else {
            let expected: Vec<u32> = match self.config.ranks {
                Some(n) => (0..n).collect(),
                None => (0..world_size).collect(),
            };
            if ranks.is_empty() {
                return Err("no rank is registered with this agent".into());
            }
            if world != expected {
                return Err(format!(
                    "registered ranks are {world:?}; a node-local epoch needs ranks {expected:?} (is a rank still starting, or did one exit?)"
                ));
            }
        }
        tracing::info!(job = %job, node = %node, epoch, ranks = world_size, coordinated = run.coordinated, "checkpoint.requested");
        let config = WriterConfig {
            chunk_size: self.config.chunk_size,
            codec: ChunkCodec {
                level: self.config.zstd_level,
                ..ChunkCodec::default()
            },
        };
        let writer = match self.job.begin_epoch(epoch, config) {
            Ok(writer) => writer,
            Err(err) => {
                // Early-parked ranks must not stay blocked.
                for (rank, parked) in &run.early {
                    if let Some(conn) = ranks.iter().find(|c| c.rank == *rank) {
                        let _ = conn.send(&AgentToRank::Abort {
                            epoch: parked.epoch,
                            reason: err.to_string(),
                        });
                    }
                }
                return Err(err.to_string());
            }
        };
        for conn in &ranks {
            // Stale events from an abandoned epoch must not satisfy this one.
            while let Ok(event) = lock(&conn.events).try_recv() {
                if let RankEvent::Parked(Parked { epoch: stale, .. }) = event {
                    let _ = conn.send(&AgentToRank::Abort {
                        epoch: stale,
                        reason: format!("epoch {stale} was abandoned"),
                    });
                }
            }
            // A rank already parked for this epoch must not find the
            // request again once resumed.
            if !run.early.contains_key(&conn.rank) {
                conn.page
                    .page()
                    .checkpoint_requested
                    .store(epoch, Ordering::Release);
            }
        }
        let deadline = t0 + run.park_timeout;
        let ctx = CaptureContext {
            access: self.access.as_ref(),
            pool: &self.pool,
            copy_threads: &self.copy_threads,
            store_threads: &self.store_threads,
            gate: &self.gate,
            node,
            cancelled: &run.cancel.flag,
        };
        let resumed = AtomicUsize::new(0);
        let resumed_reports: Mutex<Vec<RankCaptureReport>> = Mutex::new(Vec::new());
        let resumed_ns = AtomicU64::new(0);
        let aborted = || format!("epoch {epoch} {}", run.stop_reason());
        let results: Vec<Result<(RankCaptureReport, WriteStats), String>> = std::thread::scope(
            |scope| {
                let handles: Vec<_> = ranks
                .iter()
                .map(|conn| {
                    let ctx = &ctx;
                    let writer = &writer;
                    let resumed = &resumed;
                    let resumed_reports = &resumed_reports;
                    let resumed_ns = &resumed_ns;
                    let aborted = &aborted;
                    scope.spawn(move || {
                        let result = (|| -> Result<(RankCaptureReport, WriteStats), String> {
                        let parked = match run.early.get(&conn.rank) {
                            Some(parked) => parked.clone(),
                            None => self.wait_parked(conn, run, deadline)?,
                        };
                        tracing::info!(job = %job, node = %node, rank = conn.rank, epoch, "rank.quiesced");
                        fault::pause_at(fault::Phase::Quiesce, epoch, job);
                        let rank_writer = writer.rank(conn.rank);
                        let mut did_resume = false;
                        let mut resume = |report: &RankCaptureReport| {
                            fault::pause_at(fault::Phase::Copy, epoch, job);
                            if run.cancel.is_set() {
                                return Err(aborted());
                            }
                            conn.send(&AgentToRank::Resume { epoch })?;
                            conn.page.page().resumed_epoch.store(epoch, Ordering::Release);
                            did_resume = true;
                            tracing::info!(
                                job = %job, node = %node, rank = conn.rank, epoch,
                                pause_us = report.pause_ns / 1000, copy_us = report.copy_ns / 1000,
                                bytes = report.bytes, streamed = report.streamed,
                                "rank.resumed"
                            );
                            if let Some(link) = link {
                                link.send(&AgentToCoordinator::Copied {
                                    epoch,
                                    rank: conn.rank,
                                    bytes: report.bytes,
                                    pause_us: report.pause_ns / 1000,
                                });
                            }
                            lock(resumed_reports).push(report.clone());
                            if resumed.fetch_add(1, Ordering::AcqRel) + 1 == n_ranks {
                                resumed_ns.store(nanos(t0), Ordering::Release);
                                let mut reports = lock(resumed_reports).clone();
                                reports.sort_by_key(|r| r.rank);
                                if let Some(tx) = tx {
                                    let _ = tx.send(Ok(CheckpointReport {
                                        ranks: reports,
                                        resumed_ns: nanos(t0),
                                        ..empty_report()
                                    }));
                                }
                            }
                            Ok(())
                        };
                        let baseline = lock(&conn.baseline).take().filter(|_| !run.full);
                        let mut heat = lock(&conn.heat);
                        let captured = capture_rank(ctx, &rank_writer, &parked, baseline.as_deref(), &mut heat, &mut resume);
                        drop(heat);
                        let (report, record) = match captured {
                            Ok(x) => x,
                            Err(err) => {
                                if !did_resume {
                                    tracing::info!(job = %job, node = %node, rank = conn.rank, epoch, "rank.aborted");
                                    let _ = conn.send(&AgentToRank::Abort { epoch, reason: err.to_string() });
                                }
                                return Err(match err {
                                    crate::capture::CaptureError::Resume { reason, .. } if run.cancel.is_set() => {
                                        format!("rank {}: {reason}", conn.rank)
                                    }
                                    err => err.to_string(),
                                });
                            }
                        };
                        fault::pause_at(fault::Phase::Drain, epoch, job);
                        if run.cancel.is_set() {
                            return Err(format!("rank {}: {}", conn.rank, aborted()));
                        }
                        let regions = record.regions.clone();
                        let stats = rank_writer.finish(record).map_err(|e| e.to_string())?;
                        *lock(&conn.baseline) = Some(regions);
                        lock(&run.written).push(conn.rank);
                        tracing::info!(job = %job, node = %node, rank = conn.rank, epoch, new_chunks = stats.new_chunks, "rank.durable");
                        if let Some(link) = link {
                            if run.cancel.is_set() {
                                return Err(format!("rank {}: {}", conn.rank, aborted()));
                            }
                            link.send(&AgentToCoordinator::Durable {
                                epoch,
                                rank: conn.rank,
                                written: stats.new_stored_bytes,
                            });
                        }
                        Ok((report, stats))
                        })();
                        if let Err(reason) = &result {
                            if run.coordinated && !run.cancel.is_set() {
                                run.fail(reason);
                            }
                        }
                        result
                    })
                })
                .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("capture thread panicked".into()))
                    })
                    .collect()
            },
        );
        drop(writer);
        let failures: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        if !failures.is_empty() {
            if !run.coordinated {
                let _ = self.job.discard_pending(epoch);
            }
            return Err(format!(
                "epoch {epoch} abandoned, nothing committed: {}",
                failures.join("; ")
            ));
        }
        let mut stats = WriteStats::default();
        let mut reports: Vec<RankCaptureReport> = Vec::new();
        for (report, rank_stats) in results.into_iter().filter_map(Result::ok) {
            stats.add(&rank_stats);
            reports.push(report);
        }
        reports.sort_by_key(|r| r.rank);
        if run.coordinated {
            // The coordinator commits once every node's ranks are durable.
            return Ok(CheckpointReport {
                ranks: reports,
                resumed_ns: resumed_ns.load(Ordering::Acquire),
                total_ns: nanos(t0),
                stats,
                ..empty_report()
            });
        }
        let manifest = self
            .job
            .commit_epoch(
                epoch,
                world_size,
                u32::try_from(self.config.chunk_size).unwrap_or(u32::MAX),
            )
            .map_err(|e| e.to_string())?;
        let report = CheckpointReport {
            job: job.clone(),
            node: node.clone(),
            epoch,
            committed: true,
            ranks: reports,
            resumed_ns: resumed_ns.load(Ordering::Acquire),
            total_ns: nanos(t0),
            stats: manifest.stats(),
            peak_rss_bytes: peak_rss_bytes(),
            copy_budget: self.pool.bytes(),
        };
        tracing::info!(
            job = %job, node = %node, epoch,
            total_ms = report.total_ns / 1_000_000,
            new_chunks = report.stats.new_chunks,
            peak_rss = report.peak_rss_bytes,
            "epoch.committed"
        );
        Ok(report)
    }

    fn wait_parked(
        &self,
        conn: &RankConn,
        run: &EpochRun,
        deadline: Instant,
    ) -> Result<Parked, String> {
        /// How often a wait checks whether the epoch was cancelled.
        const POLL: Duration = Duration::from_millis(20);
        let epoch = run.epoch;
        let events = lock(&conn.events);
        let who = format!("rank {} (pid {})", conn.rank, conn.pid);
        let mut deadline = deadline;
        let mut withdrawn = false;
        loop {
            if run.cancel.is_set() {
                // Withdraw the request; a rank that took it parks and gets
                // Abort at once (the epoch is closed to parks).
                let _ = conn.page.page().checkpoint_requested.compare_exchange(
                    epoch,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Err(format!("{who}: epoch {epoch} {}", run.stop_reason()));
            }
            let wait = deadline.saturating_duration_since(Instant::now()).min(POLL);
            match events.recv_timeout(wait) {
                Ok(RankEvent::Parked(parked)) if parked.epoch == epoch => {
                    // With MPI a rank may park for the agreed epoch before
                    // its own request was raised: clear the request so that
                    // it does not park again for this epoch once resumed.
                    let _ = conn.page.page().checkpoint_requested.compare_exchange(
                        epoch,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    // Parked, possibly just after the deadline: capture it.
                    return Ok(parked);
                }
                Ok(RankEvent::Parked(Parked { epoch: stale, .. })) => {
                    let _ = conn.send(&AgentToRank::Abort {
                        epoch: stale,
                        reason: "stale epoch".into(),
                    });
                }
                Ok(RankEvent::Gone(why)) => {
                    return Err(format!("{who} left before reaching a safe point ({why})"))
                }
                Ok(RankEvent::Refused { epoch: e, reason }) if e == epoch => {
                    return Err(format!("{who} refused to park: {reason}"))
                }
                Ok(RankEvent::Refused { .. }) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(format!("{who} disconnected")),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) if withdrawn => {
                    return Err(format!(
                        "{who} took the checkpoint request but never parked"
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Withdraw the request. If the rank already took it, it
                    // is parking right now: wait for it, then abort it.
                    let taken = conn
                        .page
                        .page()
                        .checkpoint_requested
                        .swap(0, Ordering::AcqRel)
                        != epoch;
                    if !taken {
                        return Err(format!(
                            "{who} did not reach a safe point within {:?}",
                            run.park_timeout
                        ));
                    }
                    withdrawn = true;
                    deadline = Instant::now() + Duration::from_secs(10);
                }
            }
        }
    }
}
