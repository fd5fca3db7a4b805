//! The whole performance suite in one command: `cryo-bench` with no
//! subcommand (also `cryo bench`).
//!
//! It runs, as subprocesses, `cryo-bench agent` (real ranks checkpointed and
//! restarted by a real agent) over a sweep of state sizes and of rank
//! counts, `quiesce-bench` under `mpiexec` (the safe point's cost) and under
//! `cryo run` (quiesce latency), and in-process the store benchmark of
//! `cryo-bench store` (the incremental checkpoint). Every figure is measured
//! in the same run as its baseline, on the same bytes. It prints a table
//! with the ratios against their targets and least-squares slopes of how
//! each figure grows, and writes `report.json`, `report.txt` and `bench.svg`
//! (pause time and throughput against state size). It measures; it never
//! fails on a missed target.
//!
//! * `report`: the report's types and its least-squares fits.
//! * `steps`: each measurement the suite runs as a subprocess.
//! * `render`: the plain-text report.

use std::fs;
use std::path::PathBuf;
use std::process::ExitStatus;

use cryo_coordinator::human;
use cryo_core::store::fs::{IoStep, IoStepError};
use thiserror::Error;

use crate::plot::PlotError;
use crate::quiesce_jobs::JobPlace;
use crate::store::{run_store_bench, StoreBenchOptions};

mod points;
mod render;
mod report;
mod steps;

pub use render::render;
pub use report::{fit, Fit, QuiesceRun, SafePointRun, SuiteReport};
use steps::{agent_bench, have, safe_point, Quiet};
pub(crate) use steps::{quiesce, QuiesceJob};

const MIB: u64 = 1 << 20;

/// `cryo-bench` options (without a subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Short run: small sizes and rank counts (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// State sizes per node for the size sweep (one rank), e.g.
    /// 256MiB,1GiB. Default: 64MiB,256MiB with --quick, else
    /// 256MiB,512MiB,1GiB,2GiB,4GiB.
    #[arg(long, value_delimiter = ',', value_parser = human::parse_size)]
    pub sizes: Vec<u64>,
    /// Rank counts for the rank sweep. Default: 1,2 with --quick, else
    /// 1,2,4,8,16.
    #[arg(long, value_delimiter = ',')]
    pub ranks: Vec<u32>,
    /// State per rank in the rank sweep. Default: 64MiB with --quick, else
    /// 128MiB.
    #[arg(long, value_parser = human::parse_size)]
    pub rank_size: Option<u64>,
    /// Rank counts for the MPI quiesce figures (skipped without `mpiexec`).
    /// Default: 2 with --quick, else 2,4,8,16,32,64.
    #[arg(long, value_delimiter = ',')]
    pub quiesce_ranks: Vec<u32>,
    /// Where the report, JSON and SVG go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Where it runs: scratch directory, binaries, lock.
    #[command(flatten)]
    pub place: JobPlace,
    /// Skip the MPI quiesce figures.
    #[arg(long)]
    pub no_quiesce: bool,
    /// Only the MPI figures (safe point and quiesce): skip the size and
    /// rank sweeps of the agent and the store.
    #[arg(long, conflicts_with = "no_quiesce")]
    pub only_quiesce: bool,
    /// `CRYO_QUIESCE_SLACK` for the MPI quiesce figures: `auto` (the
    /// runtime's default: 20 ms worth of safe points, at least one, and a
    /// rank at its cap waits there for the join) or a fixed number of safe
    /// points a rank may run past joining an agreement.
    #[arg(long, default_value = "auto")]
    pub quiesce_slack: String,
    /// Iteration lengths (CPU µs per rank) for the quiesce latency, counted
    /// in safe points from request to park.
    #[arg(long, value_delimiter = ',', default_value = "1000,20000")]
    pub quiesce_iter_us: Vec<u64>,
}

