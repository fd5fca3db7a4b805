//! The node agent's connections: it registers local ranks over its Unix
//! socket, answers control clients on the same socket ([`crate::control`]),
//! and in coordinated mode follows its coordinator
//! ([`crate::coordinated`]). Epochs themselves run in [`crate::epoch`].
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

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::format::chunk::ChunkCodec;
use cryo_core::locality::Filesystem;
use cryo_core::protocol::{
    read_message, recv_message_with_fd, write_message_as, AbortReason, AgentToCoordinator,
    AgentToRank, ControlResponse, Departure, Hello, Peer, RankToAgent, StartMode,
};
use cryo_core::store::writer::{ChunkLayout, WriterConfig};
use cryo_core::store::{JobStore, Store};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

pub use crate::config::{default_copy_budget, AgentConfig, RestartFrom, ServeError};

use crate::armed::Armed;
use crate::capture::{CopyGate, Parked, RegionHeat};
use crate::epoch::{lock, EpochRun, Resources, Slot};
use crate::link::{self, CoordinatorLink};
use crate::pool::BufferPool;
use crate::procfs::{LinuxProcess, ProcessAccess};
use crate::ranks::{PageMap, RankConn, RankEvent};

pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    pub(crate) job: JobStore,
    pub(crate) ranks: Mutex<BTreeMap<u32, Arc<RankConn>>>,
    /// The epoch slot; `idle` is signalled when it frees.
    pub(crate) slot: Mutex<Slot>,
    pub(crate) idle: Condvar,
    pub(crate) armed: Mutex<Option<Armed>>,
    pub(crate) pool: BufferPool,
    copy_threads: rayon::ThreadPool,
    store_threads: rayon::ThreadPool,
    gate: CopyGate,
    access: Box<dyn ProcessAccess>,
    /// The store's filesystem, read once at the start.
    store_fs: Option<Filesystem>,
    /// Coordinated mode: the link to the coordinator.
    pub(crate) link: Option<CoordinatorLink>,
    /// Coordinated mode: the reading half, until `serve` takes it.
    link_reader: Mutex<Option<TcpStream>>,
    /// Set by the coordinator's `Shutdown`.
    pub(crate) shutdown: AtomicBool,
    /// Wakes the early-park watchdog.
    pub(crate) early_cv: Condvar,
    /// Coordinated mode: the epoch the job stops after, 0 for none.
    pub(crate) final_epoch: AtomicU64,
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

