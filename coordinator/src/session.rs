//! The coordinator of one job: launches agents and the MPI launcher, drives
//! checkpoint epochs, and answers `cryo checkpoint` / `preempt` / `status`.
//!
//! Threads: one accepts TCP connections (agents and `cryo` clients, each
//! checked against the job token), one per connection reads frames, and the
//! main thread owns every piece of state and runs the event loop, so the
//! epoch logic ([`crate::epoch`]) never needs a lock.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, ExitStatus};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cryo_core::protocol::{AbortReason, ENV_JOB, ENV_TOKEN};
use cryo_core::store::Store;
use cryo_core::token::JobToken;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

pub use crate::job_client::request;

use crate::agents::{
    external_agent_env, spawn_agents_and_wait, start_agent_step, NO_AGENT_WARNING,
};
use crate::epoch::Event as EpochEvent;
use crate::export;
use crate::launch::{self, LaunchBlock, Launcher, NodePlacement};
use crate::peers::{serve_connections, Event};
use crate::registry::{hostname, CoordinatorAddr, JobCommand, Registry};
pub use crate::restart_epoch::choose_restart_epoch;
use crate::running::Coordinator;
use crate::signals::{install_signal_handlers, GOT_INT, GOT_TERM, GOT_USR1};

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
    /// Ranks per real host that the launcher reaches (`--hosts`); empty:
    /// the launcher's own hosts.
    pub hosts: Vec<NodePlacement>,
    /// Periodic checkpoints.
    pub interval: Option<Duration>,
    /// Committed epochs to keep.
    pub keep: usize,
    /// The MPI launcher to use.
    pub launcher: Option<PathBuf>,
    /// Who starts the node agents.
    pub agents: AgentMode,
    /// Slurm: on SIGUSR1 (or `cryo preempt`), checkpoint, stop and
    /// requeue the job; on SIGTERM (`scancel`), checkpoint and stop.
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
    /// How long a preemption waits for an agent that lost its link.
    pub rejoin_wait: Duration,
    /// Address to listen on.
    pub listen: String,
    /// Restart from this epoch.
    pub restart_from: Option<u64>,
    /// What to run.
    pub command: JobCommand,
    /// Node-local scratch (agent sockets and logs).
    pub scratch: PathBuf,
    /// How long the launcher may run on after every rank said goodbye
    /// (`cryo_finalize`) before it is stopped; `None`: as long as it runs.
    pub finalize_timeout: Option<Duration>,
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
    /// `cryo run` itself, as an MPI launcher job of one agent per host of
    /// `--hosts` (Hydra over ssh, Open MPI's rsh agent).
    LauncherStep,
}

impl AgentStarter {
    /// Its name in `CRYO_AGENT_STARTER`, which tells the plugin whether a
    /// step's agents are its to start.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStarter::Plugin => "plugin",
            AgentStarter::SrunStep => "srun",
            AgentStarter::LauncherStep => "launcher",
        }
    }
}

pub use crate::agent_paths::{default_scratch, node_local_socket};
pub use cryo_core::env::ENV_COORDINATOR;

/// Makes the process `command` starts get SIGTERM when the thread that
/// starts it (`cryo run`'s main thread) ends, however it ends: a launcher
/// or agent whose coordinator was killed (`kill -9`, the OOM killer) would
/// otherwise run the job on unseen, and a restart would start a second
/// copy of it beside them.
pub(crate) fn ends_with_us(command: &mut std::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (prctl, getppid, raise).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // The parent may have died before the prctl.
            if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                let _ = signal::raise(Signal::SIGTERM);
            }
            Ok(())
        })
    };
}

