//! `cryo-bench cold-restart`: a restart whose store is not in the page
//! cache, with and without the ranks' prefetch (`rank/src/prefetch.rs`).
//!
//! One MPI job (`quiesce-bench --fill noise`, so the state does not
//! compress and the store holds about as many bytes as the ranks) is
//! preempted under `cryo run` (SIGTERM: a checkpoint, then the end). Each trial then drops the
//! job's store files from the page cache (`POSIX_FADV_DONTNEED`, no root
//! needed) and resumes the job with `cryo run --resume`, alternating
//! `CRYO_PREFETCH=0` and the default. The figure is the time from the
//! command to the last rank's "state ready" line, which each rank prints
//! as soon as its state is back. Two baselines come from the same run: the
//! same job's fresh start to its ranks' same line (launcher, agents and
//! `MPI_Init`, which the prefetch can hide behind), and a cold read of the
//! job's store files on their own.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::Instant;

use cryo_coordinator::human;
use serde::Serialize;

use crate::start::{bin_dir, median, StartBenchError};

/// `cryo-bench cold-restart` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ColdRestartArgs {
    /// Ranks of the job.
    #[arg(long, default_value_t = 2)]
    pub ranks: u32,
    /// State per rank.
    #[arg(long, value_parser = human::parse_size, default_value = "512MiB")]
    pub state: u64,
    /// Trials of each side.
    #[arg(long, default_value_t = 5)]
    pub trials: u32,
    /// Directory with `cryo` and `quiesce-bench` (default: next to this
    /// `cryo-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Each rank sleeps this long before `MPI_Init`, to stand for the
    /// launch and `MPI_Init` of a large job (seconds at scale; tens of
    /// milliseconds for a few ranks on one machine).
    #[arg(long, default_value_t = 0)]
    pub start_delay_ms: u64,
    /// Scratch directory for the store: on the filesystem to measure (not
    /// tmpfs, which keeps every page cached).
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
}

/// The figures, all in ms.
#[derive(Debug, Clone, Serialize)]
pub struct ColdRestartReport {
    /// Ranks.
    pub ranks: u32,
    /// State per rank.
    pub state_bytes: u64,
    /// The sleep before `MPI_Init`.
    pub start_delay_ms: u64,
    /// Bytes of the job's store files.
    pub store_bytes: u64,
    /// A fresh start of the job, command to every rank's state mapped.
    pub start_ms: Vec<f64>,
    /// A cold read of the store files alone.
    pub read_ms: Vec<f64>,
    /// Cold restarts with the prefetch, command to every rank restored.
    pub prefetch_ms: Vec<f64>,
    /// The same with `CRYO_PREFETCH=0`.
    pub plain_ms: Vec<f64>,
}

