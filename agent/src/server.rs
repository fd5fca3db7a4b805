//! The node agent daemon: registers local ranks over its Unix socket,
//! answers control requests on the same socket, runs checkpoints and hands
//! restart information to ranks that register after a restart was armed.
//!
//! Threads: one accept loop; one thread per connection (for a rank it reads
//! the rank's messages and forwards them to whoever waits for them); one
//! thread per checkpoint, with one scoped thread per rank inside it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryo_core::chunk::ChunkCodec;
use cryo_core::manifest::WriteStats;
use cryo_core::protocol::{
    read_message, recv_message_with_fd, write_message, AgentStatus, AgentToRank, BusyPolicy,
    CheckpointReport, Completion, ControlPage, ControlRequest, ControlResponse, Hello, Peer,
    RankCaptureReport, RankToAgent, RegionInfo, StartMode, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC,
};
use cryo_core::store::{JobStore, Store, StoreError};
use cryo_core::writer::WriterConfig;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use thiserror::Error;

use crate::capture::{capture_rank, nanos, CaptureContext, CopyGate, Parked};
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
}

enum RankEvent {
    Parked {
        epoch: u64,
        regions: Vec<RegionInfo>,
        runtime_fds: Vec<i32>,
        at: Instant,
    },
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

#[derive(Default)]
struct State {
    busy: Option<u64>,
    last_epoch: u64,
    armed: Option<Armed>,
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
        if config.socket.exists() {
            if UnixStream::connect(&config.socket).is_ok() {
                return Err(ServeError::InUse(config.socket.clone()));
            }
            let _ = fs::remove_file(&config.socket);
        }
        let listener = UnixListener::bind(&config.socket).map_err(|source| ServeError::Bind {
            path: config.socket.clone(),
            source,
        })?;
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
                    return Err(ServeError::Restart(reason))
                }
                other => return Err(ServeError::Restart(format!("{other:?}"))),
            }
        }
        tracing::info!(
            job = %shared.config.job,
            node = %shared.config.node,
            socket = %shared.config.socket.display(),
            copy_budget = shared.pool.bytes(),
            "agent.ready"
        );
        Ok(Agent { shared, listener })
    }

    /// Serves forever.
    pub fn serve(self) -> io::Result<()> {
        for conn in self.listener.incoming() {
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
        Ok(())
    }
}