pub(crate) fn stop_process_group(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
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

/// Kills a launcher and everything in its process group at once, without
/// the grace period that lets it write about the kill.
pub(crate) fn kill_process_group(child: &mut Child) -> Option<ExitStatus> {
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
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

/// Refuses to start `job` while a coordinator of it runs.
pub fn refuse_if_running(registry: &Registry, job: &str) -> Result<()> {
    if let Ok(existing) = registry.coordinator(job) {
        bail!(
            "job {job:?} is already running (coordinator pid {} on {})",
            existing.pid,
            existing.host
        );
    }
    Ok(())
}

/// Runs (or restarts) a job to completion.
pub fn run(opts: RunOptions) -> Result<ExitCode> {
    install_signal_handlers()?;
    crate::strays::adopt_orphans();
    let store = Store::create(&opts.store)?;
    let job = store.prepared_job(&opts.job)?;
    let registry = Registry::of(&job);
    // Held until this run returns, past its coordinator's entry.
    let _run_lock = registry.lock_run(&opts.job)?;
    refuse_if_running(&registry, &opts.job)?;
    let token = registry.create_token()?;
    let mut command = opts.command.clone();
    command.fresh_after = match opts.restart_from {
        // From the beginning: what the job has committed so far is not
        // this run's to resume.
        None => job.latest_committed()?,
        // A restart carries on the lineage of the run it restarts, as far
        // as the epoch it restarts from.
        Some(epoch) => (registry.command().ok())
            .and_then(|previous| previous.fresh_after)
            .filter(|after| *after < epoch),
    };
    registry.write_command(&command)?;
    registry.set_finished(false);
    let launcher = launch::detect(opts.launcher.as_deref(), || {
        let program_mpi = crate::program_mpi::of_program(
            OsStr::from_bytes(&opts.command.program),
            Path::new(OsStr::from_bytes(&opts.command.cwd)),
        );
        tracing::debug!(job = %opts.job, program_mpi = ?program_mpi, "launch.program_mpi");
        program_mpi
    })?;

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
        requeues: opts.requeue.then(crate::requeue::this_slurm_job).flatten(),
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
                    "{} {}",
                    p.node,
                    crate::human::rank_range(&p.ranks.clone().collect::<Vec<_>>())
                )
            })
            .collect(),
        AgentMode::External { socket, .. } if opts.hosts.is_empty() => vec![format!(
            "the launcher's nodes, agents at {}",
            socket.display()
        )],
        AgentMode::External { socket, .. } => vec![format!(
            "hosts {}, agents at {}",
            opts.hosts
                .iter()
                .map(|h| format!(
                    "{} {}",
                    h.node,
                    crate::human::rank_range(&h.ranks.clone().collect::<Vec<_>>())
                ))
                .collect::<Vec<_>>()
                .join(", "),
            socket.display()
        )],
    };
    cryo_core::say!(
        "cryo: job {} ({} rank{} on {}) with {launcher}; store {}; coordinator {addr}{}",
        opts.job,
        opts.ranks,
        if opts.ranks == 1 { "" } else { "s" },
        summary.join(", "),
        opts.store.display(),
        opts.restart_from
            .map(|e| format!("; restarting from epoch {e}"))
            .unwrap_or_default()
    );

    let mut coordinator = Coordinator::new(opts.clone(), job.clone(), tx.clone());
    let result = drive(&mut coordinator, &launcher, &addr, &token, &rx);
    coordinator.shutdown_agents();
    let left_behind = crate::strays::stop_left_behind();
    if !left_behind.is_empty() {
        tracing::info!(job = %coordinator.opts.job, count = left_behind.len(), "job.left_behind");
        cryo_core::say!(
            "cryo: stopped what the job's launcher left running after it ended ({}): {}",
            if left_behind.len() == 1 {
                "1 process".to_string()
            } else {
                format!("{} processes", left_behind.len())
            },
            crate::strays::describe(&left_behind)
        );
    }
    registry.clear_coordinator();
    drop(tx);
    if coordinator.opts.requeue && coordinator.preempting && coordinator.requeue_on_stop {
        crate::requeue::requeue_slurm_job(&coordinator.opts.job);
    }
    // The agents' sockets and logs of a run that went well (finished, or
    // preempted with its checkpoint committed) are clutter; a failed run's
    // logs stay for whoever looks into it.
    let made_here = coordinator.opts.scratch == default_scratch(&coordinator.opts.job);
    let went_well = match &result {
        Ok(code) => *code == ExitCode::SUCCESS || coordinator.preempt_result == Some(true),
        Err(_) => false,
    };
    if made_here && went_well {
        let _ = std::fs::remove_dir_all(&coordinator.opts.scratch);
    }
    result
}

