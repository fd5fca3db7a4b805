//! The coordinator of one job: launches agents and the MPI launcher, drives
//! checkpoint epochs, and answers `cryo checkpoint` / `preempt` / `status`.
//!
//! Threads: one accepts TCP connections (agents and `cryo` clients, each
//! checked against the job token), one per connection reads frames, and the
//! main thread owns every piece of state and runs the event loop, so the
//! epoch logic ([`crate::epoch`]) never needs a lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cryo_core::auth;
use cryo_core::protocol::{
    read_message, write_message, AgentToCoordinator, CoordinatorToAgent, EpochProgress, Hello,
    JobRequest, JobResponse, JobStatus, Message, NodeStatus, Peer, ENV_AGENT_SOCKET, ENV_JOB,
    ENV_TOKEN, PROTOCOL_VERSION,
};
use cryo_core::store::{JobStore, Store};
use cryo_core::token::JobToken;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;

use crate::epoch::{render_ranks, Epoch, Event as EpochEvent, Phase};
use crate::human;
use crate::launch::{self, LaunchBlock, Launcher, NodePlacement};
use crate::registry::{hostname, CoordinatorAddr, JobCommand, Registry};

/// Exit code of `cryo run` after a preemption whose checkpoint committed.
pub const EXIT_PREEMPTED: u8 = 75;
/// Exit code after a preemption whose checkpoint failed (the previous
/// committed epoch stands).
pub const EXIT_PREEMPTED_NO_CHECKPOINT: u8 = 76;

/// How to run a job.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store.
    pub store: PathBuf,
    /// The job name.
    pub job: String,
    /// World size.
    pub ranks: u32,
    /// Ranks per emulated node.
    pub placement: Vec<NodePlacement>,
    /// Periodic checkpoints.
    pub interval: Option<Duration>,
    /// Committed epochs to keep.
    pub keep: usize,
    /// The MPI launcher to use.
    pub launcher: Option<PathBuf>,
    /// Who starts the node agents.
    pub agents: AgentMode,
    /// Slurm: on SIGUSR1 or SIGTERM, checkpoint, stop and requeue the job.
    pub requeue: bool,
    /// The agent binary.
    pub agent_bin: Option<PathBuf>,
    /// Chunk size for the store.
    pub chunk_size: usize,
    /// Copy budget per agent (e.g. `2GiB`).
    pub copy_budget: Option<String>,
    /// How long an epoch may take before it is aborted.
    pub checkpoint_timeout: Duration,
    /// How long agents wait for ranks to park.
    pub park_timeout: Duration,
    /// Address to listen on.
    pub listen: String,
    /// Restart from this epoch.
    pub restart_from: Option<u64>,
    /// What to run.
    pub command: JobCommand,
    /// Node-local scratch (agent sockets and logs).
    pub scratch: PathBuf,
}

/// Who starts the node agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMode {
    /// `cryo run` starts one agent per `--nodes` entry on this machine
    /// (emulated nodes), each with its own socket.
    Spawn,
    /// One agent per node, started outside `cryo run`'s process from the
    /// `CRYO_*` variables the launcher carries, at the same node-local
    /// socket on every node. They dial the coordinator.
    External {
        /// The node-local socket path.
        socket: PathBuf,
        /// The host agents dial (default: this host's name).
        advertise: Option<String>,
        /// Who starts them.
        starter: AgentStarter,
    },
}

/// Who starts external agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStarter {
    /// Slurm's spank_cryo plugin, in each step `cryo run` launches (or an
    /// administrator, by hand).
    Plugin,
    /// `cryo run` itself, as a Slurm step of one agent per node of the
    /// allocation (`srun --overlap`): no plugin needed.
    SrunStep,
}

impl AgentStarter {
    /// Its name in `CRYO_AGENT_STARTER`, which tells the plugin whether a
    /// step's agents are its to start.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStarter::Plugin => "plugin",
            AgentStarter::SrunStep => "srun",
        }
    }
}

/// Where the agent of `job` listens on every node when agents are external:
/// node-local and per user, so jobs and users never share one.
pub fn node_local_socket(job: &str) -> PathBuf {
    PathBuf::from(format!(
        "/tmp/cryo-{}/{job}/agent.sock",
        nix::unistd::getuid()
    ))
}

pub use cryo_core::env::ENV_COORDINATOR;

static GOT_USR1: AtomicBool = AtomicBool::new(false);
static GOT_TERM: AtomicBool = AtomicBool::new(false);
static GOT_INT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: std::os::raw::c_int) {
    // Only atomic stores: async-signal-safe.
    match signal {
        libc_sig::USR1 => GOT_USR1.store(true, Ordering::Release),
        libc_sig::TERM => GOT_TERM.store(true, Ordering::Release),
        _ => GOT_INT.store(true, Ordering::Release),
    }
}

mod libc_sig {
    pub const USR1: i32 = nix::sys::signal::Signal::SIGUSR1 as i32;
    pub const TERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;
}

fn install_signal_handlers() -> Result<()> {
    for sig in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to atomics, which is
        // async-signal-safe, and it is installed before any thread that
        // could race with it starts.
        unsafe { signal::signal(sig, SigHandler::Handler(on_signal)) }
            .with_context(|| format!("installing the {sig} handler"))?;
    }
    Ok(())
}

enum Event {
    AgentConnected {
        node: String,
        writer: TcpStream,
    },
    Agent {
        node: String,
        msg: AgentToCoordinator,
    },
    AgentLost {
        node: String,
        why: String,
    },
    Request {
        request: JobRequest,
        reply: Sender<JobResponse>,
    },
}

