//! Command-line interface of `cryo`.
//!
//! Exit codes: 0 success, 1 error, 2 `verify` found bad chunks or manifests.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cryo_core::chunk::{Filter, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL};
use cryo_core::store::Store;

use crate::bench::{render_store_bench, run_store_bench, StoreBenchOptions};
use crate::human::parse_size;
use crate::inspect;
use crate::logging::{self, LogFormat};

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
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// Benchmarks (figures and ratios, not pass/fail).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `cryo bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Store throughput against `zstd -1 -T0` and a raw write + fsync.
    Store {
        /// Bytes of synthetic state (e.g. 512M, 2G).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Scratch directory.
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
        /// Chunk size.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE as u64, value_parser = parse_size)]
        chunk_size: u64,
        /// zstd level.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, allow_hyphen_values = true)]
        level: i32,
        /// Disable the byte-shuffle filter.
        #[arg(long)]
        no_shuffle: bool,
        /// Keep the store for `cryo ls`/`verify`.
        #[arg(long)]
        keep: bool,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; for `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cryo: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Ls { store, job, json } => {
            let store = Store::open(&store)?;
            let rows = inspect::list(&store, job.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", inspect::render_list(&rows));
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
        Command::Gc { store, keep, job } => {
            let store = Store::open(&store)?;
            let reports = inspect::gc(&store, job.as_deref(), keep)?;
            print!("{}", inspect::render_gc(&reports));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Store {
            size,
            dir,
            chunk_size,
            level,
            no_shuffle,
            keep,
            json,
        }) => {
            let options = StoreBenchOptions {
                size,
                dir,
                chunk_size: usize::try_from(chunk_size).context("chunk size too large")?,
                level,
                filter: if no_shuffle {
                    Filter::None
                } else {
                    Filter::Shuffle8
                },
                changed_fraction: 0.05,
                keep,
            };
            let report = run_store_bench(&options)?;
            print!("{}", render_store_bench(&report));
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