fn drive(
    c: &mut Coordinator,
    launcher: &Launcher,
    addr: &str,
    token: &JobToken,
    rx: &Receiver<Event>,
) -> Result<ExitCode> {
    // Checked before anything starts: a bad CRYO_EXPORT is refused by name.
    let exported = export::exported_names(&[ENV_JOB, ENV_TOKEN], std::env::vars_os())?;
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
            if matches!(starter, AgentStarter::SrunStep | AgentStarter::LauncherStep) {
                start_agent_step(c, launcher, rx, &env, token, &exported)?;
            }
            vec![LaunchBlock {
                ranks: c.opts.ranks,
                env,
            }]
        }
    };
    let mut command = launch::build_command(
        launcher,
        &c.opts.hosts,
        &blocks,
        &c.opts.command.program(),
        &c.opts.command.args(),
        &exported,
    );
    let cwd = c.opts.command.cwd();
    if c.opts.restart_from.is_some() && !cwd.exists() {
        // Gone since the checkpoint: the ranks return to it, and the
        // launcher starts in it.
        std::fs::create_dir_all(&cwd).with_context(|| {
            format!("making the job's working directory {} again", cwd.display())
        })?;
        cryo_core::say!(
            "cryo: made the job's working directory {} again",
            cwd.display()
        );
    }
    command
        .current_dir(&cwd)
        .env(ENV_JOB, &c.opts.job)
        .env(ENV_TOKEN, token.expose())
        .process_group(0);
    ends_with_us(&mut command);
    let mut job_child = command
        .spawn()
        .with_context(|| format!("starting {launcher} in {}", cwd.display()))?;
    tracing::info!(job = %c.opts.job, pid = job_child.id(), "job.started");
    let started = Instant::now();
    let mut warned_no_agents = false;

    let mut next_interval = c.opts.interval.map(|i| Instant::now() + i);
    let exit = loop {
        if !warned_no_agents && c.agents.is_empty() && started.elapsed() > NO_AGENT_WARNING {
            warned_no_agents = true;
            cryo_core::say!(
                "cryo: WARNING: no node agent has connected after {} s, so this job cannot be checkpointed. With --agents external, something must start them: under Slurm, spank_cryo.so in plugstack.conf with the job submitted with --cryo, or use --agents srun (see README).",
                NO_AGENT_WARNING.as_secs()
            );
        }
        if let Ok(Some(status)) = job_child.try_wait() {
            if let Some(epoch) = c.epoch.as_mut() {
                let reason = AbortReason::JobEnded {
                    status: status.to_string(),
                };
                epoch.apply(EpochEvent::Failed(reason), Instant::now());
                c.progress();
            }
            // Every rank was durable: the commit decides, and its outcome
            // is what a preemption reports.
            finish_commit(c, rx);
            // A launcher that ended well ended a job that finished: a
            // preemption asked meanwhile has nothing left to stop or requeue.
            if c.preempting && !status.success() {
                break preempt_exit(c);
            }
            c.requeue_on_stop = false;
            // A launcher may end well while ranks did not (srun after a
            // node failure): the job finished only if every rank did.
            let unfinished = status.success().then(|| {
                await_word(c, rx, |c| c.unfinalized().is_empty());
                let unfinished = c.unfinalized();
                let lost = c.lost_nodes_of(&unfinished).join(", ");
                (unfinished, lost)
            });
            match unfinished {
                Some((unfinished, _)) if unfinished.is_empty() => {
                    Registry::of(&c.job).set_finished(true);
                    cryo_core::say!("cryo: job {} finished ({status})", c.opts.job);
                }
                // Not marked finished: a restart resumes it.
                Some((unfinished, lost)) if !lost.is_empty() => cryo_core::say!(
                    "cryo: WARNING: job {} ended with its launcher's {status}, but the agents of \
                     node(s) {lost} were lost before {} finished, so their ends were not seen; it \
                     is not marked finished, so a restart resumes it from its newest checkpoint",
                    c.opts.job,
                    crate::human::ranks(&unfinished)
                ),
                Some((unfinished, _)) => cryo_core::say!(
                    "cryo: WARNING: job {} ended with its launcher's {status}, but {} did not \
                     finish (no cryo_finalize, no exit: a node failure, a kill, or _exit); it \
                     is not marked finished, so a restart resumes it from its newest checkpoint",
                    c.opts.job,
                    crate::human::ranks(&unfinished)
                ),
                None => {
                    cryo_core::say!("cryo: job {} FAILED ({status})", c.opts.job);
                    name_first_departure(c, rx);
                }
            }
            // A rank an agent turned away (a refused restart) was named
            // with the reason just now.
            let turned_away =
                (c.first_left.as_ref()).is_some_and(|(rank, ..)| !c.pids.contains_key(rank));
            if c.pids.len() < c.opts.ranks as usize && !turned_away {
                cryo_core::say!(
                    "cryo: WARNING: only {} of {} ranks ever registered with a cryo agent, so the job could not be checkpointed (is the program linked with the cryo runtime, and did its agents start?)",
                    c.pids.len(),
                    c.opts.ranks
                );
            }
            break exit_code_of(status);
        }
        if let (Some(timeout), Some(at)) = (c.opts.finalize_timeout, c.all_finalized_at) {
            if at.elapsed() > timeout && c.epoch.is_none() && !c.is_committing() {
                // Every rank finished its work and left cryo; the MPI
                // library's teardown did not end (MPICH over UCX's TCP
                // transport can hang in MPI_Finalize). A rank that died
                // would have made the launcher end the job itself.
                cryo_core::say!(
                    "cryo: every rank of job {} called cryo_finalize {:.0} s ago, but {launcher} is still running (stuck in MPI_Finalize?): stopping it (--finalize-timeout)",
                    c.opts.job,
                    at.elapsed().as_secs_f64()
                );
                tracing::warn!(job = %c.opts.job, waited_s = at.elapsed().as_secs(), "job.finalize_timeout");
                // SIGKILL, not SIGTERM: a launcher given time to react reports
                // its ranks' deaths on the job's own stdout (Hydra's "BAD
                // TERMINATION" banner) after output that finished cleanly.
                // Remote proxies exit when their launcher connection closes.
                kill_process_group(&mut job_child);
                Registry::of(&c.job).set_finished(true);
                cryo_core::say!(
                    "cryo: job {} finished (its launcher stopped after every rank finalized)",
                    c.opts.job
                );
                break ExitCode::SUCCESS;
            }
        }
        if GOT_INT.swap(false, Ordering::AcqRel) {
            cryo_core::say!("cryo: interrupted; stopping the job without a checkpoint");
            stop_process_group(&mut job_child, Duration::from_secs(5));
            break ExitCode::from(130);
        }
        let mut preempt_signal = None;
        if GOT_USR1.swap(false, Ordering::AcqRel) {
            if c.opts.requeue {
                // Slurm's warning before the time limit or a preemption.
                preempt_signal = Some(("SIGUSR1", "SIGUSR1: checkpoint and requeue"));
                c.requeue_on_stop = true;
            } else if let Err(reason) = c.start_checkpoint("SIGUSR1") {
                cryo_core::say!("cryo: SIGUSR1: no checkpoint: {reason}");
            }
        }
        if GOT_TERM.swap(false, Ordering::AcqRel) {
            // `scancel` sends SIGTERM, and a cancelled job must not come
            // back: a SIGTERM stops the job after a checkpoint, unrequeued
            // (Slurm's own warnings are the SIGUSR1 of `--signal`).
            if c.opts.requeue && !c.requeue_on_stop && !c.preempting {
                cryo_core::say!(
                    "cryo: SIGTERM (scancel, scontrol requeue, or a stop Slurm gave no warning of): checkpointing, if the ranks are still there, and stopping; cryo does not requeue the job"
                );
            }
            // A stop waiting for an agent that lost its link waits no more.
            c.give_up_waiting("SIGTERM");
            preempt_signal = Some(("SIGTERM", "SIGTERM: preempt"));
        }
        if let Some((signal, why)) = preempt_signal.filter(|_| !c.preempting) {
            c.preempting = true;
            if let Err(reason) = c.start_stop_checkpoint(why) {
                if c.epoch.is_none() {
                    cryo_core::say!("cryo: {signal}: stopping without a new checkpoint: {reason}");
                    c.preempt_result = Some(false);
                }
            }
        }
        c.retry_stop_checkpoint();
        if let (Some(at), Some(interval)) = (next_interval, c.opts.interval) {
            if Instant::now() >= at {
                next_interval = Some(Instant::now() + c.on_interval(interval));
            }
        }
        if let (true, None, Some(false), Some(rank)) =
            (c.preempting, &c.epoch, c.preempt_result, c.finishing())
        {
            // No checkpoint, because the job is finishing: stopping it
            // now (and requeueing it) would throw its end away.
            cryo_core::say!(
                "cryo: job {} is finishing (rank {rank} has called cryo_finalize): letting it end; it is not stopped or requeued",
                c.opts.job
            );
            c.preempting = false;
            c.requeue_on_stop = false;
            c.preempt_result = None;
        }
        if c.preempting && c.epoch.is_none() && c.preempt_result.is_some() {
            Registry::of(&c.job).clear_coordinator();
            if c.preempt_result == Some(true) && matches!(launcher, Launcher::Hydra(_)) {
                // The checkpoint is durable and what the ranks computed
                // since is thrown away: Hydra, given a SIGTERM, would
                // print its "BAD TERMINATION" banner into the job's own
                // output. Its remote proxies exit when the connection to
                // mpiexec closes. Other launchers stop quietly on SIGTERM
                // (srun must be asked: killed, it leaves its step running).
                kill_process_group(&mut job_child);
            } else {
                stop_process_group(&mut job_child, Duration::from_secs(10));
            }
            break preempt_exit(c);
        }
        // Short: the launcher's exit is noticed on this tick, and every
        // tick of lateness adds to the job's end.
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(event) => c.on_event(event),
            Err(RecvTimeoutError::Timeout) => c.progress(),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(anyhow!("the coordinator's listener stopped"))
            }
        }
    };
    Ok(exit)
}