/// The suite could not run, or could not write its report. A measurement
/// that fails is not an error: it is named in the report's `skipped`.
#[derive(Debug, Error)]
pub enum SuiteError {
    /// The suite's own executable could not be found.
    #[error("finding this executable: {0}")]
    CurrentExe(std::io::Error),
    /// A binary the suite runs is missing.
    #[error("{} not found: build in release mode (cargo build --release) or pass --bin-dir", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
    /// A measurement's command could not be run.
    #[error("running {command}: {source}")]
    Run {
        /// The command.
        command: String,
        /// The error.
        source: std::io::Error,
    },
    /// A measurement's command failed.
    #[error("{command}: {status}: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// A measurement's JSON could not be read or the report's written.
    #[error("{what}: {source}")]
    Json {
        /// Whose JSON.
        what: &'static str,
        /// The error.
        source: serde_json::Error,
    },
    /// A measurement printed no figures.
    #[error("{0}")]
    NoFigures(&'static str),
    /// The job of the quiesce measurement did not start.
    #[error("job {job} did not start (every rank in its logged iterations) in time")]
    NotStarted {
        /// The job.
        job: String,
    },
    /// `cryo run` exited before the measurement ended.
    #[error("cryo run exited early ({0})")]
    ExitedEarly(ExitStatus),
    /// `cryo checkpoint` printed something unexpected.
    #[error("unexpected `cryo checkpoint` output: {0}")]
    Output(String),
    /// Plotting failed.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

struct Plan {
    preset: &'static str,
    sizes: Vec<u64>,
    ranks: Vec<u32>,
    rank_size: u64,
    quiesce_ranks: Vec<u32>,
}

/// What was given, else the preset's list.
fn preset<T: Clone>(quick: bool, given: &[T], quick_list: &[T], full: &[T]) -> Vec<T> {
    if !given.is_empty() {
        given.to_vec()
    } else if quick {
        quick_list.to_vec()
    } else {
        full.to_vec()
    }
}

fn plan(args: &SuiteArgs) -> Plan {
    Plan {
        preset: if args.quick { "quick" } else { "full" },
        sizes: preset(
            args.quick,
            &args.sizes,
            &[64 * MIB, 256 * MIB],
            &[256 * MIB, 512 * MIB, 1024 * MIB, 2048 * MIB, 4096 * MIB],
        ),
        ranks: preset(args.quick, &args.ranks, &[1, 2], &[1, 2, 4, 8, 16]),
        rank_size: args
            .rank_size
            .unwrap_or(if args.quick { 64 * MIB } else { 128 * MIB }),
        quiesce_ranks: preset(
            args.quick,
            &args.quiesce_ranks,
            &[2],
            &[2, 4, 8, 16, 32, 64],
        ),
    }
}

/// Runs the suite and writes `report.json`, `report.txt` and `bench.svg`.
pub fn run_suite(args: &SuiteArgs) -> Result<SuiteReport, SuiteError> {
    let plan = plan(args);
    // `cryo-bench agent` runs as a child of this executable.
    let exe = std::env::current_exe().map_err(SuiteError::CurrentExe)?;
    let bin = match &args.place.bin_dir {
        Some(dir) => dir.clone(),
        None => exe.parent().map(ToOwned::to_owned).unwrap_or_default(),
    };
    for needed in ["cryo-agent", "cryo-counter"] {
        if !bin.join(needed).exists() {
            return Err(SuiteError::Missing {
                path: bin.join(needed),
            });
        }
    }
    fs::create_dir_all(&args.out).step("creating", &args.out)?;
    let scratch = args
        .place
        .dir
        .join(format!("cryo-bench-suite-{}", std::process::id()));
    fs::create_dir_all(&scratch).step("creating", &scratch)?;
    let lock = args.place.lock.as_deref();
    let mut report = SuiteReport {
        preset: plan.preset.to_owned(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        sizes: Vec::new(),
        ranks: Vec::new(),
        incremental: Vec::new(),
        quiesce_slack: args.quiesce_slack.clone(),
        safe_point: Vec::new(),
        quiesce: Vec::new(),
        fits: Vec::new(),
        skipped: Vec::new(),
    };

    let (sizes, ranks) = if args.only_quiesce {
        (&[][..], &[][..])
    } else {
        (&plan.sizes[..], &plan.ranks[..])
    };
    for &size in sizes {
        eprintln!("== size sweep: 1 rank x {} ==", human::bytes(size));
        match agent_bench(&exe, &bin, &scratch, lock, 1, size) {
            Ok(run) => report.sizes.push(run),
            Err(err) => report
                .skipped
                .push(format!("size {}: {err}", human::bytes(size))),
        }
        let quiet = Quiet::take(lock)?;
        let store = run_store_bench(&StoreBenchOptions {
            size,
            dir: scratch.clone(),
            chunk_size: cryo_core::format::limits::DEFAULT_CHUNK_SIZE,
            level: cryo_core::format::chunk::DEFAULT_ZSTD_LEVEL,
            filter: cryo_core::format::chunk::Filter::Shuffle8,
            changed_fraction: 0.05,
            keep: false,
        });
        drop(quiet);
        match store {
            Ok(store) => report.incremental.push(store),
            Err(err) => report
                .skipped
                .push(format!("store {}: {err}", human::bytes(size))),
        }
    }
    for &ranks in ranks {
        eprintln!(
            "== rank sweep: {ranks} ranks x {} ==",
            human::bytes(plan.rank_size)
        );
        match agent_bench(&exe, &bin, &scratch, lock, ranks, plan.rank_size) {
            Ok(run) => report.ranks.push(run),
            Err(err) => report.skipped.push(format!("{ranks} ranks: {err}")),
        }
    }
    if args.no_quiesce || plan.quiesce_ranks.is_empty() {
        report.skipped.push("MPI quiesce: not requested".into());
    } else if !have("mpiexec") || !bin.join("quiesce-bench").exists() {
        report.skipped.push(
            "MPI quiesce: needs mpiexec and quiesce-bench (cargo build --release -p cryo-heat2d)"
                .into(),
        );
    } else {
        for &ranks in &plan.quiesce_ranks {
            eprintln!("== MPI quiesce: {ranks} ranks ==");
            match safe_point(&bin, lock, ranks, &args.quiesce_slack) {
                Ok(run) => report.safe_point.push(run),
                Err(err) => report
                    .skipped
                    .push(format!("safe point at {ranks} ranks: {err}")),
            }
            for &iter_us in &args.quiesce_iter_us {
                let job = QuiesceJob::suite(ranks, &args.quiesce_slack, iter_us);
                match quiesce(&bin, &scratch, lock, &job) {
                    Ok(run) => {
                        eprintln!(
                            "ranks {ranks}, {iter_us} us iterations: safe points to park {:?}, pause as the application saw it {:?} ms",
                            run.points_to_park, run.app_pause_ms
                        );
                        report.quiesce.push(run);
                    }
                    Err(err) => report.skipped.push(format!(
                        "quiesce at {ranks} ranks, {iter_us} us iterations: {err}"
                    )),
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&scratch);

    report.fits = report::fits(&report);
    let text = render(&report);
    let txt = args.out.join("report.txt");
    fs::write(&txt, &text).step("writing", &txt)?;
    let json = serde_json::to_vec_pretty(&report).map_err(|source| SuiteError::Json {
        what: "the report",
        source,
    })?;
    let json_path = args.out.join("report.json");
    fs::write(&json_path, json).step("writing", &json_path)?;
    crate::plot::write_svg(&report, &args.out.join("bench.svg"))?;
    Ok(report)
}
