//! `cryo-bench start`: how much longer a job takes under `cryo run` than
//! under its launcher alone, the agents' start (and their copy budget's
//! pre-faulting) included.
//!
//! Each trial runs the same short MPI job twice, in alternating order:
//! `mpiexec -n N quiesce-bench` and `cryo run -n N -- quiesce-bench`. The
//! job initialises MPI and cryo, fills a region of `--state` per rank (as an
//! application fills its arrays at start), runs a few iterations and ends.
//! Wall time is command to exit. The figure is the difference of the
//! medians, and its ratio to the plain job (target <= 1.10).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use cryo_coordinator::human;
use serde::Serialize;
use thiserror::Error;

/// `cryo-bench start` options.
#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    /// Ranks of the job.
    #[arg(long, default_value_t = 2)]
    pub ranks: u32,
    /// State each rank fills at start.
    #[arg(long, value_parser = human::parse_size, default_value = "256MiB")]
    pub state: u64,
    /// Trials of each side.
    #[arg(long, default_value_t = 7)]
    pub trials: u32,
    /// Directory with `cryo` and `quiesce-bench` (default: next to this
    /// `cryo-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Scratch directory for the store.
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
}

/// The start benchmark could not run.
#[derive(Debug, Error)]
pub enum StartBenchError {
    /// This executable could not be found.
    #[error("finding this executable: {0}")]
    CurrentExe(std::io::Error),
    /// A binary is missing.
    #[error("{} not found: cargo build --release (-p cryo-heat2d for quiesce-bench), or pass --bin-dir", .0.display())]
    Missing(PathBuf),
    /// A job could not be run.
    #[error("running {command}: {source}")]
    Run {
        /// The command.
        command: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A job failed.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        command: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// The scratch directory could not be made.
    #[error("scratch directory {}: {source}", path.display())]
    Scratch {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl StartBenchError {
    /// `command` ended with `status`; `stderr` is all it wrote there, of
    /// which the error keeps the last lines.
    pub(crate) fn failed(
        command: &'static str,
        status: std::process::ExitStatus,
        stderr: &str,
    ) -> StartBenchError {
        let lines: Vec<&str> = stderr.lines().collect();
        StartBenchError::Failed {
            command,
            status,
            stderr: lines[lines.len().saturating_sub(4)..].join(" / "),
        }
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct StartReport {
    /// Ranks.
    pub ranks: u32,
    /// State per rank.
    pub state_bytes: u64,
    /// Each plain job's wall time, ms.
    pub plain_ms: Vec<f64>,
    /// Each `cryo run` job's wall time, ms.
    pub cryo_ms: Vec<f64>,
}

impl StartReport {
    /// The median of the plain jobs.
    pub fn plain_median_ms(&self) -> f64 {
        median(&self.plain_ms)
    }
    /// The median of the jobs under `cryo run`.
    pub fn cryo_median_ms(&self) -> f64 {
        median(&self.cryo_ms)
    }
    /// `cryo run`'s median over the plain one.
    pub fn ratio(&self) -> f64 {
        self.cryo_median_ms() / self.plain_median_ms().max(1e-3)
    }
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs the benchmark.
pub fn run_start_bench(args: &StartArgs) -> Result<StartReport, StartBenchError> {
    let bin = bin_dir(args.bin_dir.as_deref())?;
    let (cryo, program) = (bin.join("cryo"), bin.join("quiesce-bench"));
    let scratch = args
        .dir
        .join(format!("cryo-bench-start-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| StartBenchError::Scratch {
        path: scratch.clone(),
        source,
    })?;
    let job_args = |cmd: &mut Command| {
        cmd.arg(&program)
            .args(["--iters", "20", "--trials", "1", "--state-bytes"])
            .arg(args.state.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
    };
    let mut report = StartReport {
        ranks: args.ranks,
        state_bytes: args.state,
        plain_ms: Vec::new(),
        cryo_ms: Vec::new(),
    };
    let result = (|| {
        for trial in 0..args.trials.max(1) {
            let plain = || {
                let mut cmd = Command::new("mpiexec");
                cmd.arg("-n")
                    .arg(args.ranks.to_string())
                    .env_remove("CRYO_AGENT_SOCKET");
                job_args(&mut cmd);
                timed("mpiexec", &mut cmd)
            };
            let with_cryo = || {
                let mut cmd = Command::new(&cryo);
                cmd.env("CRYO_STORE", scratch.join("store"))
                    .args(["run", "--job", &format!("start{trial}"), "-n"])
                    .arg(args.ranks.to_string())
                    .arg("--scratch")
                    .arg(scratch.join("scratch"))
                    .arg("--");
                job_args(&mut cmd);
                timed("cryo run", &mut cmd)
            };
            // Alternate which side goes first, so drift hits both alike.
            if trial % 2 == 0 {
                report.plain_ms.push(plain()?);
                report.cryo_ms.push(with_cryo()?);
            } else {
                report.cryo_ms.push(with_cryo()?);
                report.plain_ms.push(plain()?);
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| report)
}

/// The directory with `cryo` and `quiesce-bench`: `given`, or this
/// executable's.
pub(crate) fn bin_dir(given: Option<&Path>) -> Result<PathBuf, StartBenchError> {
    let bin = match given {
        Some(dir) => dir.to_path_buf(),
        None => std::env::current_exe()
            .map_err(StartBenchError::CurrentExe)?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    for name in ["cryo", "quiesce-bench"] {
        if !bin.join(name).exists() {
            return Err(StartBenchError::Missing(bin.join(name)));
        }
    }
    Ok(bin)
}

fn timed(command: &'static str, cmd: &mut Command) -> Result<f64, StartBenchError> {
    let t = Instant::now();
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| StartBenchError::Run { command, source })?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        return Err(StartBenchError::failed(
            command,
            out.status,
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(ms)
}

/// The figures as text.
pub fn render_start(report: &StartReport) -> String {
    format!(
        "job start and end, {} ranks x {} of state each, {} trials per side (median, all in ms):\n  \
         mpiexec alone: {:.0} ms {:?}\n  \
         cryo run:      {:.0} ms {:?}\n  \
         cryo run / mpiexec {:.2}x (target <= 1.10x); {:+.0} ms\n",
        report.ranks,
        human::bytes(report.state_bytes),
        report.plain_ms.len(),
        report.plain_median_ms(),
        report.plain_ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
        report.cryo_median_ms(),
        report.cryo_ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
        report.ratio(),
        report.cryo_median_ms() - report.plain_median_ms()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 3.0, 2.0]) - 2.5).abs() < 1e-9);
        assert!(median(&[]).abs() < 1e-9);
    }
}
