//! The metadata cost of the store, counted (not timed): files created,
//! renames, links, fsyncs and syncfs calls, unlinks, directories created and
//! directories touched, for one full checkpoint, one 5% incremental
//! checkpoint and one GC, in format 1 (one file per chunk) and format 2
//! (packs) side by side, with a projection to a large machine.
//!
//! Every operation the store performs goes through its `StoreFs`; this
//! module counts them with [`CountingFs`] over the real filesystem, so the
//! counts are those of the real code path, with real data written.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cryo_coordinator::human;
use cryo_core::format::chunk::ChunkCodec;
use cryo_core::format::manifest::RegionKind;
use cryo_core::store::durable::RealFs;
use cryo_core::store::fs::{FileStat, IoStepError, ReadCappedError, StoreFs};
use cryo_core::store::writer::{ChunkLayout, WriterConfig};
use cryo_core::store::{GcOptions, JobStore, Store};
use serde::Serialize;

use crate::store::{bench_record, StoreBenchError};
use crate::synth::smooth_doubles_parallel;

/// Metadata operations, as counted.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct OpCounts {
    /// Files created (temp files included).
    pub created: u64,
    /// Renames.
    pub renamed: u64,
    /// Hard links (the manifest's publication).
    pub linked: u64,
    /// fsync/fdatasync of files and directories.
    pub fsyncs: u64,
    /// syncfs calls.
    pub syncfs: u64,
    /// Files and directories removed.
    pub unlinked: u64,
    /// Directories created.
    pub mkdirs: u64,
    /// Distinct directories whose entries changed or were synced.
    pub dirs_touched: u64,
}

impl OpCounts {
    /// Every namespace-changing operation a metadata server handles.
    pub fn namespace_ops(&self) -> u64 {
        self.created + self.renamed + self.linked + self.unlinked + self.mkdirs
    }
}

/// A [`StoreFs`] that counts what the store asks of the real filesystem.
#[derive(Debug, Default)]
pub struct CountingFs {
    created: AtomicU64,
    renamed: AtomicU64,
    linked: AtomicU64,
    fsyncs: AtomicU64,
    syncfs: AtomicU64,
    unlinked: AtomicU64,
    mkdirs: AtomicU64,
    dirs: Mutex<HashSet<PathBuf>>,
}

impl CountingFs {
    /// The counts so far, reset to zero.
    pub fn take(&self) -> OpCounts {
        let take = |n: &AtomicU64| n.swap(0, Ordering::Relaxed);
        let dirs = self
            .dirs
            .lock()
            .map(|mut d| std::mem::take(&mut *d).len() as u64)
            .unwrap_or(0);
        OpCounts {
            created: take(&self.created),
            renamed: take(&self.renamed),
            linked: take(&self.linked),
            fsyncs: take(&self.fsyncs),
            syncfs: take(&self.syncfs),
            unlinked: take(&self.unlinked),
            mkdirs: take(&self.mkdirs),
            dirs_touched: dirs,
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn touch(&self, dir: &Path) {
        if let Ok(mut dirs) = self.dirs.lock() {
            dirs.insert(dir.to_owned());
        }
    }

    fn touch_parent(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            self.touch(parent);
        }
    }
}

/// Files and directories under `path`, itself included.
fn count_tree(path: &Path) -> u64 {
    let mut n = 1;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            n += count_tree(&entry.path());
        }
    }
    n
}

impl StoreFs for CountingFs {
    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        RealFs.stat(path)
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), IoStepError> {
        if !path.is_dir() {
            let mut missing = path;
            loop {
                Self::bump(&self.mkdirs);
                self.touch_parent(missing);
                match missing.parent() {
                    Some(parent) if !parent.is_dir() => missing = parent,
                    _ => break,
                }
            }
        }
        RealFs.create_dir_all(path)
    }

    fn check_private_dir(&self, path: &Path) -> Result<(), IoStepError> {
        RealFs.check_private_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        RealFs.list_dir(path)
    }

    fn write_file(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(), IoStepError> {
        Self::bump(&self.created);
        if sync {
            Self::bump(&self.fsyncs);
        }
        self.touch_parent(path);
        RealFs.write_file(path, parts, sync)
    }

    fn read_capped_into(
        &self,
        path: &Path,
        max: u64,
        bytes: &mut Vec<u8>,
    ) -> Result<(), ReadCappedError> {
        RealFs.read_capped_into(path, max, bytes)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        Self::bump(&self.renamed);
        self.touch_parent(from);
        self.touch_parent(to);
        RealFs.rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        Self::bump(&self.linked);
        self.touch_parent(to);
        RealFs.hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        Self::bump(&self.unlinked);
        self.touch_parent(path);
        RealFs.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.unlinked.fetch_add(count_tree(path), Ordering::Relaxed);
        self.touch_parent(path);
        RealFs.remove_dir_all(path)
    }

    fn open_dir(&self, path: &Path) -> io::Result<File> {
        RealFs.open_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), IoStepError> {
        Self::bump(&self.fsyncs);
        self.touch(path);
        RealFs.sync_dir(path)
    }

    fn sync_filesystem(&self, anchor: &File, path: &Path) -> io::Result<()> {
        Self::bump(&self.syncfs);
        RealFs.sync_filesystem(anchor, path)
    }

    fn open_lock(&self, path: &Path) -> io::Result<File> {
        RealFs.open_lock(path)
    }

    fn create_pack(&self, path: &Path) -> io::Result<File> {
        Self::bump(&self.created);
        self.touch_parent(path);
        RealFs.create_pack(path)
    }

    fn write_at(&self, file: &File, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        RealFs.write_at(file, path, offset, parts)
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        Self::bump(&self.fsyncs);
        RealFs.sync_data(file, path)
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        RealFs.open_read(path)
    }

    fn read_at(&self, file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        RealFs.read_at(file, path, offset, buf)
    }

    fn advise_willneed(&self, file: &File, path: &Path, offset: u64, len: u64) -> io::Result<()> {
        RealFs.advise_willneed(file, path, offset, len)
    }
}