/// Accepts connections and forwards what peers say to the event loop.
fn serve_connections(
    listener: TcpListener,
    job: String,
    world_size: u32,
    token: JobToken,
    expected: Option<BTreeSet<String>>,
    events: Sender<Event>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (job, token, expected, events) =
            (job.clone(), token.clone(), expected.clone(), events.clone());
        thread::spawn(move || serve_peer(stream, &job, world_size, &token, &expected, &events));
    }
}

fn refuse<M: Message>(stream: &TcpStream, msg: &M) {
    let _ = write_message(&mut &*stream, msg);
}

/// How long the coordinator waits for one write to an agent before it
/// takes that agent for lost.
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

fn serve_peer(
    stream: TcpStream,
    job: &str,
    world_size: u32,
    token: &JobToken,
    expected: &Option<BTreeSet<String>>,
    events: &Sender<Event>,
) {
    let peer_addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // The client proves it holds the token without sending it; the answer
    // is bound to this connection's nonce, so a recorded one is worthless.
    let greeting = match auth::accept(&stream, |s| {
        read_message::<Hello>(&mut &*s).map(|hello| (hello, ()))
    }) {
        Ok(greeting) => greeting,
        Err(auth::Rejected {
            role: None,
            source: cryo_core::protocol::FrameError::Closed,
        }) => {
            // A liveness probe (`cryo run` checking for a stale entry).
            tracing::debug!(job, peer = %peer_addr, "peer.closed_before_hello");
            return;
        }
        Err(err) => {
            tracing::warn!(job, peer = %peer_addr, error = %err, "peer.rejected");
            return;
        }
    };
    let auth::Greeting {
        hello,
        nonce,
        proof,
        ..
    } = greeting;
    let problem = if let Err(err) = hello.check_version() {
        Some(err.to_string())
    } else if hello.job != job {
        Some(format!(
            "this coordinator runs job {job:?}, not {:?}",
            hello.job
        ))
    } else if let Err(err) = auth::verify(token, &nonce, &hello, &proof) {
        Some(format!("wrong or missing job token: {err}"))
    } else {
        None
    };
    match hello.peer {
        Peer::Agent { node } => {
            let problem = problem.or_else(|| {
                expected
                    .as_ref()
                    .is_some_and(|nodes| !nodes.contains(&node))
                    .then(|| format!("node {node:?} is not part of this job"))
            });
            if let Some(reason) = problem {
                tracing::warn!(job, peer = %peer_addr, node = %node, reason = %reason, "peer.rejected");
                refuse(&stream, &CoordinatorToAgent::Refused { reason });
                return;
            }
            let welcome = CoordinatorToAgent::Welcome {
                job: job.to_owned(),
                world_size,
            };
            if write_message(&mut &stream, &welcome).is_err() {
                return;
            }
            let Ok(writer) = stream.try_clone() else {
                return;
            };
            // The event thread writes to every agent: one whose socket
            // stopped draining costs it a bounded wait, then counts as lost.
            let _ = writer.set_write_timeout(Some(AGENT_WRITE_TIMEOUT));
            if events
                .send(Event::AgentConnected {
                    node: node.clone(),
                    writer,
                })
                .is_err()
            {
                return;
            }
            let why = loop {
                match read_message::<AgentToCoordinator>(&mut &stream) {
                    Ok(msg) => {
                        if events
                            .send(Event::Agent {
                                node: node.clone(),
                                msg,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(err) if err.is_disconnect() => break "connection closed".to_owned(),
                    Err(err) => break format!("protocol error: {err}"),
                }
            };
            let _ = events.send(Event::AgentLost { node, why });
        }
        Peer::Control { client } => {
            if let Some(reason) = problem {
                tracing::warn!(job, peer = %peer_addr, client = %client, reason = %reason, "peer.rejected");
                refuse(&stream, &JobResponse::Refused { reason });
                return;
            }
            loop {
                let request = match read_message::<JobRequest>(&mut &stream) {
                    Ok(request) => request,
                    Err(err) if err.is_disconnect() => return,
                    Err(err) => {
                        tracing::warn!(job, peer = %peer_addr, client = %client, error = %err, "request.rejected");
                        return;
                    }
                };
                let (tx, rx) = mpsc::channel();
                if events.send(Event::Request { request, reply: tx }).is_err() {
                    return;
                }
                let Ok(response) = rx.recv() else { return };
                if write_message(&mut &stream, &response).is_err() {
                    return;
                }
            }
        }
        Peer::Rank { rank, .. } => {
            tracing::warn!(job, peer = %peer_addr, rank, "peer.rejected");
            refuse(
                &stream,
                &JobResponse::Refused {
                    reason: "ranks talk to their node agent, not the coordinator".into(),
                },
            );
        }
    }
}

/// Sends a request to a running job's coordinator and waits for the answer.
pub fn request(store: &Path, job: &str, request: JobRequest) -> Result<JobResponse> {
    let store = Store::open(store)?;
    let job_store = store.existing_job(job)?;
    let registry = Registry::of(&job_store);
    let addr = registry.coordinator(job)?;
    let token = registry.token()?;
    let stream = TcpStream::connect(&addr.addr).with_context(|| {
        format!(
            "connecting to job {job:?}'s coordinator at {} (pid {} on {})",
            addr.addr, addr.pid, addr.host
        )
    })?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: job.to_owned(),
        peer: Peer::Control {
            client: format!("cryo on {}", hostname()),
        },
    };
    write_message(&mut &stream, &hello)?;
    auth::answer(&mut &stream, &hello, Some(&token))
        .context("answering the coordinator's challenge")?;
    write_message(&mut &stream, &request)?;
    read_message::<JobResponse>(&mut &stream).context("reading the coordinator's answer")
}

struct AgentHandle {
    writer: Option<TcpStream>,
    ranks: BTreeSet<u32>,
    child: Option<Child>,
    log: PathBuf,
}

struct Waiter {
    reply: Sender<JobResponse>,
}

struct Coordinator {
    opts: RunOptions,
    job: JobStore,
    agents: BTreeMap<String, AgentHandle>,
    pids: BTreeMap<u32, u32>,
    epoch: Option<Epoch>,
    max_pause_us: u64,
    last_parked: Option<Instant>,
    waiters: Vec<Waiter>,
    last_attempted: u64,
    preempting: bool,
    preempt_result: Option<bool>,
    /// The Slurm step running this job's agents (`AgentStarter::SrunStep`).
    agent_step: Option<Child>,
}

fn agent_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("cryo-agent");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("cryo-agent")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Coordinator {
    fn send(&mut self, node: &str, msg: &CoordinatorToAgent) {
        if let Some(agent) = self.agents.get_mut(node) {
            if let Some(writer) = agent.writer.as_ref() {
                if let Err(err) = write_message(&mut &*writer, msg) {
                    // Its epoch part then misses its deadline and aborts.
                    tracing::warn!(job = %self.opts.job, node, error = %err, "agent.write_failed");
                    agent.writer = None;
                }
            }
        }
    }

    fn broadcast(&mut self, msg: &CoordinatorToAgent) {
        let nodes: Vec<String> = self.agents.keys().cloned().collect();
        for node in nodes {
            self.send(&node, msg);
        }
    }

    /// An agent said hello: a spawned one is expected, an external one
    /// joins the job (any node the launcher used).
    fn on_agent_connected(&mut self, node: String, writer: TcpStream) {
        let external = matches!(self.opts.agents, AgentMode::External { .. });
        match self.agents.get_mut(&node) {
            Some(agent) => {
                if external {
                    // A restarted agent on the same node: its ranks register
                    // with it again.
                    agent.ranks.clear();
                }
                agent.writer = Some(writer);
            }
            None if external => {
                tracing::info!(job = %self.opts.job, node = %node, "agent.joined");
                eprintln!("cryo: agent on node {node} joined");
                self.agents.insert(
                    node,
                    AgentHandle {
                        writer: Some(writer),
                        ranks: BTreeSet::new(),
                        child: None,
                        log: PathBuf::new(),
                    },
                );
            }
            None => {}
        }
    }

    fn registered(&self) -> usize {
        self.agents.values().map(|a| a.ranks.len()).sum()
    }

    fn next_epoch(&self) -> Result<u64> {
        let committed = self.job.latest_committed()?.unwrap_or(0);
        let partial = self
            .job
            .partial_epochs()?
            .iter()
            .map(|(e, _)| *e)
            .max()
            .unwrap_or(0);
        Ok(committed.max(partial).max(self.last_attempted) + 1)
    }

    fn start_checkpoint(&mut self, why: &str) -> Result<u64, String> {
        if let Some(epoch) = &self.epoch {
            return Err(format!(
                "checkpoint of epoch {} is still in progress",
                epoch.epoch
            ));
        }
        let registered = self.registered();
        if registered < self.opts.ranks as usize {
            return Err(format!(
                "only {registered} of {} ranks have registered with their agents yet",
                self.opts.ranks
            ));
        }
        if let Some(lost) = self
            .agents
            .iter()
            .find(|(_, a)| a.writer.is_none())
            .map(|(n, _)| n.clone())
        {
            return Err(format!("the agent on node {lost:?} is not connected"));
        }
        let epoch = self.next_epoch().map_err(|e| e.to_string())?;
        let _ = self.job.discard_pending(epoch);
        self.last_attempted = epoch;
        self.max_pause_us = 0;
        self.last_parked = None;
        self.epoch = Some(Epoch::new(
            epoch,
            self.opts.ranks,
            self.opts.checkpoint_timeout,
            Instant::now(),
        ));
        tracing::info!(job = %self.opts.job, epoch, why, "checkpoint.requested");
        eprintln!("cryo: checkpoint of epoch {epoch} requested ({why})");
        let park_timeout_ms = u64::try_from(self.opts.park_timeout.as_millis()).unwrap_or(u64::MAX);
        self.broadcast(&CoordinatorToAgent::Checkpoint {
            epoch,
            park_timeout_ms,
        });
        Ok(epoch)
    }

    fn on_agent_message(&mut self, node: &str, msg: AgentToCoordinator) {
        let now = Instant::now();
        match msg {
            AgentToCoordinator::RankRegistered {
                rank,
                pid,
                restored_epoch,
            } => {
                if let Some(agent) = self.agents.get_mut(node) {
                    agent.ranks.insert(rank);
                }
                self.pids.insert(rank, pid);
                tracing::info!(job = %self.opts.job, node, rank, pid, restored_epoch, "rank.registered");
            }
            AgentToCoordinator::RankLeft { rank, why } => {
                if let Some(agent) = self.agents.get_mut(node) {
                    agent.ranks.remove(&rank);
                }
                if let Some(epoch) = self.epoch.as_mut() {
                    if epoch.phase == Phase::Quiescing && !epoch.copied.contains_key(&rank) {
                        epoch.apply(
                            EpochEvent::Failed {
                                who: format!("rank {rank} on {node}"),
                                reason: format!("left the job ({why})"),
                            },
                            now,
                        );
                    }
                }
            }
            AgentToCoordinator::Copied {
                epoch,
                rank,
                bytes,
                pause_us,
            } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    self.max_pause_us = self.max_pause_us.max(pause_us);
                    let parked = now
                        .checked_sub(Duration::from_micros(pause_us))
                        .unwrap_or(now);
                    self.last_parked = Some(self.last_parked.map_or(parked, |t| t.max(parked)));
                    current.apply(EpochEvent::Copied { rank, bytes }, now);
                    tracing::info!(job = %self.opts.job, node, rank, epoch, pause_us, "rank.resumed");
                }
            }
            AgentToCoordinator::Durable {
                epoch,
                rank,
                written,
            } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    current.apply(EpochEvent::Durable { rank, written }, now);
                }
            }
            AgentToCoordinator::Failed { epoch, reason } => {
                if let Some(current) = self.epoch.as_mut().filter(|e| e.epoch == epoch) {
                    current.apply(
                        EpochEvent::Failed {
                            who: format!("agent on {node}"),
                            reason,
                        },
                        now,
                    );
                }
            }
        }
        self.progress();
    }

    fn on_agent_lost(&mut self, node: &str, why: &str) {
        if self.epoch.is_some() {
            tracing::error!(job = %self.opts.job, node, why, "agent.lost");
        } else {
            // Between checkpoints it matters only for the next one, and at
            // the end of a Slurm step it is expected.
            tracing::warn!(job = %self.opts.job, node, why, "agent.lost");
        }
        eprintln!("cryo: lost the agent on node {node} ({why})");
        if let Some(agent) = self.agents.get_mut(node) {
            agent.writer = None;
        }
        if let Some(epoch) = self.epoch.as_mut() {
            epoch.apply(
                EpochEvent::AgentLost {
                    node: node.to_owned(),
                },
                Instant::now(),
            );
        }
        self.progress();
    }

    /// Moves the epoch forward: commit when every rank is durable, report
    /// when it is over.
    fn progress(&mut self) {
        let Some(mut epoch) = self.epoch.take() else {
            return;
        };
        epoch.tick(Instant::now());
        if epoch.phase == Phase::Committing {
            cryo_core::fault::pause_at(
                cryo_core::fault::Phase::Commit,
                epoch.epoch,
                &self.opts.job,
            );
            let result = self
                .job
                .commit_epoch(
                    epoch.epoch,
                    self.opts.ranks,
                    u32::try_from(self.opts.chunk_size).unwrap_or(u32::MAX),
                )
                .map(|manifest| {
                    // Said when the checkpoint is taken, not found at restart.
                    for warning in crate::holdings::warnings(&manifest) {
                        tracing::warn!(job = %self.opts.job, epoch = epoch.epoch, warning = %warning, "epoch.not_restorable");
                        eprintln!("cryo: epoch {}: {warning}", epoch.epoch);
                    }
                })
                .map_err(|e| e.to_string());
            epoch.committed(result);
        }
        match &epoch.phase {
            Phase::Committed => {
                let elapsed = epoch.started.elapsed();
                let pause = epoch
                    .all_copied_at
                    .map(|t| t - epoch.started)
                    .unwrap_or_default();
                eprintln!(
                    "cryo: epoch {} committed: {} ranks, {} copied ({} in {:.3} s to all ranks resumed, longest rank pause {:.1} ms), {} written, {:.2} s in all",
                    epoch.epoch,
                    epoch.world_size,
                    human::bytes(epoch.bytes_copied()),
                    human::rate(epoch.bytes_copied(), pause.as_secs_f64()),
                    pause.as_secs_f64(),
                    self.max_pause_us as f64 / 1000.0,
                    human::bytes(epoch.bytes_written()),
                    elapsed.as_secs_f64()
                );
                self.broadcast(&CoordinatorToAgent::Committed { epoch: epoch.epoch });
                let response = JobResponse::Committed {
                    epoch: epoch.epoch,
                    max_pause_us: self.max_pause_us,
                    quiesce_us: self.last_parked.map_or(0, |t| {
                        u64::try_from(t.saturating_duration_since(epoch.started).as_micros())
                            .unwrap_or(u64::MAX)
                    }),
                    bytes: epoch.bytes_copied(),
                    written: epoch.bytes_written(),
                    elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                };
                for waiter in self.waiters.drain(..) {
                    let _ = waiter.reply.send(response.clone());
                }
                if self.preempting {
                    self.preempt_result = Some(true);
                }
                let (job, keep) = (self.job.clone(), self.opts.keep);
                thread::spawn(move || {
                    if let Err(err) = job.gc(Some(keep)) {
                        tracing::warn!(job = %job.name(), error = %err, "gc.failed");
                    }
                });
            }
            Phase::Aborted(reason) => {
                let reason = reason.clone();
                tracing::warn!(job = %self.opts.job, epoch = epoch.epoch, reason = %reason, "epoch.aborted");
                eprintln!(
                    "cryo: epoch {} aborted: {reason}; the previous committed epoch stands",
                    epoch.epoch
                );
                self.broadcast(&CoordinatorToAgent::Abort {
                    epoch: epoch.epoch,
                    reason: reason.clone(),
                });
                let _ = self.job.discard_pending(epoch.epoch);
                let response = JobResponse::Aborted {
                    epoch: epoch.epoch,
                    reason,
                };
                for waiter in self.waiters.drain(..) {
                    let _ = waiter.reply.send(response.clone());
                }
                if self.preempting {
                    self.preempt_result = Some(false);
                }
            }
            _ => self.epoch = Some(epoch),
        }
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            job: self.opts.job.clone(),
            world_size: self.opts.ranks,
            nodes: self
                .agents
                .iter()
                .map(|(node, agent)| NodeStatus {
                    node: node.clone(),
                    ranks: agent.ranks.iter().copied().collect(),
                    connected: agent.writer.is_some(),
                })
                .collect(),
            last_committed: self.job.latest_committed().ok().flatten(),
            in_progress: self.epoch.as_ref().map(|e| EpochProgress {
                epoch: e.epoch,
                phase: match e.phase {
                    Phase::Quiescing => "quiescing and copying".into(),
                    Phase::Draining => "draining to the store".into(),
                    Phase::Committing => "committing".into(),
                    Phase::Committed => "committed".into(),
                    Phase::Aborted(_) => "aborted".into(),
                },
                ranks_copied: u32::try_from(e.copied.len()).unwrap_or(u32::MAX),
                ranks_durable: u32::try_from(e.durable.len()).unwrap_or(u32::MAX),
                bytes_copied: e.bytes_copied(),
                bytes_written: e.bytes_written(),
                elapsed_ms: u64::try_from(e.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            restarted_from: self.opts.restart_from,
        }
    }

    fn on_request(&mut self, request: JobRequest, reply: Sender<JobResponse>) {
        match request {
            JobRequest::Status => {
                let _ = reply.send(JobResponse::Status(self.status()));
            }
            JobRequest::Checkpoint | JobRequest::Preempt => {
                let preempt = request == JobRequest::Preempt;
                let why = if preempt {
                    "cryo preempt"
                } else {
                    "cryo checkpoint"
                };
                match self.start_checkpoint(why) {
                    Ok(_) => self.waiters.push(Waiter { reply }),
                    Err(reason) if preempt && self.epoch.is_some() => {
                        // Preempt during a checkpoint: stop once it is over.
                        tracing::info!(job = %self.opts.job, reason = %reason, "preempt.after_current_epoch");
                        self.waiters.push(Waiter { reply });
                    }
                    Err(reason) => {
                        let _ = reply.send(JobResponse::Refused {
                            reason: reason.clone(),
                        });
                        if preempt {
                            eprintln!("cryo: preempting without a new checkpoint: {reason}");
                            self.preempt_result = Some(false);
                        }
                    }
                }
                if preempt {
                    self.preempting = true;
                }
            }
        }
    }

    fn shutdown_agents(&mut self) {
        self.broadcast(&CoordinatorToAgent::Shutdown);
        if let Some(mut step) = self.agent_step.take() {
            // The agents exit on Shutdown, which ends their step.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(step.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            stop_process_group(&mut step, Duration::from_secs(5));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for agent in self.agents.values_mut() {
            if let Some(child) = agent.child.as_mut() {
                while Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn stop_process_group(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    let _ = signal::killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let _ = signal::killpg(pgid, Signal::SIGKILL);
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = signal::killpg(pgid, Signal::SIGKILL);
    child.wait().ok()
}

fn exit_code_of(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        _ => ExitCode::FAILURE,
    }
}

/// Runs (or restarts) a job to completion.
pub fn run(opts: RunOptions) -> Result<ExitCode> {
    install_signal_handlers()?;
    let store = Store::create(&opts.store)?;
    let job = store.job(&opts.job)?;
    job.ensure_layout()?;
    let registry = Registry::of(&job);
    if let Ok(existing) = registry.coordinator(&opts.job) {
        bail!(
            "job {:?} is already running (coordinator pid {} on {})",
            opts.job,
            existing.pid,
            existing.host
        );
    }
    let token = registry.create_token()?;
    registry.write_command(&opts.command)?;
    let launcher = launch::detect(opts.launcher.as_deref())?;

    let listener =
        TcpListener::bind(&opts.listen).with_context(|| format!("listening on {}", opts.listen))?;
    let bound = listener.local_addr()?;
    // Peers on other nodes need a name they can resolve, not 0.0.0.0.
    let addr = match &opts.agents {
        AgentMode::External { advertise, .. } if bound.ip().is_unspecified() => format!(
            "{}:{}",
            advertise.clone().unwrap_or_else(hostname),
            bound.port()
        ),
        _ => bound.to_string(),
    };
    registry.write_coordinator(&CoordinatorAddr {
        addr: addr.clone(),
        pid: std::process::id(),
        host: hostname(),
    })?;
    let (tx, rx) = mpsc::channel();
    let nodes: Option<BTreeSet<String>> = match opts.agents {
        AgentMode::Spawn => Some(opts.placement.iter().map(|p| p.node.clone()).collect()),
        AgentMode::External { .. } => None,
    };
    {
        let (job, world, token, nodes, tx) = (
            opts.job.clone(),
            opts.ranks,
            token.clone(),
            nodes.clone(),
            tx.clone(),
        );
        thread::spawn(move || serve_connections(listener, job, world, token, nodes, tx));
    }
    let summary: Vec<String> = match &opts.agents {
        AgentMode::Spawn => opts
            .placement
            .iter()
            .map(|p| {
                format!(
                    "{} ranks {}",
                    p.node,
                    render_ranks(&p.ranks.clone().collect())
                )
            })
            .collect(),
        AgentMode::External { socket, .. } => vec![format!(
            "the launcher's nodes, agents at {}",
            socket.display()
        )],
    };
    eprintln!(
        "cryo: job {} ({} ranks on {}) with {launcher}; store {}; coordinator {addr}{}",
        opts.job,
        opts.ranks,
        summary.join(", "),
        opts.store.display(),
        opts.restart_from
            .map(|e| format!("; restarting from epoch {e}"))
            .unwrap_or_default()
    );

    let mut coordinator = Coordinator {
        job: job.clone(),
        agents: BTreeMap::new(),
        pids: BTreeMap::new(),
        epoch: None,
        max_pause_us: 0,
        last_parked: None,
        waiters: Vec::new(),
        last_attempted: 0,
        preempting: false,
        preempt_result: None,
        agent_step: None,
        opts: opts.clone(),
    };
    let result = drive(&mut coordinator, &launcher, &addr, &token, &rx);
    coordinator.shutdown_agents();
    registry.clear_coordinator();
    drop(tx);
    if coordinator.opts.requeue && coordinator.preempting {
        requeue_slurm_job();
    }
    result
}

/// Puts this Slurm job back in the queue after a preemption checkpoint;
/// when it starts again, `cryo run` resumes from the newest checkpoint.
fn requeue_slurm_job() {
    let Ok(id) = std::env::var("SLURM_JOB_ID") else {
        eprintln!("cryo: --requeue: not inside a Slurm job (no SLURM_JOB_ID); not requeued");
        return;
    };
    eprintln!("cryo: requeueing Slurm job {id}");
    match Command::new("scontrol").arg("requeue").arg(&id).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("pending") => {
            eprintln!("cryo: Slurm job {id} is already back in the queue");
        }
        Ok(out) => eprintln!(
            "cryo: scontrol requeue {id} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => eprintln!("cryo: cannot run scontrol requeue {id}: {err}"),
    }
}

fn spawn_agent(
    opts: &RunOptions,
    node: &str,
    coordinator: &str,
    token_file: &Path,
) -> Result<(Child, PathBuf, PathBuf)> {
    let dir = opts.scratch.join(node);
    // Private: the agent's socket and log are the job's user's alone.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("agent.sock");
    let log = dir.join("agent.log");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new(agent_binary(opts.agent_bin.as_deref()));
    command
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--store")
        .arg(&opts.store)
        .arg("--job")
        .arg(&opts.job)
        .arg("--node")
        .arg(node)
        .arg("--coordinator")
        .arg(coordinator)
        .arg("--token-file")
        .arg(token_file)
        .arg("--chunk-size")
        .arg(opts.chunk_size.to_string())
        .arg("--park-timeout")
        .arg(opts.park_timeout.as_secs().max(1).to_string())
        .arg("--log-format")
        .arg("json");
    if let Some(budget) = &opts.copy_budget {
        command.arg("--copy-budget").arg(budget);
    }
    if let Some(epoch) = opts.restart_from {
        command.arg("--restart-from").arg(epoch.to_string());
    }
    let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Settings meant for external agents must not leak into these.
        .env_remove(cryo_core::env::ENV_RESTART_FROM)
        .env_remove("CRYO_COPY_BUDGET")
        .env_remove(cryo_core::env::ENV_NODE)
        .env(
            "CRYO_LOG",
            std::env::var("CRYO_LOG").unwrap_or_else(|_| "info".into()),
        );
    let child = command.spawn().with_context(|| {
        format!(
            "starting the agent for node {node} ({})",
            agent_binary(opts.agent_bin.as_deref()).display()
        )
    })?;
    Ok((child, socket, log))
}

/// How long `cryo run` waits for a first external agent before it warns.
const NO_AGENT_WARNING: Duration = Duration::from_secs(60);

/// What external agents need to start: `cryo-agent serve` reads every
/// setting from these variables, which the launcher carries to each node
/// and Slurm's plugin finds in the step's environment.
fn external_agent_env(opts: &RunOptions, socket: &Path, addr: &str) -> Vec<(String, String)> {
    let store = std::path::absolute(&opts.store).unwrap_or_else(|_| opts.store.clone());
    let mut env = vec![
        (ENV_COORDINATOR.to_owned(), addr.to_owned()),
        (
            ENV_AGENT_SOCKET.to_owned(),
            socket.to_string_lossy().into_owned(),
        ),
        (
            "CRYO_STORE".to_owned(),
            store.to_string_lossy().into_owned(),
        ),
        ("CRYO_CHUNK_SIZE".to_owned(), opts.chunk_size.to_string()),
        (
            "CRYO_PARK_TIMEOUT".to_owned(),
            opts.park_timeout.as_secs_f64().to_string(),
        ),
        (
            cryo_core::env::ENV_AGENT_BIN.to_owned(),
            agent_binary(opts.agent_bin.as_deref())
                .to_string_lossy()
                .into_owned(),
        ),
    ];
    if let Some(budget) = &opts.copy_budget {
        env.push(("CRYO_COPY_BUDGET".to_owned(), budget.clone()));
    }
    if let Some(epoch) = opts.restart_from {
        env.push((
            cryo_core::env::ENV_RESTART_FROM.to_owned(),
            epoch.to_string(),
        ));
    }
    env
}

/// Starts one agent per emulated node and waits until each has said hello;
/// returns the launcher blocks that point each node's ranks at its agent.
fn spawn_agents_and_wait(
    c: &mut Coordinator,
    addr: &str,
    rx: &Receiver<Event>,
) -> Result<Vec<LaunchBlock>> {
    let token_file = Registry::of(&c.job).token_path();
    let mut sockets = BTreeMap::new();
    for placement in c.opts.placement.clone() {
        let (child, socket, log) = spawn_agent(&c.opts, &placement.node, addr, &token_file)?;
        sockets.insert(placement.node.clone(), socket);
        c.agents.insert(
            placement.node.clone(),
            AgentHandle {
                writer: None,
                ranks: BTreeSet::new(),
                child: Some(child),
                log,
            },
        );
    }
    let expected = c.agents.len();
    wait_for_agents(c, rx, expected, None)?;
    // Launch the job: one MPMD block per node, each naming its agent.
    Ok(c.opts
        .placement
        .iter()
        .map(|p| LaunchBlock {
            ranks: p.ranks.end - p.ranks.start,
            env: vec![(
                ENV_AGENT_SOCKET.to_owned(),
                sockets[&p.node].to_string_lossy().into_owned(),
            )],
        })
        .collect())
}

/// Waits until `expected` agents have said hello, failing early when one of
/// the processes that should run them exits first.
fn wait_for_agents(
    c: &mut Coordinator,
    rx: &Receiver<Event>,
    expected: usize,
    step_log: Option<&Path>,
) -> Result<()> {
    let timeout = Duration::from_secs(60);
    let deadline = Instant::now() + timeout;
    while c.agents.values().filter(|a| a.writer.is_some()).count() < expected {
        for (node, agent) in &mut c.agents {
            if let Some(child) = agent.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "the agent for node {node} exited ({status}) before connecting:\n{}",
                        tail(&agent.log, 15)
                    );
                }
            }
        }
        if let (Some(step), Some(log)) = (c.agent_step.as_mut(), step_log) {
            if let Ok(Some(status)) = step.try_wait() {
                bail!(
                    "the agents' Slurm step ended ({status}) before every agent connected:\n{}",
                    tail(log, 15)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {expected} agents connected within {} s",
                c.agents.values().filter(|a| a.writer.is_some()).count(),
                timeout.as_secs()
            );
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::AgentConnected { node, writer }) => c.on_agent_connected(node, writer),
            Ok(Event::AgentLost { node, why }) => {
                bail!("the agent on node {node} disconnected while starting ({why})")
            }
            Ok(Event::Agent { node, msg }) => c.on_agent_message(&node, msg),
            Ok(Event::Request { reply, .. }) => {
                let _ = reply.send(JobResponse::Refused {
                    reason: "the job is still starting".into(),
                });
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("the coordinator's listener stopped"),
        }
    }
    Ok(())
}

/// Starts one agent on every node of the Slurm allocation as a step of its
/// own (`srun --overlap`, so it takes no CPUs from the ranks' step), and
/// waits for all of them to say hello.
fn start_agent_step(
    c: &mut Coordinator,
    rx: &Receiver<Event>,
    env: &[(String, String)],
    token: &JobToken,
) -> Result<()> {
    let nodes: usize = ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .context("--agents srun needs a Slurm allocation (no SLURM_JOB_NUM_NODES)")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&c.opts.scratch)
        .with_context(|| format!("creating {}", c.opts.scratch.display()))?;
    let log = c.opts.scratch.join("agents-step.log");
    let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new("srun");
    command
        .arg("--overlap")
        .arg(format!("--nodes={nodes}"))
        .arg(format!("--ntasks={nodes}"))
        .arg("--ntasks-per-node=1")
        .arg("--kill-on-bad-exit=0")
        .arg("--mpi=none")
        .arg("--job-name=cryo-agents")
        .arg(agent_binary(c.opts.agent_bin.as_deref()))
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(ENV_JOB, &c.opts.job)
        .env(ENV_TOKEN, token.expose())
        .env(
            "CRYO_LOG",
            std::env::var("CRYO_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    let step = command
        .spawn()
        .context("starting the agents' Slurm step (srun)")?;
    eprintln!(
        "cryo: starting {nodes} agent(s) as Slurm step (srun pid {})",
        step.id()
    );
    c.agent_step = Some(step);
    wait_for_agents(c, rx, nodes, Some(&log))
}

fn drive(
    c: &mut Coordinator,
    launcher: &Launcher,
    addr: &str,
    token: &JobToken,
    rx: &Receiver<Event>,
) -> Result<ExitCode> {
    let blocks = match c.opts.agents.clone() {
        AgentMode::Spawn => spawn_agents_and_wait(c, addr, rx)?,
        AgentMode::External {
            socket, starter, ..
        } => {
            let mut env = external_agent_env(&c.opts, &socket, addr);
            env.push((
                cryo_core::env::ENV_AGENT_STARTER.to_owned(),
                starter.as_str().to_owned(),
            ));
            if starter == AgentStarter::SrunStep {
                start_agent_step(c, rx, &env, token)?;
            }
            vec![LaunchBlock {
                ranks: c.opts.ranks,
                env,
            }]
        }
    };
    let mut command = launch::build_command(
        launcher,
        &blocks,
        &c.opts.command.program(),
        &c.opts.command.args(),
    );
    command
        .current_dir(c.opts.command.cwd())
        .env(ENV_JOB, &c.opts.job)
        .env(ENV_TOKEN, token.expose())
        .process_group(0);
    let mut job_child = command
        .spawn()
        .with_context(|| format!("starting {launcher}"))?;
    tracing::info!(job = %c.opts.job, pid = job_child.id(), "job.started");
    let started = Instant::now();
    let mut warned_no_agents = false;

    let mut next_interval = c.opts.interval.map(|i| Instant::now() + i);
    let exit = loop {
        if !warned_no_agents && c.agents.is_empty() && started.elapsed() > NO_AGENT_WARNING {
            warned_no_agents = true;
            eprintln!(
                "cryo: WARNING: no node agent has connected after {} s, so this job cannot be checkpointed. With --agents external, something must start them: under Slurm, spank_cryo.so in plugstack.conf with the job submitted with --cryo, or use --agents srun (see README).",
                NO_AGENT_WARNING.as_secs()
            );
        }
        if let Ok(Some(status)) = job_child.try_wait() {
            if let Some(epoch) = c.epoch.as_mut() {
                epoch.apply(
                    EpochEvent::Failed {
                        who: "the job".into(),
                        reason: format!("ended ({status}) during the checkpoint"),
                    },
                    Instant::now(),
                );
                c.progress();
            }
            if c.preempting {
                break preempt_exit(c);
            }
            eprintln!("cryo: job {} finished ({status})", c.opts.job);
            if c.pids.len() < c.opts.ranks as usize {
                eprintln!(
                    "cryo: WARNING: only {} of {} ranks ever registered with a cryo agent, so the job could not be checkpointed (is the program linked with the cryo runtime, and did its agents start?)",
                    c.pids.len(),
                    c.opts.ranks
                );
            }
            break exit_code_of(status);
        }
        if GOT_INT.swap(false, Ordering::AcqRel) {
            eprintln!("cryo: interrupted; stopping the job without a checkpoint");
            stop_process_group(&mut job_child, Duration::from_secs(5));
            break ExitCode::from(130);
        }
        let mut preempt_signal = None;
        if GOT_USR1.swap(false, Ordering::AcqRel) {
            if c.opts.requeue {
                // Slurm's warning before the time limit or a preemption.
                preempt_signal = Some("SIGUSR1: checkpoint and requeue");
            } else if let Err(reason) = c.start_checkpoint("SIGUSR1") {
                eprintln!("cryo: SIGUSR1: no checkpoint: {reason}");
            }
        }
        if GOT_TERM.swap(false, Ordering::AcqRel) {
            preempt_signal = Some(if c.opts.requeue {
                "SIGTERM: checkpoint and requeue"
            } else {
                "SIGTERM: preempt"
            });
        }
        if let Some(why) = preempt_signal.filter(|_| !c.preempting) {
            c.preempting = true;
            if let Err(reason) = c.start_checkpoint(why) {
                if c.epoch.is_none() {
                    eprintln!("cryo: SIGTERM: stopping without a new checkpoint: {reason}");
                    c.preempt_result = Some(false);
                }
            }
        }
        if let (Some(at), Some(interval)) = (next_interval, c.opts.interval) {
            if Instant::now() >= at {
                next_interval = Some(Instant::now() + interval);
                if c.epoch.is_none() {
                    if let Err(reason) = c.start_checkpoint("interval") {
                        tracing::info!(job = %c.opts.job, reason = %reason, "interval.skipped");
                    }
                }
            }
        }
        if c.preempting && c.epoch.is_none() && c.preempt_result.is_some() {
            stop_process_group(&mut job_child, Duration::from_secs(10));
            break preempt_exit(c);
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::AgentConnected { node, writer }) => c.on_agent_connected(node, writer),
            Ok(Event::Agent { node, msg }) => c.on_agent_message(&node, msg),
            Ok(Event::AgentLost { node, why }) => c.on_agent_lost(&node, &why),
            Ok(Event::Request { request, reply }) => c.on_request(request, reply),
            Err(RecvTimeoutError::Timeout) => c.progress(),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(anyhow!("the coordinator's listener stopped"))
            }
        }
    };
    Ok(exit)
}

fn preempt_exit(c: &Coordinator) -> ExitCode {
    let committed = c.job.latest_committed().ok().flatten();
    match c.preempt_result {
        Some(true) => {
            eprintln!(
                "cryo: job {} preempted after committing epoch {}",
                c.opts.job,
                committed.unwrap_or(0)
            );
            ExitCode::from(EXIT_PREEMPTED)
        }
        _ => {
            eprintln!(
                "cryo: job {} preempted; its checkpoint did not complete, so a restart uses {}",
                c.opts.job,
                committed.map_or("no epoch (none is committed)".to_owned(), |e| format!(
                    "epoch {e}"
                ))
            );
            ExitCode::from(EXIT_PREEMPTED_NO_CHECKPOINT)
        }
    }
}

/// Picks the newest committed epoch (at most `at_most`) that verifies,
/// warning about each newer one that does not.
pub fn choose_restart_epoch(job: &JobStore, at_most: Option<u64>) -> Result<u64> {
    let mut epochs = job.committed_epochs()?;
    epochs.retain(|e| at_most.is_none_or(|max| *e <= max));
    if let Some(max) = at_most {
        if !epochs.contains(&max) {
            bail!("job {:?} has no committed epoch {max}", job.name());
        }
    }
    for epoch in epochs.iter().rev() {
        match job.load_manifest(*epoch) {
            Ok(manifest) => {
                let report = job.verify_manifest(&manifest);
                if report.is_ok() {
                    return Ok(*epoch);
                }
                let first = &report.bad[0];
                eprintln!(
                    "cryo: warning: epoch {epoch} fails verification ({} bad chunk uses; first: rank {} region {:?}: {}); falling back to an older epoch",
                    report.bad.len(),
                    first.rank,
                    first.region,
                    first.problem
                );
            }
            Err(err) => eprintln!("cryo: warning: epoch {epoch} is unreadable ({err}); falling back to an older epoch"),
        }
    }
    bail!(
        "job {:?} has no committed epoch that passes verification",
        job.name()
    )
}