/// Runs the benchmark.
pub fn run_cold_restart_bench(
    args: &ColdRestartArgs,
) -> Result<ColdRestartReport, StartBenchError> {
    let bin = bin_dir(args.bin_dir.as_deref())?;
    let cryo = bin.join("cryo");
    let scratch = args
        .dir
        .join(format!("cryo-bench-cold-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| StartBenchError::Scratch {
        path: scratch.clone(),
        source,
    })?;
    let store = scratch.join("store");
    let job = |name: &str, extra: &[&str], run_secs: &str| {
        let mut cmd = Command::new(&cryo);
        cmd.current_dir(&scratch)
            .arg("run")
            .arg("--store")
            .arg(&store)
            .args(["--job", name, "-n"])
            .arg(args.ranks.to_string())
            .args(extra)
            .arg("--")
            .arg(bin.join("quiesce-bench"))
            .args(["--trials", "0", "--fill", "noise", "--run-secs", run_secs])
            .arg("--start-delay-ms")
            .arg(args.start_delay_ms.to_string())
            .arg("--state-bytes")
            .arg(args.state.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    };
    let mut report = ColdRestartReport {
        ranks: args.ranks,
        state_bytes: args.state,
        start_delay_ms: args.start_delay_ms,
        store_bytes: 0,
        start_ms: Vec::new(),
        read_ms: Vec::new(),
        prefetch_ms: Vec::new(),
        plain_ms: Vec::new(),
    };
    let result = (|| {
        // Preempted as a batch system would: SIGTERM once every rank's
        // state is filled, and `cryo run` checkpoints and ends the job.
        let ranks = usize::try_from(args.ranks).unwrap_or(1);
        preempted(&mut job("cold", &[], "600"), ranks)?;
        let files = files_under(&store.join("cold"));
        report.store_bytes = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        for trial in 0..args.trials.max(1) {
            report.start_ms.push(until_lines(
                &mut job("fresh", &[], "0"),
                ranks,
                "state ready",
            )?);
            evict(&files);
            let t = Instant::now();
            for file in &files {
                if let Ok(mut f) = std::fs::File::open(file) {
                    let _ = std::io::copy(&mut f, &mut std::io::sink());
                }
            }
            report.read_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let restart = |prefetch: bool| {
                evict(&files);
                let mut cmd = job("cold", &["--resume"], "0");
                cmd.env(
                    cryo_core::env::ENV_PREFETCH,
                    if prefetch { "1" } else { "0" },
                );
                until_lines(&mut cmd, ranks, "state ready, restarted")
            };
            if trial % 2 == 0 {
                report.prefetch_ms.push(restart(true)?);
                report.plain_ms.push(restart(false)?);
            } else {
                report.plain_ms.push(restart(false)?);
                report.prefetch_ms.push(restart(true)?);
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| report)
}

/// A `cryo run` whose stderr is read as it comes.
struct Watched {
    command: &'static str,
    child: Child,
    stderr: BufReader<ChildStderr>,
    /// What it wrote so far.
    said: String,
}

impl Watched {
    fn spawn(cmd: &mut Command, command: &'static str) -> Result<Watched, StartBenchError> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StartBenchError::Run { command, source })?;
        let stderr = child.stderr.take().ok_or_else(|| StartBenchError::Run {
            command,
            source: std::io::Error::other("no stderr pipe"),
        })?;
        Ok(Watched {
            command,
            child,
            stderr: BufReader::new(stderr),
            said: String::new(),
        })
    }

    /// Reads until `marker` was written `count` times (ranks share the
    /// pipe, so two lines may come interleaved as one); false if stderr
    /// ended first.
    fn wait_for(&mut self, marker: &str, count: usize) -> bool {
        let (mut seen, mut line) = (0, String::new());
        while seen < count {
            if self.stderr.read_line(&mut line).unwrap_or(0) == 0 {
                return false;
            }
            seen += line.matches(marker).count();
            self.said.push_str(&std::mem::take(&mut line));
        }
        true
    }

    /// Lets it finish; its status and everything it wrote.
    fn finish(mut self) -> Result<(ExitStatus, String), StartBenchError> {
        let _ = self.stderr.read_to_string(&mut self.said);
        let command = self.command;
        let status = self
            .child
            .wait()
            .map_err(|source| StartBenchError::Run { command, source })?;
        Ok((status, self.said))
    }
}

/// Runs `cmd` until `ranks` ranks say their state is ready and the
/// iterations begin, then sends it SIGTERM; it must end with a committed
/// checkpoint.
fn preempted(cmd: &mut Command, ranks: usize) -> Result<(), StartBenchError> {
    let command = "cryo run (the preempted job)";
    let mut job = Watched::spawn(cmd, command)?;
    job.wait_for("state ready", ranks);
    // The fill follows the line; the first safe point follows the fill.
    std::thread::sleep(std::time::Duration::from_secs(2));
    if let Ok(pid) = i32::try_from(job.child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let (status, said) = job.finish()?;
    if said.contains("committed") {
        return Ok(());
    }
    Err(StartBenchError::failed(command, status, &said))
}

/// Runs `cmd` and returns the ms from its start to the `count`-th time
/// `marker` is written to its stderr; then lets it finish.
fn until_lines(cmd: &mut Command, count: usize, marker: &str) -> Result<f64, StartBenchError> {
    let command = "cryo run";
    let t = Instant::now();
    let mut job = Watched::spawn(cmd, command)?;
    let at = job
        .wait_for(marker, count)
        .then(|| t.elapsed().as_secs_f64() * 1e3);
    let (status, said) = job.finish()?;
    match at {
        Some(ms) if status.success() => Ok(ms),
        _ => Err(StartBenchError::failed(command, status, &said)),
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Drops the files' clean pages from the page cache.
fn evict(files: &[PathBuf]) {
    for file in files {
        if let Ok(f) = std::fs::File::open(file) {
            let _ = f.sync_all();
            // SAFETY: advice on a descriptor we own; no memory is involved.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// The figures as text.
pub fn render_cold_restart(report: &ColdRestartReport) -> String {
    let ms = |v: &[f64]| v.iter().map(|m| m.round()).collect::<Vec<_>>();
    let (with, without) = (median(&report.prefetch_ms), median(&report.plain_ms));
    format!(
        "cold restart, {} ranks x {} of state ({} in the store), {} ms before MPI_Init, {} trials per side (median, all in ms):\n  \
         fresh start to state ready:    {:.0} {:?}\n  \
         cold read of the store alone:  {:.0} {:?}\n  \
         restart, prefetch off:         {:.0} {:?}\n  \
         restart, prefetch on:          {:.0} {:?}\n  \
         prefetch on / off {:.2}x; {:+.0} ms\n",
        report.ranks,
        human::bytes(report.state_bytes),
        human::bytes(report.store_bytes),
        report.start_delay_ms,
        report.plain_ms.len(),
        median(&report.start_ms),
        ms(&report.start_ms),
        median(&report.read_ms),
        ms(&report.read_ms),
        without,
        ms(&report.plain_ms),
        with,
        ms(&report.prefetch_ms),
        with / without.max(1e-3),
        with - without,
    )
}