/// One counted operation.
#[derive(Debug, Clone, Serialize)]
pub struct OpsRow {
    /// 1 (a file per chunk) or 2 (packs).
    pub format: u8,
    /// Bytes of state over all ranks.
    pub state_bytes: u64,
    /// Ranks (one agent writes them all).
    pub ranks: u32,
    /// `full`, `incremental 5%` or `gc`.
    pub operation: &'static str,
    /// What it cost.
    pub counts: OpCounts,
    /// How long it took (for orientation; the counts are the point).
    pub seconds: f64,
}

/// The whole count.
#[derive(Debug, Clone, Serialize)]
pub struct OpsReport {
    /// Every row.
    pub rows: Vec<OpsRow>,
    /// Chunk size.
    pub chunk_size: usize,
}

/// Counts a full checkpoint, a 5% incremental one and a GC for each format,
/// state size and rank count.
pub fn run_ops(
    sizes: &[u64],
    ranks: &[u32],
    dir: &Path,
    chunk_size: usize,
) -> Result<OpsReport, StoreBenchError> {
    let mut rows = Vec::new();
    for &size in sizes {
        for &nranks in ranks {
            let per_rank = usize::try_from(size / u64::from(nranks.max(1)))
                .map_err(|_| StoreBenchError::TooLarge(size))?;
            let mut data: Vec<Vec<u8>> = (0..nranks)
                .map(|rank| {
                    let mut bytes = vec![0u8; per_rank];
                    smooth_doubles_parallel(
                        &mut bytes,
                        (u64::from(rank) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    bytes
                })
                .collect();
            for format in [1u8, 2] {
                let layout = if format == 1 {
                    ChunkLayout::Loose
                } else {
                    ChunkLayout::default()
                };
                rows.extend(count_one(dir, format, layout, size, &mut data, chunk_size)?);
            }
        }
    }
    Ok(OpsReport { rows, chunk_size })
}

fn count_one(
    dir: &Path,
    format: u8,
    layout: ChunkLayout,
    size: u64,
    data: &mut [Vec<u8>],
    chunk_size: usize,
) -> Result<Vec<OpsRow>, StoreBenchError> {
    let work = dir.join(format!("cryo-bench-ops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let fs = Arc::new(CountingFs::default());
    let store = Store::create_with_fs(&work, Arc::clone(&fs) as Arc<dyn StoreFs>)?;
    let job = store.job("ops")?;
    let config = WriterConfig {
        chunk_size,
        codec: ChunkCodec::default(),
        layout,
    };
    let ranks = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let row = |operation, counts, seconds| OpsRow {
        format,
        state_bytes: size,
        ranks,
        operation,
        counts,
        seconds,
    };
    let mut rows = Vec::new();
    fs.take();
    let started = Instant::now();
    write_epoch(&job, 1, config, data)?;
    rows.push(row("full", fs.take(), started.elapsed().as_secs_f64()));
    for bytes in data.iter_mut() {
        for at in (0..bytes.len()).step_by(chunk_size * 20) {
            bytes[at] ^= 0x5a;
        }
    }
    let started = Instant::now();
    write_epoch(&job, 2, config, data)?;
    rows.push(row(
        "incremental 5%",
        fs.take(),
        started.elapsed().as_secs_f64(),
    ));
    // Undo the change, so the next format writes the same bytes.
    for bytes in data.iter_mut() {
        for at in (0..bytes.len()).step_by(chunk_size * 20) {
            bytes[at] ^= 0x5a;
        }
    }
    let started = Instant::now();
    job.gc_with(GcOptions {
        keep: Some(1),
        ..GcOptions::default()
    })
    .map_err(|err| StoreBenchError::Gc(err.to_string()))?;
    rows.push(row(
        "gc (keep 1)",
        fs.take(),
        started.elapsed().as_secs_f64(),
    ));
    let _ = std::fs::remove_dir_all(&work);
    Ok(rows)
}

fn write_epoch(
    job: &JobStore,
    epoch: u64,
    config: WriterConfig,
    data: &[Vec<u8>],
) -> Result<(), StoreBenchError> {
    let writer = job.begin_epoch(epoch, config)?;
    for (rank, bytes) in data.iter().enumerate() {
        let rank = u32::try_from(rank).unwrap_or(u32::MAX);
        let rank_writer = writer.rank(rank);
        let region =
            rank_writer.store_region("state", 0x5a00_0000_0000, RegionKind::Anonymous, bytes)?;
        rank_writer.finish(bench_record(region))?;
    }
    drop(writer);
    let chunk_size = u32::try_from(config.chunk_size).unwrap_or(u32::MAX);
    let ranks = u32::try_from(data.len()).unwrap_or(u32::MAX);
    job.commit_epoch(epoch, ranks, chunk_size)?;
    Ok(())
}

/// Nodes, state per node and creates per second of the projection.
const NODES: f64 = 1000.0;
const NODE_BYTES: f64 = 100e9;
const CREATE_RATES: [f64; 2] = [15_000.0, 30_000.0];

/// Renders the counts and the projection to 1,000 nodes × 100 GB.
pub fn render_ops(report: &OpsReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmetadata operations (counted; one agent writes every rank; chunk {})",
        human::bytes(report.chunk_size as u64)
    );
    let _ = writeln!(
        out,
        "{:<3} {:>8} {:>5} {:<15} {:>8} {:>7} {:>5} {:>7} {:>6} {:>8} {:>6} {:>6} {:>8}",
        "fmt",
        "state",
        "ranks",
        "operation",
        "created",
        "renames",
        "links",
        "fsyncs",
        "syncfs",
        "unlinks",
        "mkdirs",
        "dirs",
        "seconds"
    );
    for row in &report.rows {
        let c = &row.counts;
        let _ = writeln!(
            out,
            "{:<3} {:>8} {:>5} {:<15} {:>8} {:>7} {:>5} {:>7} {:>6} {:>8} {:>6} {:>6} {:>8.2}",
            row.format,
            human::bytes(row.state_bytes),
            row.ranks,
            row.operation,
            c.created,
            c.renamed,
            c.linked,
            c.fsyncs,
            c.syncfs,
            c.unlinked,
            c.mkdirs,
            c.dirs_touched,
            row.seconds
        );
    }
    render_projection(report, &mut out);
    out
}

/// Creates per node at 100 GB, fitted as a line through the two largest
/// state sizes measured at the largest rank count, then times 1,000 nodes.
fn render_projection(report: &OpsReport, out: &mut String) {
    let Some(ranks) = report.rows.iter().map(|r| r.ranks).max() else {
        return;
    };
    let _ = writeln!(
        out,
        "\nprojection: {NODES} nodes x 100 GB per node ({ranks} ranks per node as measured), files created per checkpoint"
    );
    let _ = writeln!(
        out,
        "{:<3} {:<15} {:>14} {:>16} {:>16}",
        "fmt", "operation", "creates", "at 15k/s", "at 30k/s"
    );
    for format in [1u8, 2] {
        for operation in ["full", "incremental 5%"] {
            let mut points: Vec<(f64, f64)> = report
                .rows
                .iter()
                .filter(|r| r.format == format && r.ranks == ranks && r.operation == operation)
                .map(|r| (r.state_bytes as f64, r.counts.created as f64))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let per_node = match points.as_slice() {
                [] => continue,
                [(x, y)] => y / x * NODE_BYTES,
                [.., (x0, y0), (x1, y1)] => {
                    let slope = (y1 - y0) / (x1 - x0);
                    (y0 + slope * (NODE_BYTES - x0)).max(*y1)
                }
            };
            let total = per_node * NODES;
            let time = |rate: f64| duration(total / rate);
            let _ = writeln!(
                out,
                "{:<3} {:<15} {:>14.0} {:>16} {:>16}",
                format,
                operation,
                total,
                time(CREATE_RATES[0]),
                time(CREATE_RATES[1])
            );
        }
    }
}

/// Seconds as `1h 46m`, `12m 5s` or `3.2 s`.
fn duration(seconds: f64) -> String {
    if seconds >= 3600.0 {
        format!(
            "{:.0}h {:02.0}m",
            (seconds / 3600.0).floor(),
            (seconds % 3600.0) / 60.0
        )
    } else if seconds >= 60.0 {
        format!("{:.0}m {:02.0}s", (seconds / 60.0).floor(), seconds % 60.0)
    } else {
        format!("{seconds:.1} s")
    }
}