/// How long a coordinator whose job ended waits for a commit under way.
const COMMIT_GRACE: Duration = Duration::from_secs(60);

/// Waits (bounded) for a commit under way to finish, still serving events.
fn finish_commit(c: &mut Coordinator, rx: &Receiver<Event>) {
    let deadline = Instant::now() + COMMIT_GRACE;
    while c.is_committing() && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(event) => c.on_event(event),
            Err(RecvTimeoutError::Timeout) => c.progress(),
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// After a failed job: the first rank that left without saying goodbye,
/// and why (a restart that failed names what it could not restore). Its
/// agent's word may still be on the way when the launcher has ended.
fn name_first_departure(c: &mut Coordinator, rx: &Receiver<Event>) {
    await_word(c, rx, |c| c.first_left.is_some());
    if let Some((node, why, lost_at)) = c.first_lost_agent() {
        if c.first_left_at.is_none_or(|left_at| lost_at <= left_at) {
            // The ranks of a node heard from died after it went silent:
            // the launcher ended them over the lost node's.
            cryo_core::say!(
                "cryo: the agent on node {node} was lost first ({why}); what became of its ranks \
                 is not known here"
            );
            return;
        }
    }
    if let Some((rank, node, how)) = &c.first_left {
        cryo_core::say!("cryo: rank {rank} (node {node}) left first: {how}");
    }
}

/// Takes the agents' reports for up to a second, until `done`: their word
/// may still be on the way when the launcher has ended.
fn await_word(c: &mut Coordinator, rx: &Receiver<Event>, done: impl Fn(&Coordinator) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !done(c) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(event) => c.on_event(event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

fn preempt_exit(c: &Coordinator) -> ExitCode {
    let committed = c.job.latest_committed().ok().flatten();
    match c.preempt_result {
        Some(true) => {
            let unrequeued = if !c.opts.requeue && crate::requeue::this_slurm_job().is_some() {
                format!(
                    "; not requeued (no --requeue): `cryo restart {}` resumes it",
                    c.opts.job
                )
            } else {
                String::new()
            };
            cryo_core::say!(
                "cryo: job {} preempted after committing epoch {}{unrequeued}",
                c.opts.job,
                committed.unwrap_or(0)
            );
            ExitCode::from(EXIT_PREEMPTED)
        }
        _ => {
            cryo_core::say!(
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
