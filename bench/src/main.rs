//! `cryo-bench`: cryo's benchmarks (figures and ratios, not pass/fail).
//! `cryo bench ARGS` and `cryo-agent bench ARGS` run this binary.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cryo_bench::agent::{self, AgentBenchArgs};
use cryo_bench::cold_restart::{render_cold_restart, run_cold_restart_bench, ColdRestartArgs};
use cryo_bench::first_pause::{render_first_pause, run_first_pause, FirstPauseArgs};
use cryo_bench::first_request::{render_first_request, run_first_request, FirstRequestArgs};
use cryo_bench::start::{render_start, run_start_bench, StartArgs};
use cryo_bench::store::{render_store_bench, run_store_bench, StoreArgs};
use cryo_bench::store_ops::{render_ops, run_ops};
use cryo_bench::suite::{self, SuiteArgs};
use cryo_coordinator::logging::{self, LogFormat};

/// cryo's benchmarks (figures and ratios, not pass/fail): with no
/// subcommand, the whole suite (`--quick` for a short run).
#[derive(Debug, Parser)]
#[command(name = "cryo-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// One benchmark only.
    #[command(subcommand)]
    command: Option<Command>,
    /// Options of the whole suite.
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store throughput against `zstd -1 -T0` and a raw write + fsync.
    Store(StoreArgs),
    /// Checkpoint and restart of example ranks by a real agent.
    Agent(Box<AgentBenchArgs>),
    /// A job's start and end under `cryo run` against its launcher alone.
    Start(StartArgs),
    /// A restart from a store out of the page cache, with and without the
    /// ranks' prefetch.
    ColdRestart(ColdRestartArgs),
    /// A job's first checkpoint soon after its start: the pause with the
    /// copy-on-write snapshot and without, against a memcpy.
    FirstPause(FirstPauseArgs),
    /// Safe points from a checkpoint request made before the job's first
    /// safe point to the park, beside the old first floor forced.
    FirstRequest(FirstRequestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(LogFormat::Text, false);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cryo-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => {
            let report = suite::run_suite(&cli.suite).context("running the suite")?;
            print!("{}", suite::render(&report));
            println!(
                "report: {0}/report.txt, {0}/report.json, plot: {0}/bench.svg",
                cli.suite.out.display()
            );
        }
        Some(Command::Store(args)) => {
            let report = run_store_bench(&args.options()?).context("the store benchmark")?;
            print!("{}", render_store_bench(&report));
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            if !args.no_ops {
                let chunk_size = usize::try_from(args.chunk_size).context("--chunk-size")?;
                let ops = run_ops(&args.ops_sizes, &args.ops_ranks, &args.dir, chunk_size)
                    .context("counting the store's metadata operations")?;
                print!("{}", render_ops(&ops));
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&ops)?);
                }
            }
        }
        Some(Command::Agent(args)) => agent::run(&args).context("the agent benchmark")?,
        Some(Command::FirstPause(args)) => {
            let runs = run_first_pause(&args).context("the first-pause benchmark")?;
            print!("{}", render_first_pause(&runs, args.ranks, args.nodes));
        }
        Some(Command::FirstRequest(args)) => {
            let runs = run_first_request(&args).context("the first-request benchmark")?;
            print!("{}", render_first_request(&runs, args.iter_us, args.nodes));
        }
        Some(Command::ColdRestart(args)) => {
            let report = run_cold_restart_bench(&args).context("the cold restart benchmark")?;
            print!("{}", render_cold_restart(&report));
        }
        Some(Command::Start(args)) => {
            let report = run_start_bench(&args).context("the start benchmark")?;
            print!("{}", render_start(&report));
        }
    }
    Ok(())
}