impl Agent {
    /// Opens the store, maps the copy pool and binds the socket.
    pub fn bind(config: AgentConfig) -> Result<Agent, ServeError> {
        let store = Store::create(&config.store)?;
        let job = store.prepared_job(&config.job)?;
        let pool =
            BufferPool::as_wanted(config.copy_budget, config.chunk_size, config.prefault_delay)?;
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
            cryo_core::private_dir::make_private(dir, cryo_core::private_dir::Owner::current())?;
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
            slot: Mutex::new(Slot::default()),
            idle: Condvar::new(),
            armed: Mutex::new(None),
            pool,
            copy_threads,
            store_threads,
            gate: CopyGate::default(),
            access: Box::new(LinuxProcess),
            store_fs: Filesystem::of(&config.store).ok(),
            link,
            link_reader: Mutex::new(link_reader),
            shutdown: AtomicBool::new(false),
            early_cv: Condvar::new(),
            final_epoch: AtomicU64::new(0),
            config,
        });
        if let Some(from) = shared.config.restart_from {
            let epoch = match from {
                RestartFrom::Latest => None,
                RestartFrom::Epoch(e) => Some(e),
            };
            match shared.arm_restart(epoch) {
                ControlResponse::RestartArmed { .. } => {}
                ControlResponse::Refused { reason } => {
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
                .spawn(move || shared.serve_coordinator(reader))?;
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("cryo-early-parks".into())
                .spawn(move || shared.watch_early_parks())?;
            crate::termination::watch(Arc::downgrade(&self.shared));
        }
        let weak = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("cryo-keep-warm".into())
            .spawn(move || crate::warming::keep_warm(weak))?;
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
        // And its folder (a node agent's for the job), if nothing else is in it.
        if let Some(dir) = self.shared.config.socket.parent() {
            let _ = fs::remove_dir(dir);
        }
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
        let version = hello.version;
        let refuse = |reason: String| {
            tracing::warn!(reason = %reason, "connection refused");
            match hello.peer {
                Peer::Rank { .. } => {
                    let _ = write_message_as(&mut &sock, &AgentToRank::Refused { reason }, version);
                }
                _ => {
                    let _ =
                        write_message_as(&mut &sock, &ControlResponse::Refused { reason }, version);
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
                        let _ =
                            write_message_as(&mut &sock, &AgentToRank::Refused { reason }, version);
                        return;
                    }
                }
                let Some(fd) = fd else {
                    return refuse("a rank must send its control page fd with its hello".into());
                };
                self.serve_rank(sock, (rank, pid, version), fd);
            }
            Peer::Control { .. } => self.serve_control(sock, version),
            Peer::Agent { node } => refuse(format!(
                "agent {node:?}: this is a node agent, not a coordinator"
            )),
        }
    }

    /// Registers a rank that said hello as `(rank, pid, protocol version)`.
    fn serve_rank(self: &Arc<Self>, sock: UnixStream, who: (u32, u32, u16), fd: OwnedFd) {
        let (rank, pid, version) = who;
        let refuse = |reason: String| {
            tracing::warn!(rank, pid, reason = %reason, "rank.refused");
            let _ = write_message_as(&mut &sock, &AgentToRank::Refused { reason }, version);
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
            let mut armed_slot = lock(&self.armed);
            let node = &self.config.node;
            match armed_slot
                .as_mut()
                .map(|armed| (armed.epoch, armed.take(rank, node)))
            {
                Some((epoch, Ok(last))) => {
                    if last {
                        *armed_slot = None;
                    }
                    StartMode::Restart {
                        epoch,
                        store: self.config.store.to_string_lossy().into_owned(),
                        job: self.config.job.clone(),
                    }
                }
                Some((_, Err(reason))) => {
                    drop(armed_slot);
                    // Its launcher may end the job before its own words
                    // reach anyone: `cryo` says why.
                    let how = Departure::RefusedAtRestart {
                        reason: reason.to_string(),
                    };
                    if let Some(link) = &self.link {
                        link.send(&AgentToCoordinator::RankLeft { rank, how });
                    }
                    return refuse(reason);
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
            version,
            writer: Mutex::new(writer),
            page,
            events: Mutex::new(rx),
            alive: AtomicBool::new(true),
            early: Mutex::new(None),
            baseline: Mutex::new(None),
            heat: Mutex::new(RegionHeat::new()),
            offered_slots: AtomicUsize::new(0),
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
        // A failed restart is why the rank leaves: the coordinator says so.
        let mut failed = None;
        let how = loop {
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
                    failed = Some(Departure::RestoreFailed { epoch, error });
                }
                Ok(RankToAgent::Refused { epoch, reason }) => {
                    tracing::warn!(job = %job, rank, pid, epoch, reason = %reason, "rank.refused");
                    let _ = tx.send(RankEvent::Refused { epoch, reason });
                }
                Ok(RankToAgent::Snapshot { epoch, outcome }) => {
                    let _ = tx.send(RankEvent::Snapshot { epoch, outcome });
                }
                Ok(RankToAgent::Copied { epoch, outcome }) => {
                    let _ = tx.send(RankEvent::Copied { epoch, outcome });
                }
                Ok(RankToAgent::Warned { signal }) => {
                    crate::warning::pass_on(&self.config, self.link.as_ref(), conn, signal)
                }
                Ok(RankToAgent::Exiting { status }) => {
                    failed.get_or_insert_with(|| Departure::exited(status));
                }
                Ok(RankToAgent::Goodbye) => break Departure::Finalized,
                Err(err) if err.is_disconnect() => {
                    break failed.take().unwrap_or(Departure::Vanished)
                }
                Err(err) => {
                    break Departure::ProtocolError {
                        detail: err.to_string(),
                    }
                }
            }
        };
        tracing::info!(job = %job, rank, pid, how = %how, "rank.left");
        let _ = tx.send(RankEvent::Gone(how.clone()));
        let early = lock(&conn.early).take();
        if early.is_some() {
            tracing::info!(job = %job, rank, pid, "rank.early_park_dropped");
        }
        if self.unregister(conn) {
            if let Some(link) = &self.link {
                link.send(&AgentToCoordinator::RankLeft { rank, how });
            }
        }
        self.end_if_orphaned();
    }

    /// A rank parked. Forwarded to the epoch in progress if it is for that
    /// epoch; held if it is for an epoch the coordinator has not asked this
    /// agent for yet (coordinated mode); otherwise answered `Abort` at once,
    /// so the rank is never left blocked.
    fn rank_parked(&self, conn: &Arc<RankConn>, tx: &Sender<RankEvent>, parked: Parked) {
        let (epoch, at) = (parked.epoch, parked.since);
        let mut slot = lock(&self.slot);
        if slot.is_open(epoch) {
            let _ = tx.send(RankEvent::Parked(parked));
            return;
        }
        let linked = self
            .link
            .as_ref()
            .is_some_and(CoordinatorLink::is_connected);
        if linked
            && !self.shutdown.load(Ordering::Acquire)
            && slot.hold_early(epoch, at + self.config.park_timeout)
        {
            let previous = lock(&conn.early).replace(parked);
            drop(slot);
            self.early_cv.notify_all();
            tracing::info!(
                job = %self.config.job, node = %self.config.node, rank = conn.rank, epoch,
                "rank.parked_early"
            );
            if let Some(previous) = previous.filter(|p| p.epoch != epoch) {
                conn.abort(
                    previous.epoch,
                    &format!("the rank parked again, for epoch {epoch}"),
                );
            }
            return;
        }
        drop(slot);
        // Parked too late for an epoch already given up: let it run rather
        // than leave it blocked.
        tracing::info!(
            job = %self.config.job, node = %self.config.node, rank = conn.rank, epoch,
            "rank.aborted"
        );
        conn.abort(
            epoch,
            &format!(
                "no checkpoint of epoch {epoch} is in progress on node {}",
                self.config.node
            ),
        );
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

    /// Marks `epoch` running (the caller checked that the slot is free) and
    /// takes the early parks for it; early parks for older epochs are
    /// aborted.
    pub(crate) fn begin_epoch(
        &self,
        slot: &mut Slot,
        epoch: u64,
        park_timeout: Duration,
        coordinated: bool,
    ) -> EpochRun {
        let cancel = slot.begin(epoch, coordinated);
        let mut early = BTreeMap::new();
        for (conn, parked) in self.take_early(|e| e <= epoch) {
            if parked.epoch == epoch {
                early.insert(conn.rank, parked);
            } else {
                conn.abort(
                    parked.epoch,
                    &format!("epoch {} was abandoned", parked.epoch),
                );
            }
        }
        EpochRun::new(epoch, park_timeout, cancel, early)
    }

    /// Takes the early parks whose epoch satisfies `which`. The caller holds
    /// the slot lock.
    pub(crate) fn take_early(&self, which: impl Fn(u64) -> bool) -> Vec<(Arc<RankConn>, Parked)> {
        let ranks: Vec<Arc<RankConn>> = lock(&self.ranks).values().cloned().collect();
        let mut out = Vec::new();
        for conn in ranks {
            let mut early = lock(&conn.early);
            if early.as_ref().is_some_and(|p| which(p.epoch)) {
                if let Some(parked) = early.take() {
                    drop(early);
                    out.push((conn, parked));
                }
            }
        }
        out
    }

    /// What an epoch uses of this agent.
    pub(crate) fn resources(&self) -> Resources<'_> {
        Resources {
            job: &self.job,
            job_name: &self.config.job,
            node: &self.config.node,
            writer: WriterConfig {
                chunk_size: self.config.chunk_size,
                codec: ChunkCodec {
                    level: self.config.zstd_level,
                    ..ChunkCodec::default()
                },
                layout: ChunkLayout::Packs {
                    max_bytes: self.config.pack_size,
                },
            },
            access: self.access.as_ref(),
            pool: &self.pool,
            copy_threads: &self.copy_threads,
            store_threads: &self.store_threads,
            snapshot: self.config.snapshot,
            self_copy: self.config.self_copy,
            gate: &self.gate,
            store_fs: self.store_fs,
        }
    }

    /// Ends the running epoch: closes it to late parks, answers any park
    /// left in the ranks' queues with `Abort`, withdraws leftover requests
    /// and frees the slot. `written`: the ranks whose parts stay
    /// (coordinated success). Returns the cancel reason if the epoch was
    /// cancelled.
    pub(crate) fn end_epoch(
        &self,
        run: &EpochRun,
        written: Option<Vec<u32>>,
    ) -> Option<AbortReason> {
        let epoch = run.epoch;
        run.cancel.close();
        for conn in self.rank_conns() {
            conn.withdraw_request(epoch);
            let events = lock(&conn.events);
            while let Ok(event) = events.try_recv() {
                if let RankEvent::Parked(Parked { epoch: e, .. }) = event {
                    conn.abort(e, &format!("epoch {e} is over"));
                }
            }
        }
        let reason = lock(&self.slot).end(&run.cancel, written.map(|ranks| (epoch, ranks)));
        self.idle.notify_all();
        reason
    }

    /// Waits (bounded) until no epoch is in progress.
    fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut slot = lock(&self.slot);
        while slot.busy().is_some() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            slot = self
                .idle
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
