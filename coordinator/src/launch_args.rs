//! The options `cryo run` and `cryo restart` share, and how they become
//! the job's [`RunOptions`]: who starts the agents, where the ranks go,
//! the timeouts.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::launch;
use crate::registry::JobCommand;
use crate::session::{self, AgentMode, AgentStarter, RunOptions};
use crate::store_dir::StoreDir;

/// Options shared by `run` and `restart`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The checkpoint store, a directory every node sees (default:
    /// `cryo-store` in the working directory).
    #[arg(long, env = "CRYO_STORE")]
    pub store: Option<PathBuf>,
    /// MPI world size (for `restart`: must equal the checkpoint's;
    /// default under Slurm: `$SLURM_NTASKS`).
    #[arg(short = 'n', long = "ranks")]
    pub ranks: Option<u32>,
    /// Nodes and their ranks, e.g. `a:2,b:2` (emulated on this machine);
    /// default: this host.
    #[arg(long, conflicts_with = "hosts")]
    pub nodes: Option<String>,
    /// Real hosts and their ranks, e.g. `n0:2,n1:2`, reached by the MPI
    /// launcher itself (Hydra's ssh launcher, `HYDRA_LAUNCHER_EXEC`, or Open
    /// MPI's rsh agent): for a cluster without Slurm. `cryo run` starts one
    /// agent on each through the same launcher (`--agents launcher`), and
    /// the ranks there. The store must be a directory every host sees.
    #[arg(long)]
    pub hosts: Option<String>,
    /// Checkpoint every SECS seconds.
    #[arg(long, value_name = "SECS", env = "CRYO_INTERVAL")]
    pub interval: Option<f64>,
    /// Committed epochs to keep.
    #[arg(long, default_value_t = 3, env = "CRYO_KEEP")]
    pub keep: usize,
    /// The launcher: `srun`, or an MPI launcher (default: `srun` inside a
    /// Slurm allocation, else the launcher of the MPI the program links,
    /// told by `ldd` of the program or, for Python, of mpi4py's extension,
    /// else MPICH's mpiexec, else Open MPI's mpirun). One of the other MPI
    /// than the program's is refused.
    #[arg(long)]
    pub launcher: Option<PathBuf>,
    /// Who starts the node agents: `spawn` (cryo run, one per `--nodes`
    /// entry, on this machine), `external` (one per node, started by
    /// Slurm's spank_cryo plugin or by hand, at a node-local socket),
    /// `srun` (cryo run, as a Slurm step of one agent per node) or
    /// `launcher` (cryo run, through the MPI launcher, one per `--hosts`
    /// entry). Default: `launcher` with `--hosts`; inside a Slurm
    /// allocation without `--nodes`, `external` when the job was submitted
    /// with `--cryo`, else `srun`.
    #[arg(long, value_enum)]
    pub agents: Option<AgentsArg>,
    /// Host name or address that agents on other nodes dial (external
    /// agents; default: this host's name).
    #[arg(long)]
    pub advertise: Option<String>,
    /// If the job already has a committed checkpoint, continue from it
    /// instead of starting over. Implied when Slurm restarts a requeued
    /// job (`SLURM_RESTART_COUNT` > 0).
    #[arg(long)]
    pub resume: bool,
    /// Slurm: on SIGUSR1 (`--signal=B:USR1@GRACE`) or `cryo preempt`,
    /// checkpoint, stop the job and requeue it with `scontrol requeue`; on
    /// SIGTERM (`scancel`), checkpoint and stop it, not requeued.
    #[arg(long)]
    pub requeue: bool,
    /// The cryo-agent binary (default: next to `cryo`).
    #[arg(long, env = "CRYO_AGENT_BIN")]
    pub agent: Option<PathBuf>,
    /// Chunk size.
    #[arg(long, default_value = "1MiB", value_parser = crate::human::parse_chunk_size)]
    pub chunk_size: u64,
    /// Copy budget per agent, e.g. `2GiB` (default: an eighth of RAM).
    /// Ranks are copied into it while paused and resume as soon as their
    /// memory is in it: state up to the budget pauses for a memcpy, state
    /// beyond it is streamed (longer pause, bounded agent memory). The
    /// agent keeps at most this much memory while the job runs, and warm
    /// only about what its ranks' state needs.
    #[arg(long)]
    pub copy_budget: Option<String>,
    /// Abort a checkpoint not committed within SECS.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub checkpoint_timeout: f64,
    /// How long agents wait for ranks to reach a safe point.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub park_timeout: f64,
    /// A preemption that finds an agent away (its link lost, as in a
    /// network partition) waits up to SECS for it to dial in again before
    /// its checkpoint; past that, or at a SIGTERM meanwhile, the job stops
    /// without a new one. Keep it well within the grace time (0: no wait).
    #[arg(
        long,
        default_value_t = 15.0,
        value_name = "SECS",
        env = "CRYO_REJOIN_WAIT"
    )]
    pub rejoin_wait: f64,
    /// Address the coordinator listens on (default: loopback, or every
    /// interface with external agents).
    #[arg(long)]
    pub listen: Option<String>,
    /// Node-local scratch for agent sockets and logs.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Once every rank has called cryo_finalize, stop the MPI launcher if
    /// it is still running SECS later, and count the job as finished: an
    /// MPI library whose MPI_Finalize hangs (MPICH over UCX's TCP
    /// transport, openucx/ucx#8738) then does not hold the allocation.
    /// Default: wait for the launcher as long as it runs.
    #[arg(long, value_name = "SECS", env = "CRYO_FINALIZE_TIMEOUT")]
    pub finalize_timeout: Option<f64>,
}

