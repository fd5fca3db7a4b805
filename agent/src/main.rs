//! `cryo-agent`: the node agent daemon and its command-line client.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cryo_agent::client;
use cryo_agent::self_copy::SelfCopy;
use cryo_agent::server::{default_copy_budget, Agent, AgentConfig, RestartFrom};
use cryo_agent::snapshot::SnapshotPolicy;
use cryo_agent::units::{format_bytes, parse_bytes};
use cryo_core::protocol::{BusyPolicy, Completion, ControlRequest, ControlResponse, ENV_TOKEN};
use cryo_core::token::JobToken;

#[derive(Parser, Debug)]
#[command(
    name = "cryo-agent",
    version,
    about = "cryo node agent: checkpoint and restart the ranks of one node"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Until {
    /// Answer when every rank has resumed (data still draining).
    Resumed,
    /// Answer when the epoch is committed.
    Committed,
}

// Parsed once per process: `serve`'s many options cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent daemon. Every option also reads a `CRYO_*`
    /// environment variable, which is how `cryo run` hands its settings to
    /// agents that Slurm's plugin starts on each node.
    Serve {
        /// Unix socket for ranks and control clients (its folder is
        /// created, 0700, if missing).
        #[arg(long, env = "CRYO_AGENT_SOCKET")]
        socket: PathBuf,
        /// Checkpoint store directory.
        #[arg(long, env = "CRYO_STORE")]
        store: PathBuf,
        /// Job name.
        #[arg(long, env = "CRYO_JOB")]
        job: String,
        /// Node name (default: the host name).
        #[arg(long, env = "CRYO_NODE")]
        node: Option<String>,
        /// Copy budget, e.g. 2GiB (default: an eighth of the node's RAM): the
        /// most the agent keeps; it keeps warm about its ranks' state.
        #[arg(long, value_parser = parse_bytes, env = "CRYO_COPY_BUDGET")]
        copy_budget: Option<u64>,
        /// Seconds after start before the copy budget is pre-faulted (at
        /// idle priority, as far as the ranks' state needs), at the latest.
        /// Sooner makes a checkpoint early in the job pause for a memcpy
        /// instead of first-touch faults; later keeps the faulting out of
        /// the job's own start.
        #[arg(long, default_value_t = 20.0, env = cryo_core::env::ENV_PREFAULT_DELAY)]
        prefault_delay: f64,
        /// Pre-fault sooner than the delay, once every rank of the node has
        /// passed a safe point (their start is over): on or off. Off keeps
        /// the budget cold until the delay is out.
        #[arg(long, default_value = "on", env = cryo_core::env::ENV_PREFAULT_EARLY,
              value_parser = clap::builder::BoolishValueParser::new(),
              action = clap::ArgAction::Set)]
        prefault_early: bool,
        /// When to capture a rank from a copy-on-write snapshot of it, so
        /// that it pauses for a clone (milliseconds) rather than a copy of
        /// its memory: auto (when the copy would not be a memcpy into warm
        /// memory, being more than the copy budget holds or has warm, and
        /// the node has the memory for a second copy of what its ranks
        /// copy), on, or off.
        #[arg(long, default_value_t = SnapshotPolicy::Auto, env = cryo_core::env::ENV_SNAPSHOT)]
        snapshot: SnapshotPolicy,
        /// Who copies a parked rank's memory into the copy budget: on (the
        /// rank itself, at memcpy speed, all of a node's ranks at once,
        /// when its runtime can) or off (the agent, with
        /// process_vm_readv, the ranks in turns).
        #[arg(long, default_value_t = SelfCopy::On, env = cryo_core::env::ENV_SELF_COPY)]
        self_copy: SelfCopy,
        /// Number of local ranks (default: those registered).
        #[arg(long)]
        ranks: Option<u32>,
        /// Restart registering ranks from this epoch (a number or `latest`).
        #[arg(long, env = "CRYO_RESTART_FROM")]
        restart_from: Option<String>,
        /// Seconds to wait for every rank to reach a safe point.
        #[arg(long, default_value_t = 60.0, env = "CRYO_PARK_TIMEOUT")]
        park_timeout: f64,
        /// Chunk size.
        #[arg(long, value_parser = parse_bytes, default_value = "1MiB", env = "CRYO_CHUNK_SIZE")]
        chunk_size: u64,
        /// zstd level of the chunks: 0 stores them uncompressed, -1 to -7
        /// are zstd's fast levels (less CPU taken from the ranks while the
        /// checkpoint drains, more bytes written), 1 to 19 compress harder.
        #[arg(long, default_value_t = cryo_core::format::chunk::DEFAULT_ZSTD_LEVEL,
              env = "CRYO_ZSTD_LEVEL", allow_negative_numbers = true,
              value_parser = clap::value_parser!(i32).range(-7..=19))]
        zstd_level: i32,
        /// Size at which the agent starts a new pack file: each checkpoint
        /// writes about (new bytes / this) packs per agent.
        #[arg(long, value_parser = parse_bytes, default_value = "1GiB", env = cryo_core::env::ENV_PACK_SIZE)]
        pack_size: u64,
        /// Threads copying rank memory (default: all cores).
        #[arg(long)]
        copy_threads: Option<usize>,
        /// Threads hashing, compressing and writing chunks (default: four
        /// per core, so that per-chunk fsyncs overlap).
        #[arg(long)]
        store_threads: Option<usize>,
        /// Coordinated mode: the job's coordinator, HOST:PORT. The agent
        /// reports to it and leaves commits to it.
        #[arg(long, value_name = "HOST:PORT", env = "CRYO_COORDINATOR")]
        coordinator: Option<String>,
        /// File holding the job token (default: the CRYO_TOKEN environment
        /// variable). When given, ranks must present the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Seconds to keep trying to reach the coordinator at start.
        #[arg(long, default_value_t = 10.0)]
        coordinator_wait: f64,
    },
    /// Checkpoint every rank registered with an agent.
    Checkpoint {
        /// The agent's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Epoch number (default: one past the newest).
        #[arg(long)]
        epoch: Option<u64>,
        /// If a checkpoint is still draining, wait for it instead of
        /// failing.
        #[arg(long)]
        wait: bool,
        /// When to return.
        #[arg(long, value_enum, default_value_t = Until::Committed)]
        until: Until,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Copy every chunk, even memory write tracking reports unchanged
        /// since the previous checkpoint.
        #[arg(long)]
        full: bool,
    },
    /// Make ranks that register from now on restart from an epoch.
    Restart {
        /// The agent's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Epoch (default: the newest committed).
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Show the agent's state.
    Status {
        /// The agent's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure checkpoint and restart of example ranks with this agent:
    /// runs `cryo-bench agent` (built apart: cargo build --release -p
    /// cryo-bench) with these arguments; `cryo-agent bench --help` lists
    /// them.
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments for `cryo-bench agent`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The longest wait a duration option takes: a year, in seconds.
const LONGEST_WAIT_SECS: f64 = 365.0 * 86_400.0;

fn init_logging(format: LogFormat) {
    // CRYO_LOG (set by `cryo run` for its agents), else RUST_LOG, else info.
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRYO_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            cryo_core::say!(
                "cryo-agent: error: {}",
                cryo_core::error_chain::error_chain(err.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            socket,
            store,
            job,
            node,
            copy_budget,
            prefault_delay,
            prefault_early,
            snapshot,
            self_copy,
            ranks,
            restart_from,
            park_timeout,
            chunk_size,
            zstd_level,
            pack_size,
            copy_threads,
            store_threads,
            coordinator,
            token_file,
            coordinator_wait,
        } => {
            let token = match &token_file {
                Some(path) => {
                    Some(JobToken::read(path).with_context(|| {
                        format!("reading the job token from {}", path.display())
                    })?)
                }
                None => match std::env::var(ENV_TOKEN) {
                    Ok(text) if !text.trim().is_empty() => Some(
                        JobToken::parse(&text, &format!("the {ENV_TOKEN} environment variable"))
                            .context("reading the job token")?,
                    ),
                    _ => None,
                },
            };
            if coordinator.is_some() && token.is_none() {
                bail!("--coordinator needs the job token: pass --token-file or set {ENV_TOKEN}");
            }
            let restart_from = match restart_from.as_deref() {
                None => None,
                Some("latest") => Some(RestartFrom::Latest),
                Some(n) => Some(RestartFrom::Epoch(n.parse().with_context(|| {
                    format!("--restart-from {n:?}: expected an epoch number or `latest`")
                })?)),
            };
            if !(0.0..=86_400.0).contains(&prefault_delay) {
                bail!("--prefault-delay {prefault_delay}: expected seconds, from 0 to 86400");
            }
            if !coordinator_wait.is_finite() {
                bail!("--coordinator-wait {coordinator_wait}: expected seconds");
            }
            if !(0.0..=LONGEST_WAIT_SECS).contains(&park_timeout) {
                bail!("--park-timeout {park_timeout}: expected seconds, from 0 to {LONGEST_WAIT_SECS}");
            }
            let (min, max) = (
                cryo_core::format::limits::MIN_CHUNK_SIZE,
                cryo_core::format::limits::MAX_CHUNK_SIZE,
            );
            let chunk_size = usize::try_from(chunk_size)
                .ok()
                .filter(|size| (min..=max).contains(size))
                .with_context(|| {
                    format!("--chunk-size {chunk_size}: expected {min} to {max} bytes")
                })?;
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            let config = AgentConfig {
                socket,
                store,
                node: node.unwrap_or_else(hostname),
                copy_budget: copy_budget.unwrap_or_else(default_copy_budget),
                prefault_delay: Duration::from_secs_f64(prefault_delay),
                prefault_early,
                snapshot,
                self_copy,
                ranks,
                restart_from,
                park_timeout: Duration::from_secs_f64(park_timeout.max(0.001)),
                chunk_size,
                zstd_level,
                pack_size,
                copy_threads: copy_threads.unwrap_or(cores),
                store_threads: store_threads.unwrap_or(cores * 4),
                job: job.clone(),
                coordinator,
                coordinator_wait: Duration::from_secs_f64(coordinator_wait.clamp(0.0, 3600.0)),
                token,
            };
            let agent =
                Agent::bind(config).with_context(|| format!("starting the agent of job {job}"))?;
            agent.serve().context("serving")?;
            Ok(())
        }
        Command::Checkpoint {
            socket,
            epoch,
            wait,
            until,
            json,
            full,
        } => {
            let request = ControlRequest::Checkpoint {
                full,
                epoch,
                if_busy: if wait {
                    BusyPolicy::Wait
                } else {
                    BusyPolicy::Refuse
                },
                until: match until {
                    Until::Resumed => Completion::Resumed,
                    Until::Committed => Completion::Committed,
                },
            };
            match client::request(&socket, &request)? {
                ControlResponse::Checkpoint(report) => {
                    if json {
                        println!("{}", serde_json::to_string(&report)?);
                    } else {
                        println!(
                            "epoch {} of job {} on {}: {}",
                            report.epoch,
                            report.job,
                            report.node,
                            if report.committed {
                                "committed"
                            } else {
                                "all ranks resumed, draining"
                            }
                        );
                        for rank in &report.ranks {
                            println!(
                                "  rank {} (pid {}): {} ({} copied, the rest unchanged) paused {:.3} ms (copy {:.3} ms){}; fds: {} restored, {} not",
                                rank.rank,
                                rank.pid,
                                format_bytes(rank.bytes),
                                format_bytes(rank.copied_bytes),
                                rank.pause_ns as f64 / 1e6,
                                rank.copy_ns as f64 / 1e6,
                                if rank.streamed { ", streamed over the copy budget" } else { "" },
                                rank.fds_restored,
                                rank.fds_not_restored,
                            );
                        }
                        println!(
                            "  resumed after {:.1} ms, total {:.1} ms; wrote {} new chunks ({}) of {}; agent peak RSS {} (copy budget {})",
                            report.resumed_ns as f64 / 1e6,
                            report.total_ns as f64 / 1e6,
                            report.stats.new_chunks,
                            format_bytes(report.stats.new_stored_bytes),
                            report.stats.chunks,
                            format_bytes(report.peak_rss_bytes),
                            format_bytes(report.copy_budget),
                        );
                    }
                    Ok(())
                }
                ControlResponse::Busy { reason, .. } => bail!("checkpoint refused: {reason}"),
                ControlResponse::Failed { reason, .. } => bail!("checkpoint failed: {reason}"),
                ControlResponse::Refused { reason } => bail!("refused: {reason}"),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Restart { socket, epoch } => {
            match client::request(&socket, &ControlRequest::ArmRestart { epoch })? {
                ControlResponse::RestartArmed { epoch, ranks } => {
                    println!("ranks that register now restart from epoch {epoch} ({ranks} ranks)");
                    Ok(())
                }
                ControlResponse::Refused { reason } => bail!("restart refused: {reason}"),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Status { socket, json } => {
            match client::request(&socket, &ControlRequest::Status)? {
                ControlResponse::Status(status) => {
                    if json {
                        println!("{}", serde_json::to_string(&status)?);
                    } else {
                        println!(
                            "job {} on node {} (store {})",
                            status.job, status.node, status.store
                        );
                        println!("ranks: {:?}", status.ranks);
                        println!(
                            "busy: {:?}; last committed: {:?}; armed restart: {:?}",
                            status.busy, status.last_committed, status.armed_restart
                        );
                        println!(
                            "peak RSS {} (copy budget {}, {} of it warm)",
                            format_bytes(status.peak_rss_bytes),
                            format_bytes(status.copy_budget),
                            format_bytes(status.copy_budget_warm)
                        );
                    }
                    Ok(())
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Bench { args } => {
            let mut all: Vec<OsString> = vec!["agent".into()];
            if !args
                .iter()
                .any(|a| a.to_string_lossy().starts_with("--agent"))
            {
                let agent = std::env::current_exe().context("finding this executable")?;
                all.extend(["--agent".into(), agent.into_os_string()]);
            }
            all.extend(args);
            let err = cryo_core::sibling::exec_sibling("cryo-bench", all);
            Err(anyhow::Error::new(err).context(
                "cryo-agent bench runs cryo-bench agent, built apart from cryo (cargo build --release -p cryo-bench)",
            ))
        }
    }
}
