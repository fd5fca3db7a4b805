//! `cryo-bench store` (also `cryo bench store`): store throughput against
//! the `zstd` CLI and a raw write, on the same bytes in the same run. It
//! prints figures and ratios; it is a measurement, not a test, and never
//! fails on a missed target.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use cryo_coordinator::human::{self, parse_size};
use cryo_core::format::chunk::{ChunkCodec, Filter, DEFAULT_ZSTD_LEVEL};
use cryo_core::format::limits::DEFAULT_CHUNK_SIZE;
use cryo_core::format::manifest::{RankRecord, RegionKind, WriteStats};
use cryo_core::store::fs::{IoStep, IoStepError};
use cryo_core::store::reader::RegionReadError;
use cryo_core::store::writer::{BeginError, ChunkLayout, WriteError, WriterConfig};
use cryo_core::store::{CommitError, LoadError, Store, StoreError};
use rayon::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::synth::smooth_doubles_parallel;

/// `cryo-bench store` options.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Bytes of synthetic state (e.g. 512M, 2G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// Chunk size.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE as u64, value_parser = parse_size)]
    pub chunk_size: u64,
    /// zstd level.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, allow_hyphen_values = true)]
    pub level: i32,
    /// Disable the byte-shuffle filter.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Keep the store for `cryo ls`/`verify`.
    #[arg(long)]
    pub keep: bool,
    /// Also print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// State sizes at which metadata operations are counted, format 1
    /// beside format 2.
    #[arg(long, value_delimiter = ',', default_value = "1G,8G", value_parser = parse_size)]
    pub ops_sizes: Vec<u64>,
    /// Rank counts at which metadata operations are counted.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub ops_ranks: Vec<u32>,
    /// Skip the metadata count.
    #[arg(long)]
    pub no_ops: bool,
}

impl StoreArgs {
    /// What the command line asks to measure (5% of the chunks change).
    pub fn options(&self) -> Result<StoreBenchOptions, StoreBenchError> {
        Ok(StoreBenchOptions {
            size: self.size,
            dir: self.dir.clone(),
            chunk_size: usize::try_from(self.chunk_size)
                .map_err(|_| StoreBenchError::ChunkSize(self.chunk_size))?,
            level: self.level,
            filter: if self.no_shuffle {
                Filter::None
            } else {
                Filter::Shuffle8
            },
            changed_fraction: 0.05,
            keep: self.keep,
        })
    }
}