/// Who starts the node agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentsArg {
    /// `cryo run` starts them on this machine.
    Spawn,
    /// They start on each node by other means (Slurm's plugin).
    External,
    /// `cryo run` starts them as a Slurm step of one agent per node of the
    /// allocation: no plugin needed.
    Srun,
    /// `cryo run` starts them through the MPI launcher, one per host of
    /// `--hosts`.
    Launcher,
}

pub(crate) fn run_options(
    job: String,
    ranks: u32,
    store: StoreDir,
    launch: LaunchArgs,
    command: JobCommand,
    restart_from: Option<u64>,
) -> Result<RunOptions> {
    cryo_core::names::check_job_name(&job)?;
    let in_slurm = std::env::var_os("SLURM_JOB_ID").is_some();
    // Inside Slurm the plugin starts the agents when the job asked for it
    // (--cryo sets CRYO_SPANK); otherwise cryo run starts them itself.
    let plugin_active = std::env::var_os(cryo_core::env::ENV_SPANK).is_some();
    let agents = match launch.agents {
        Some(agents) => agents,
        None if launch.hosts.is_some() => AgentsArg::Launcher,
        None if in_slurm && launch.nodes.is_none() && plugin_active => AgentsArg::External,
        None if in_slurm && launch.nodes.is_none() => AgentsArg::Srun,
        None => AgentsArg::Spawn,
    };
    let agent_mode = match agents {
        AgentsArg::Spawn if launch.hosts.is_some() => {
            bail!("--hosts names real hosts, whose agents run there: leave out --agents spawn (which emulates nodes on this machine, see --nodes)")
        }
        AgentsArg::Spawn => AgentMode::Spawn,
        AgentsArg::External | AgentsArg::Srun | AgentsArg::Launcher => {
            if launch.nodes.is_some() {
                bail!("--nodes emulates nodes on this machine; with agents on the real nodes the nodes are those the launcher uses (leave out --nodes, pass --hosts, or pass --agents spawn)");
            }
            AgentMode::External {
                socket: session::node_local_socket(&job, &store.path),
                advertise: launch.advertise.clone(),
                starter: match agents {
                    AgentsArg::Srun => AgentStarter::SrunStep,
                    AgentsArg::Launcher => AgentStarter::LauncherStep,
                    _ => AgentStarter::Plugin,
                },
            }
        }
    };
    if matches!(agent_mode, AgentMode::Spawn) {
        crate::host_room::check_here(ranks)?;
    }
    if let AgentMode::External {
        starter: AgentStarter::Plugin,
        ..
    } = &agent_mode
    {
        store.check_plugin_agents(std::env::var_os(cryo_core::env::ENV_STORE).as_deref())?;
    }
    let external = matches!(agent_mode, AgentMode::External { .. });
    let launcher = launch
        .launcher
        .or_else(|| (in_slurm && external).then(|| PathBuf::from("srun")));
    let listen = launch
        .listen
        .unwrap_or_else(|| if external { "0.0.0.0:0" } else { "127.0.0.1:0" }.to_owned());
    let nodes = match &launch.nodes {
        Some(spec) => launch::parse_nodes(spec)?,
        None => vec![launch::NodeSpec {
            name: crate::registry::hostname(),
            slots: None,
        }],
    };
    let placement = launch::place(&nodes, ranks)?;
    let hosts = match &launch.hosts {
        Some(spec) => launch::place(&launch::parse_nodes(spec)?, ranks)?,
        None => Vec::new(),
    };
    if !hosts.is_empty() && matches!(launcher.as_deref(), Some(l) if l.ends_with("srun")) {
        bail!("--hosts is for an MPI launcher (mpiexec, mpirun); under srun the ranks run on the allocation's nodes");
    }
    let scratch = launch
        .scratch
        .clone()
        .unwrap_or_else(|| session::default_scratch(&job));
    Ok(RunOptions {
        store: store.path,
        job,
        ranks,
        placement,
        hosts,
        interval: launch
            .interval
            .map(|s| crate::human::seconds(s, "--interval"))
            .transpose()?,
        keep: launch.keep.max(1),
        launcher,
        agents: agent_mode,
        requeue: launch.requeue,
        agent_bin: launch.agent,
        chunk_size: usize::try_from(launch.chunk_size).context("chunk size too large")?,
        copy_budget: launch.copy_budget,
        checkpoint_timeout: crate::human::seconds(
            launch.checkpoint_timeout,
            "--checkpoint-timeout",
        )?,
        park_timeout: crate::human::seconds(launch.park_timeout, "--park-timeout")?,
        rejoin_wait: if launch.rejoin_wait == 0.0 {
            std::time::Duration::ZERO
        } else {
            crate::human::seconds(launch.rejoin_wait, "--rejoin-wait")?
        },
        listen,
        restart_from,
        command,
        scratch,
        finalize_timeout: launch
            .finalize_timeout
            .map(|s| crate::human::seconds(s, "--finalize-timeout"))
            .transpose()?,
    })
}

/// `SLURM_NTASKS` inside an allocation.
pub(crate) fn slurm_ntasks() -> Option<u32> {
    std::env::var("SLURM_NTASKS").ok()?.parse().ok()
}
