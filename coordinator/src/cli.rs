//! Command-line interface of `cryo`.
//!
//! Exit codes: 0 success, 1 error, 2 `verify` found bad chunks or manifests.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cryo_core::protocol::{JobRequest, JobResponse};
use cryo_core::store::Store;

use crate::report::{render_status, report_checkpoint, warn_unrestorable};
use crate::store_dir::StoreDir;

use crate::inspect;
use crate::launch;
use crate::launch_args::{run_options, slurm_ntasks, LaunchArgs};
use crate::logging::{self, LogFormat};
use crate::registry::{JobCommand, Registry};
use crate::resume;
use crate::session;

/// Exit code when `cryo verify` finds damage.
pub const EXIT_VERIFY_FAILED: u8 = 2;

/// cryo: checkpoint and restart MPI jobs.
#[derive(Debug, Parser)]
#[command(name = "cryo", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log lifecycle events (info level); `CRYO_LOG` overrides.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What `cryo run --help` and `cryo restart --help` say about tuning.
const TUNING: &str = "\
Where checkpoints go: --store, else CRYO_STORE, else ./cryo-store (a directory every node sees).

Tuning (environment of the job's ranks; see the README's settings table):
  CRYO_QUIESCE_SLACK=N   safe points an MPI rank may run past a checkpoint request while the
                         ranks agree (default: auto, 20 ms of the ranks' pace and at least one;
                         a rank at its cap waits there for the agreement, two safe points
                         and at least 100 ms, so a coupled code parks at the safe point after
                         the one where its last rank saw the request); a fixed N is taken as
                         given, with no wait at the cap: more runs longer before parking,
                         less makes the agreement retry
  CRYO_DIRTY_TRACKING    auto | off: write tracking for incremental checkpoints
  CRYO_FILE_POLICY       truncate | keep: files written since the checkpoint, at restart
  CRYO_UNLINKED_CAP, CRYO_WRITABLE_CAP, CRYO_FD_FLOOR: what ranks save besides their regions
  CRYO_RESTORE_THREADS=N threads each restarting rank decodes with (default: its share of the
                         node's cores, or the cores it is bound to)
  CRYO_PREFETCH=0        no prefetch: by default a restarting rank has the kernel read its chunks
                         into the page cache while the launcher and MPI_Init run
--copy-budget trades the agent's memory for the pause: state within it pauses for a memcpy. It is
a cap: an agent keeps warm about its ranks' state (an eighth more), not the whole budget.
CRYO_SNAPSHOT (agents; auto | on | off, default auto): a parked rank clones itself and resumes at
once, and its agent reads the clone while it computes on, so the pause is a clone (a few ms per
GiB) whatever the state and the budget; each page the rank writes meanwhile costs a page of memory
and a kernel copy. auto does it when the copy would not be a memcpy into a warm budget (before the
pre-fault, or beyond the budget) and the node has room for a second copy.
CRYO_SELF_COPY (agents; on | off, default on): a parked rank copies its own memory into the
budget (memcpy speed, a node's ranks at once) instead of the agent reading it with
process_vm_readv in turns; its first such copy also maps its share of the budget. The agent
still copies what is under 4 MiB, and everything when a node has more ranks than cores.
CRYO_PREFAULT_DELAY (agents; default 20 s): when the budget starts to be pre-faulted (as far as
the ranks' state needs, at idle priority), at the latest. Sooner makes
an early first checkpoint pause for a memcpy; later keeps the faulting out of the job's start (a
checkpoint before then clones the ranks it cannot copy into warm memory, and warms the budget for
the next one once its copies are done; with CRYO_SNAPSHOT=off it warms while the ranks head for
their safe point).
CRYO_PREFAULT_EARLY (agents; on | off, default on): an agent starts pre-faulting before the delay
is out once every rank of its node has passed a safe point, its start (launcher, MPI_Init, its
first allocations) being over. off keeps the budget cold until the delay: for a job that runs
only seconds and is never checkpointed, or to measure a cold first checkpoint.
CRYO_PACK_SIZE (agents; default 1GiB): each agent starts a new pack file past it. Smaller means
more files per checkpoint for the filesystem's metadata server, larger means more to copy when
GC repacks a pack.
CRYO_ZSTD_LEVEL (agents; default 1): zstd level of the chunks, compressed after the ranks resume.
0 stores them raw (no compression CPU, every byte written: for state that does not compress),
-1..-7 are faster levels, 2..19 compress harder for more CPU.
CRYO_EXPORT=VAR,... (cryo run, Open MPI): more variables mpirun carries to ranks on other hosts,
besides CRYO_*, OMP_*, PATH, LD_LIBRARY_PATH and PYTHONPATH (Hydra and srun carry everything).";

/// `cryo` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List jobs and epochs in a store, with sizes, ratios and state.
    Ls {
        /// The store directory.
        store: PathBuf,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Tell what a cryo file is from its header, even if it cannot be loaded.
    Describe {
        /// Any file from a store.
        file: PathBuf,
    },
    /// Re-hash every chunk of an epoch (or all epochs); exit 2 if any is bad.
    Verify {
        /// The store directory.
        store: PathBuf,
        /// The job.
        job: String,
        /// The epoch (default: every committed epoch).
        epoch: Option<u64>,
    },
    /// Apply retention and delete chunks no committed epoch references.
    Gc {
        /// The store directory.
        store: PathBuf,
        /// Keep only the newest K committed epochs of each job.
        #[arg(long)]
        keep: Option<usize>,
        /// Repack a pack whose live share of bytes is below this fraction
        /// (0 never repacks, 1 repacks any pack with a dead chunk). Packs
        /// with no live chunk are always deleted.
        #[arg(long, default_value_t = cryo_core::store::gc::DEFAULT_REPACK_BELOW, value_parser = parse_fraction)]
        repack_below: f64,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// Run an MPI job under cryo: `cryo run -n 4 -- ./app args`.
    #[command(after_help = TUNING)]
    Run {
        /// Job name (default: `slurm-$SLURM_JOB_ID` under Slurm, else the
        /// program's name; for `python3 app.py` the script's, `app`).
        #[arg(long)]
        job: Option<String>,
        /// Launch options.
        #[command(flatten)]
        launch: LaunchArgs,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
        command: Vec<OsString>,
    },
    /// Relaunch a job from its newest committed epoch that verifies.
    #[command(after_help = TUNING)]
    Restart {
        /// The job.
        job: String,
        /// Restart from this epoch (default: the newest that verifies).
        #[arg(long)]
        epoch: Option<u64>,
        /// Launch options.
        #[command(flatten)]
        launch: LaunchArgs,
    },
    /// Checkpoint a running job now; it keeps running.
    Checkpoint {
        /// The job.
        job: String,
        /// The store (default: `cryo-store` in the working directory).
        #[arg(long, env = "CRYO_STORE")]
        store: Option<PathBuf>,
    },
    /// Checkpoint a running job, then stop it (exit code 75 for `cryo run`).
    Preempt {
        /// The job, or a Slurm job id (then the job is `slurm-<id>`).
        job: String,
        /// The store (default: `cryo-store` in the working directory).
        #[arg(long, env = "CRYO_STORE")]
        store: Option<PathBuf>,
    },
    /// Show a running job: ranks, nodes, last epoch, checkpoint progress.
    Status {
        /// The job (default: every job with a live coordinator).
        job: Option<String>,
        /// The store (default: `cryo-store` in the working directory).
        #[arg(long, env = "CRYO_STORE")]
        store: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks (figures and ratios, not pass/fail): with no subcommand,
    /// the whole suite (`--quick` for a short run), `store` for the store
    /// alone. Runs the `cryo-bench` binary (built apart: cargo build
    /// --release -p cryo-bench) with these arguments; `cryo bench --help`
    /// lists them.
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments for `cryo-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Runs the command line; for `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            cryo_core::say!("cryo: error: {}", crate::human::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Ls { store, job, json } => {
            let store = Store::open(&store)?;
            inspect::name_closed_jobs(&store, job.as_deref());
            let rows = inspect::list(&store, job.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", inspect::render_list(&rows));
                print!(
                    "{}",
                    crate::pack_view::render_usage(&store, job.as_deref())?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { file } => {
            print!("{}", inspect::describe(&file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { store, job, epoch } => {
            let store = Store::open(&store)?;
            let job_store = store.existing_job(&job)?;
            let outcome = inspect::verify(&job_store, epoch)
                .with_context(|| format!("verifying job {job:?}"))?;
            print!("{}", outcome.text);
            Ok(if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_VERIFY_FAILED)
            })
        }
        Command::Gc {
            store,
            keep,
            repack_below,
            job,
        } => {
            let store = Store::open(&store)?;
            let options = cryo_core::store::GcOptions { keep, repack_below };
            inspect::name_closed_jobs(&store, job.as_deref());
            let reports = inspect::gc(&store, job.as_deref(), options)?;
            print!("{}", inspect::render_gc(&reports));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            job,
            launch,
            command,
        } => {
            let job = job.unwrap_or_else(|| crate::job_name::default_for(&command));
            let ranks = launch.ranks.or_else(slurm_ntasks).unwrap_or(1);
            let cwd = std::env::current_dir().context("reading the working directory")?;
            let job_command = JobCommand::new(&command[0], &command[1..], &cwd, ranks)
                .with_launcher(launch.launcher.as_deref());
            crate::program::check_before_launch(&job_command, launch.hosts.is_some())?;
            let store = announce_store(StoreDir::resolve(launch.store.clone())?, Creates::Yes)?;
            let asked = if slurm_restart_count() > 0 {
                Some(resume::Asked::BySlurm)
            } else {
                launch.resume.then_some(resume::Asked::ByUser)
            };
            let resume_from = match asked {
                Some(asked) => resume::epoch(&store.path, &job, &job_command, asked)?,
                None => None,
            };
            session::run(run_options(
                job,
                ranks,
                store,
                launch,
                job_command,
                resume_from,
            )?)
        }
        Command::Restart {
            job,
            epoch,
            mut launch,
        } => {
            let store_dir = announce_store(
                StoreDir::resolve_for(launch.store.clone(), &job)?,
                Creates::No,
            )?;
            let store = store_dir.open()?;
            let job = crate::job_name::named(&store_dir.path, &job);
            let job_store = store.existing_job(&job)?;
            let registry = Registry::of(&job_store);
            session::refuse_if_running(&registry, &job)?;
            let command = registry.command()?;
            // The launcher the job ran with (an Open MPI job's mpirun, say),
            // unless this restart names another.
            if launch.launcher.is_none() {
                launch.launcher = command.launcher();
            }
            if let Some(ranks) = launch.ranks {
                if ranks != command.world_size {
                    bail!(
                        "job {job:?} was checkpointed with {} ranks; a restart keeps the world size, so use -n {} (the ranks may land on any nodes)",
                        command.world_size,
                        command.world_size
                    );
                }
            }
            let epoch = session::choose_restart_epoch(&job_store, epoch)?;
            if let Some(after) = command.fresh_after.filter(|after| epoch <= *after) {
                cryo_core::say!(
                    "cryo: warning: epoch {epoch} is an earlier run's: the job's command, {}, started from the beginning after epoch {after}",
                    command.describe()
                );
            }
            if registry.finished() {
                cryo_core::say!("cryo: note: job {job:?} finished when it last ran; this restart runs it again from epoch {epoch}");
            }
            let manifest = job_store.load_manifest(epoch)?;
            if manifest.world_size != command.world_size {
                bail!(
                    "epoch {epoch} has {} ranks but the job's command says {}",
                    manifest.world_size,
                    command.world_size
                );
            }
            crate::program::check_before_launch(&command, launch.hosts.is_some())?;
            // Where this restart places the ranks itself (not srun's).
            let placed_here = launch.hosts.is_some() || launch.nodes.is_some();
            let ranks = command.world_size;
            let opts = run_options(job, ranks, store_dir, launch, command, Some(epoch))?;
            if placed_here {
                // `--nodes` alone: nodes emulated on this machine.
                let emulated = opts.hosts.is_empty();
                let placed = if emulated {
                    &opts.placement
                } else {
                    &opts.hosts
                };
                launch::check_restart_placement(&manifest, placed, emulated)?;
            }
            cryo_core::say!("cryo: restarting job {:?} from epoch {epoch}", opts.job);
            crate::gone_files::announce(&manifest, &opts.store);
            session::run(opts)
        }
        Command::Checkpoint { job, store } => {
            let store = existing_store(store, Some(&job))?;
            let job = crate::job_name::named(&store, &job);
            let response = session::request(&store, &job, JobRequest::Checkpoint)?;
            let code = report_checkpoint(&store, &job, &response)?;
            warn_unrestorable(&store, &job, &response);
            Ok(code)
        }
        Command::Preempt { job, store } => {
            let job = if job.bytes().all(|b| b.is_ascii_digit()) {
                format!("slurm-{job}")
            } else {
                job
            };
            let store = existing_store(store, Some(&job))?;
            let requeues = crate::report::requeues(&store, &job);
            let response = session::request(&store, &job, JobRequest::Preempt)?;
            let code = report_checkpoint(&store, &job, &response)?;
            warn_unrestorable(&store, &job, &response);
            crate::report::after_preempt(&store, &job, requeues, &response);
            Ok(code)
        }
        Command::Status { job, store, json } => {
            let store = existing_store(store, job.as_deref())?;
            let listing = job.is_none();
            let jobs = match job {
                Some(job) => vec![crate::job_name::named(&store, &job)],
                None => {
                    let store_handle = Store::open(&store)?;
                    store_handle
                        .jobs()?
                        .into_iter()
                        .filter(|name| {
                            store_handle
                                .existing_job(name)
                                .map(|j| Registry::of(&j).coordinator(name).is_ok())
                                .unwrap_or(false)
                        })
                        .collect()
                }
            };
            if jobs.is_empty() {
                println!("no running jobs in {}", store.display());
            }
            let mut unanswered = 0usize;
            for job in jobs {
                let answer = match session::request(&store, &job, JobRequest::Status) {
                    Ok(answer) => answer,
                    // Listing every job: one that does not answer is named
                    // and the others are still asked.
                    Err(err) if listing => {
                        cryo_core::say!("cryo: job {job:?} did not answer: {err:#}");
                        unanswered += 1;
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                match answer {
                    JobResponse::Status(status) if json => {
                        println!("{}", serde_json::to_string_pretty(&status)?)
                    }
                    JobResponse::Status(status) => print!("{}", render_status(&status)),
                    JobResponse::Refused { reason } => bail!("job {job:?}: {reason}"),
                    other => bail!("job {job:?}: unexpected answer {other:?}"),
                }
            }
            if unanswered > 0 {
                bail!(
                    "{unanswered} job(s) in {} did not answer (named above)",
                    store.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { args } => {
            let err = cryo_core::sibling::exec_sibling("cryo-bench", &args);
            Err(anyhow::Error::new(err).context(
                "cryo bench runs the cryo-bench binary, built apart from cryo (cargo build --release -p cryo-bench)",
            ))
        }
    }
}

/// Whether a command makes its store when it is missing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Creates {
    Yes,
    No,
}

/// Resolves the store of `cryo run` or `restart` and says where it is.
fn announce_store(store: StoreDir, creates: Creates) -> Result<StoreDir> {
    if store.is_default {
        cryo_core::say!("cryo: store {}", store.describe());
    } else if let Some(news) = store.newly_made().filter(|_| creates == Creates::Yes) {
        cryo_core::say!("cryo: store {} {news}", store.describe());
    }
    if let Some(warning) = store.node_local_warning() {
        cryo_core::say!("cryo: WARNING: {warning}");
    }
    Ok(store)
}

/// The store a command about a running job talks to: it must exist.
fn existing_store(given: Option<PathBuf>, job: Option<&str>) -> Result<PathBuf> {
    let store = match job {
        Some(job) => StoreDir::resolve_for(given, job)?,
        None => StoreDir::resolve(given)?,
    };
    store.open()?;
    Ok(store.path)
}

/// How often Slurm has restarted this (requeued) job.
fn slurm_restart_count() -> u32 {
    std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A fraction between 0 and 1, for `--repack-below`.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}