impl Shared {
    fn handle(self: Arc<Self>, sock: UnixStream) {
        let (hello, fd) = match recv_message_with_fd::<Hello>(&sock) {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!(error = %err, "bad hello");
                return;
            }
        };
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
            self.unregister(&conn);
            return;
        }
        tracing::info!(job = %self.config.job, node = %self.config.node, rank, pid, restart_epoch, "rank.registered");
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
                }) => {
                    let at = Instant::now();
                    if lock(&self.state).busy == Some(epoch) {
                        let _ = tx.send(RankEvent::Parked {
                            epoch,
                            regions,
                            runtime_fds,
                            at,
                        });
                    } else {
                        // Parked too late for an epoch already given up:
                        // let it run rather than leave it blocked.
                        let _ = conn.send(&AgentToRank::Abort {
                            epoch,
                            reason: format!("no checkpoint of epoch {epoch} is in progress"),
                        });
                    }
                }
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
        let _ = tx.send(RankEvent::Gone(why));
        self.unregister(conn);
    }

    fn unregister(&self, conn: &Arc<RankConn>) {
        conn.alive.store(false, Ordering::Release);
        let mut ranks = lock(&self.ranks);
        if ranks.get(&conn.rank).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            ranks.remove(&conn.rank);
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
                } => self.checkpoint(epoch, if_busy, until),
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
    ) -> ControlResponse {
        let epoch = {
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
            state.busy = Some(epoch);
            state.last_epoch = state.last_epoch.max(epoch);
            epoch
        };
        let (tx, rx) = mpsc::channel::<Result<CheckpointReport, String>>();
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(format!("cryo-epoch-{epoch}")).spawn(move || {
            let result = shared.run_epoch(epoch, &tx);
            {
                let mut state = lock(&shared.state);
                state.busy = None;
            }
            shared.idle.notify_all();
            if let Err(reason) = &result {
                tracing::error!(job = %shared.config.job, epoch, reason = %reason, "checkpoint.failed");
            }
            let _ = tx.send(result);
        });
        if let Err(err) = spawned {
            lock(&self.state).busy = None;
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

    /// Runs one epoch. Sends a not-yet-committed report on `tx` once every
    /// rank has resumed; returns the final report.
    fn run_epoch(
        &self,
        epoch: u64,
        tx: &Sender<Result<CheckpointReport, String>>,
    ) -> Result<CheckpointReport, String> {
        let t0 = Instant::now();
        let job = &self.config.job;
        let node = &self.config.node;
        let ranks: Vec<Arc<RankConn>> = lock(&self.ranks).values().cloned().collect();
        let world: Vec<u32> = ranks.iter().map(|r| r.rank).collect();
        let expected: Vec<u32> = match self.config.ranks {
            Some(n) => (0..n).collect(),
            None => (0..u32::try_from(ranks.len()).unwrap_or(u32::MAX)).collect(),
        };
        if ranks.is_empty() {
            return Err("no rank is registered with this agent".into());
        }
        if world != expected {
            return Err(format!(
                "registered ranks are {world:?}; a node-local epoch needs ranks {expected:?} (is a rank still starting, or did one exit?)"
            ));
        }
        let world_size = u32::try_from(ranks.len()).unwrap_or(u32::MAX);
        let n_ranks = ranks.len();
        tracing::info!(job = %job, node = %node, epoch, ranks = world_size, "checkpoint.requested");
        let config = WriterConfig {
            chunk_size: self.config.chunk_size,
            codec: ChunkCodec {
                level: self.config.zstd_level,
                ..ChunkCodec::default()
            },
        };
        let writer = self
            .job
            .begin_epoch(epoch, config)
            .map_err(|e| e.to_string())?;
        for conn in &ranks {
            // Stale events from an abandoned epoch must not satisfy this one.
            while let Ok(event) = lock(&conn.events).try_recv() {
                if let RankEvent::Parked { epoch: stale, .. } = event {
                    let _ = conn.send(&AgentToRank::Abort {
                        epoch: stale,
                        reason: format!("epoch {stale} was abandoned"),
                    });
                }
            }
            conn.page
                .page()
                .checkpoint_requested
                .store(epoch, Ordering::Release);
        }
        let deadline = t0 + self.config.park_timeout;
        let ctx = CaptureContext {
            access: self.access.as_ref(),
            pool: &self.pool,
            copy_threads: &self.copy_threads,
            store_threads: &self.store_threads,
            gate: &self.gate,
            node,
        };
        let resumed = AtomicUsize::new(0);
        let resumed_reports: Mutex<Vec<RankCaptureReport>> = Mutex::new(Vec::new());
        let resumed_ns = AtomicU64::new(0);
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
                    scope.spawn(move || {
                        let parked = self.wait_parked(conn, epoch, deadline)?;
                        tracing::info!(job = %job, node = %node, rank = conn.rank, epoch, "rank.quiesced");
                        let rank_writer = writer.rank(conn.rank);
                        let mut did_resume = false;
                        let mut resume = |report: &RankCaptureReport| {
                            conn.send(&AgentToRank::Resume { epoch })?;
                            conn.page.page().resumed_epoch.store(epoch, Ordering::Release);
                            did_resume = true;
                            tracing::info!(
                                job = %job, node = %node, rank = conn.rank, epoch,
                                pause_us = report.pause_ns / 1000, copy_us = report.copy_ns / 1000,
                                bytes = report.bytes, streamed = report.streamed,
                                "rank.resumed"
                            );
                            lock(resumed_reports).push(report.clone());
                            if resumed.fetch_add(1, Ordering::AcqRel) + 1 == n_ranks {
                                resumed_ns.store(nanos(t0), Ordering::Release);
                                let mut reports = lock(resumed_reports).clone();
                                reports.sort_by_key(|r| r.rank);
                                let _ = tx.send(Ok(CheckpointReport {
                                    job: job.clone(),
                                    node: node.clone(),
                                    epoch,
                                    committed: false,
                                    ranks: reports,
                                    resumed_ns: nanos(t0),
                                    total_ns: 0,
                                    stats: WriteStats::default(),
                                    peak_rss_bytes: peak_rss_bytes(),
                                    copy_budget: self.pool.bytes(),
                                }));
                            }
                            Ok(())
                        };
                        let captured = capture_rank(ctx, &rank_writer, &parked, &mut resume);
                        let (report, record) = match captured {
                            Ok(x) => x,
                            Err(err) => {
                                if !did_resume {
                                    let _ = conn.send(&AgentToRank::Abort { epoch, reason: err.to_string() });
                                }
                                return Err(err.to_string());
                            }
                        };
                        let stats = rank_writer.finish(record).map_err(|e| e.to_string())?;
                        tracing::info!(job = %job, node = %node, rank = conn.rank, epoch, new_chunks = stats.new_chunks, "rank.durable");
                        Ok((report, stats))
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
            let _ = self.job.discard_pending(epoch);
            return Err(format!(
                "epoch {epoch} abandoned, nothing committed: {}",
                failures.join("; ")
            ));
        }
        let mut reports: Vec<RankCaptureReport> = results
            .into_iter()
            .filter_map(Result::ok)
            .map(|(r, _)| r)
            .collect();
        reports.sort_by_key(|r| r.rank);
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
        epoch: u64,
        deadline: Instant,
    ) -> Result<Parked, String> {
        let events = lock(&conn.events);
        let who = format!("rank {} (pid {})", conn.rank, conn.pid);
        let mut deadline = deadline;
        let mut withdrawn = false;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(RankEvent::Parked {
                    epoch: e,
                    regions,
                    runtime_fds,
                    at,
                }) if e == epoch => {
                    // Parked, possibly just after the deadline: capture it.
                    return Ok(Parked {
                        rank: conn.rank,
                        pid: conn.pid,
                        epoch,
                        regions,
                        runtime_fds,
                        since: at,
                    });
                }
                Ok(RankEvent::Parked { epoch: stale, .. }) => {
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
                            self.config.park_timeout
                        ));
                    }
                    withdrawn = true;
                    deadline = Instant::now() + Duration::from_secs(10);
                }
            }
        }
    }
}