/// The store benchmark failed.
#[derive(Debug, Error)]
pub enum StoreBenchError {
    /// The state would not fit in memory.
    #[error("size {0} does not fit in memory")]
    TooLarge(u64),
    /// A zero size.
    #[error("benchmark size must be positive")]
    Empty,
    /// The chunk size does not fit the store's.
    #[error("chunk size {0} too large")]
    ChunkSize(u64),
    /// A file step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
    /// The `zstd` CLI could not be run.
    #[error("running {command}: {source}")]
    Run {
        /// The command line.
        command: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The `zstd` CLI failed.
    #[error("{command} exited with {status}")]
    Exit {
        /// The command line.
        command: &'static str,
        /// Its exit status.
        status: ExitStatus,
    },
    /// Opening the benchmark's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Starting an epoch failed.
    #[error(transparent)]
    Begin(#[from] BeginError),
    /// Writing the state failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Committing an epoch failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// Loading the manifest back failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Restoring the state failed.
    #[error(transparent)]
    Restore(#[from] RegionReadError),
    /// The restore gave other bytes.
    #[error("restored bytes differ from what was stored")]
    Differs,
    /// GC failed.
    #[error("gc: {0}")]
    Gc(String),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct StoreBenchOptions {
    /// Bytes of synthetic state.
    pub size: u64,
    /// Scratch directory (the store and baseline files go there).
    pub dir: PathBuf,
    /// Store chunk size.
    pub chunk_size: usize,
    /// zstd level.
    pub level: i32,
    /// Pre-compression filter.
    pub filter: Filter,
    /// Fraction of chunks changed for the incremental epoch.
    pub changed_fraction: f64,
    /// Keep the store afterwards (for `cryo ls` / `verify` / `describe`).
    pub keep: bool,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Seconds.
    pub seconds: f64,
    /// Bytes processed (input bytes).
    pub bytes: u64,
    /// Bytes written to storage.
    pub written: u64,
}

impl Figure {
    fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StoreBenchReport {
    /// Bytes of state.
    pub size: u64,
    /// Every figure.
    pub figures: Vec<Figure>,
    /// Store throughput over `zstd -1 -T0` throughput (target ≥ 0.9).
    pub store_vs_zstd: f64,
    /// Bytes written by the 5% epoch over the first (target ≤ 0.10).
    pub incremental_bytes_ratio: f64,
    /// Time of the 5% epoch over the first.
    pub incremental_time_ratio: f64,
    /// Full-epoch time in format 1's layout over format 2's (packs), same
    /// run, same bytes (0 in reports made before format 2).
    #[serde(default)]
    pub format1_time_ratio: f64,
    /// Compression ratio reached by the store.
    pub store_ratio: f64,
    /// Compression ratio reached by the zstd CLI.
    pub zstd_ratio: f64,
    /// Where the store is, if kept.
    pub store_dir: Option<PathBuf>,
}

fn timed<T>(f: impl FnOnce() -> Result<T, StoreBenchError>) -> Result<(T, f64), StoreBenchError> {
    let start = Instant::now();
    let value = f()?;
    Ok((value, start.elapsed().as_secs_f64()))
}

fn zstd_cli() -> Option<PathBuf> {
    let output = Command::new("zstd").arg("--version").output().ok()?;
    output.status.success().then(|| PathBuf::from("zstd"))
}

fn fsync_file(path: &Path) -> Result<(), StoreBenchError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .step("fsync", path)?;
    Ok(())
}

/// Runs the store benchmark.
pub fn run_store_bench(opts: &StoreBenchOptions) -> Result<StoreBenchReport, StoreBenchError> {
    let size = usize::try_from(opts.size).map_err(|_| StoreBenchError::TooLarge(opts.size))?;
    if size == 0 {
        return Err(StoreBenchError::Empty);
    }
    fs::create_dir_all(&opts.dir).step("creating", &opts.dir)?;
    let work = opts.dir.join(format!("cryo-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).step("creating", &work)?;

    eprintln!(
        "generating {} of smooth doubles plus noise…",
        human::bytes(opts.size)
    );
    let mut data = vec![0u8; size];
    smooth_doubles_parallel(&mut data, 1);
    let mut figures = Vec::new();

    // Baseline 1: a raw write + fsync of the same bytes.
    let raw_path = work.join("state.raw");
    let ((), secs) = timed(|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&raw_path)
            .step("creating", &raw_path)?;
        file.write_all(&data).step("raw write", &raw_path)?;
        file.sync_all().step("raw fsync", &raw_path)?;
        Ok(())
    })?;
    figures.push(Figure {
        name: "raw write + fsync".into(),
        seconds: secs,
        bytes: opts.size,
        written: opts.size,
    });

    // Baseline 2: the zstd CLI on the same bytes (from the page cache).
    let zst_path = work.join("state.raw.zst");
    let mut zstd_secs = None;
    let mut zstd_ratio = 0.0;
    if let Some(zstd) = zstd_cli() {
        let level = format!("-{}", opts.level.max(1));
        let ((), secs) = timed(|| {
            let status = Command::new(&zstd)
                .args([level.as_str(), "-T0", "-q", "-f"])
                .arg(&raw_path)
                .arg("-o")
                .arg(&zst_path)
                .status()
                .map_err(|source| StoreBenchError::Run {
                    command: "zstd",
                    source,
                })?;
            if !status.success() {
                return Err(StoreBenchError::Exit {
                    command: "zstd",
                    status,
                });
            }
            Ok(())
        })?;
        let ((), sync_secs) = timed(|| fsync_file(&zst_path))?;
        let written = fs::metadata(&zst_path).map(|m| m.len()).unwrap_or(0);
        zstd_ratio = opts.size as f64 / written.max(1) as f64;
        figures.push(Figure {
            name: format!("zstd {level} -T0 (CLI)"),
            seconds: secs,
            bytes: opts.size,
            written,
        });
        figures.push(Figure {
            name: format!("zstd {level} -T0 (CLI) + fsync"),
            seconds: secs + sync_secs,
            bytes: opts.size,
            written,
        });
        let out_path = work.join("state.unzst");
        let ((), secs) = timed(|| {
            let status = Command::new(&zstd)
                .args(["-d", "-T0", "-q", "-f"])
                .arg(&zst_path)
                .arg("-o")
                .arg(&out_path)
                .status()
                .map_err(|source| StoreBenchError::Run {
                    command: "zstd -d",
                    source,
                })?;
            if !status.success() {
                return Err(StoreBenchError::Exit {
                    command: "zstd -d",
                    status,
                });
            }
            Ok(())
        })?;
        figures.push(Figure {
            name: "zstd -d -T0 (CLI)".into(),
            seconds: secs,
            bytes: opts.size,
            written: opts.size,
        });
        zstd_secs = Some(figures[1].seconds);
        let _ = fs::remove_file(&out_path);
    } else {
        eprintln!("warning: no zstd command found; install the zstd package for the baseline");
    }
    let _ = fs::remove_file(&raw_path);
    let _ = fs::remove_file(&zst_path);

    // The store: epoch 1 (full), then epoch 2 with a fraction of chunks changed.
    let store = Store::create(work.join("store"))?;
    let job = store.job("bench")?;
    let config = WriterConfig {
        chunk_size: opts.chunk_size,
        codec: ChunkCodec {
            level: opts.level,
            filter: opts.filter,
        },
        layout: ChunkLayout::default(),
    };
    let chunk_size = u32::try_from(opts.chunk_size)
        .map_err(|_| StoreBenchError::ChunkSize(opts.chunk_size as u64))?;
    let write_epoch = |epoch: u64, data: &[u8]| -> Result<WriteStats, StoreBenchError> {
        let writer = job.begin_epoch(epoch, config)?;
        let rank = writer.rank(0);
        let region = rank.store_region("state", 0x5a00_0000_0000, RegionKind::Anonymous, data)?;
        let stats = rank.finish(bench_record(region))?;
        drop(writer);
        job.commit_epoch(epoch, 1, chunk_size)?;
        Ok(stats)
    };
    let (first, first_secs) = timed(|| write_epoch(1, &data))?;
    figures.push(Figure {
        name: "cryo store, full epoch".into(),
        seconds: first_secs,
        bytes: opts.size,
        written: first.new_stored_bytes,
    });
    // The same epoch in format 1's layout (one file per chunk), same run.
    let loose_store = Store::create(work.join("store-format1"))?;
    let loose_job = loose_store.job("bench")?;
    let loose_config = WriterConfig {
        layout: ChunkLayout::Loose,
        ..config
    };
    let (loose, loose_secs) = timed(|| {
        let writer = loose_job.begin_epoch(1, loose_config)?;
        let rank = writer.rank(0);
        let region = rank.store_region("state", 0x5a00_0000_0000, RegionKind::Anonymous, &data)?;
        let stats = rank.finish(bench_record(region))?;
        drop(writer);
        loose_job.commit_epoch(1, 1, chunk_size)?;
        Ok(stats)
    })?;
    figures.push(Figure {
        name: "format 1 layout (file per chunk), full".into(),
        seconds: loose_secs,
        bytes: opts.size,
        written: loose.new_stored_bytes,
    });
    let _ = fs::remove_dir_all(work.join("store-format1"));

    let chunks = size.div_ceil(opts.chunk_size);
    let every = (1.0 / opts.changed_fraction.clamp(1e-6, 1.0))
        .round()
        .max(1.0);
    // Rounded positive stride; truncation is intended.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let every = every as usize;
    let mut changed = 0;
    for chunk in (0..chunks).step_by(every) {
        let at = chunk * opts.chunk_size;
        data[at] ^= 0x5a;
        changed += 1;
    }
    let (second, second_secs) = timed(|| write_epoch(2, &data))?;
    figures.push(Figure {
        name: format!("cryo store, {changed}/{chunks} chunks changed"),
        seconds: second_secs,
        bytes: opts.size,
        written: second.new_stored_bytes,
    });

    // Restore into a pre-faulted buffer, as the rank runtime does.
    let manifest = job.load_manifest(2)?;
    let mut restored = vec![0u8; size];
    restored.par_chunks_mut(4096).for_each(|page| page[0] = 1);
    let ((), secs) = timed(|| {
        job.restore_region(&manifest.ranks[0].regions[0], &mut restored)?;
        Ok(())
    })?;
    if restored != data {
        return Err(StoreBenchError::Differs);
    }
    figures.push(Figure {
        name: "cryo restore (decode + verify)".into(),
        seconds: secs,
        bytes: opts.size,
        written: 0,
    });

    let store_vs_zstd = zstd_secs.map_or(0.0, |z| z / first_secs);
    let report = StoreBenchReport {
        size: opts.size,
        store_vs_zstd,
        incremental_bytes_ratio: second.new_stored_bytes as f64
            / first.new_stored_bytes.max(1) as f64,
        incremental_time_ratio: second_secs / first_secs,
        format1_time_ratio: loose_secs / first_secs,
        store_ratio: opts.size as f64 / first.new_stored_bytes.max(1) as f64,
        zstd_ratio,
        figures,
        store_dir: opts.keep.then(|| store.root().to_owned()),
    };
    if !opts.keep {
        let _ = fs::remove_dir_all(&work);
    }
    Ok(report)
}

/// Renders the report as a table with ratios against targets.
pub fn render_store_bench(report: &StoreBenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "state: {} of smooth doubles plus noise",
        human::bytes(report.size)
    );
    let _ = writeln!(
        out,
        "{:<40} {:>9} {:>11} {:>12}",
        "figure", "seconds", "throughput", "written"
    );
    for figure in &report.figures {
        let _ = writeln!(
            out,
            "{:<40} {:>9.3} {:>6.2} GB/s {:>12}",
            figure.name,
            figure.seconds,
            figure.gbps(),
            human::bytes(figure.written)
        );
    }
    let verdict = |ok: bool| if ok { "meets target" } else { "MISSES target" };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "store / zstd CLI throughput     {:>6.2}x  (target >= 0.90x: {})",
        report.store_vs_zstd,
        verdict(report.store_vs_zstd >= 0.9)
    );
    let _ = writeln!(
        out,
        "incremental bytes written       {:>6.2}%  (target <= 10%: {})",
        report.incremental_bytes_ratio * 100.0,
        verdict(report.incremental_bytes_ratio <= 0.10)
    );
    let _ = writeln!(
        out,
        "incremental time                {:>6.2}%  of the full epoch",
        report.incremental_time_ratio * 100.0
    );
    let _ = writeln!(
        out,
        "format 1 layout / packs time    {:>6.2}x  (full epoch, same bytes)",
        report.format1_time_ratio
    );
    let _ = writeln!(
        out,
        "compression ratio               {:>6.2}x  (zstd CLI: {:.2}x)",
        report.store_ratio, report.zstd_ratio
    );
    if let Some(dir) = &report.store_dir {
        let _ = writeln!(out, "store kept at {}", dir.display());
    }
    out
}

/// A benchmark rank's record around its one region (`finish` sets the
/// rank).
pub(crate) fn bench_record(region: cryo_core::format::manifest::RegionRecord) -> RankRecord {
    RankRecord {
        rank: 0,
        node: "bench".into(),
        pid: std::process::id(),
        fds: Vec::new(),
        mappings: Vec::new(),
        regions: vec![region],
        stats: WriteStats::default(),
        warnings: Vec::new(),
        cwd: String::new(),
        process: Default::default(),
    }
}
