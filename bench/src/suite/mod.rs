//! `cryo bench`: the whole performance suite in one command.
//!
//! It runs, as subprocesses, `cryo-agent bench` (real ranks checkpointed and
//! restarted by a real agent) over a sweep of state sizes and of rank
//! counts, `quiesce-bench` under `mpiexec` (the safe point's cost) and under
//! `cryo run` (quiesce latency), and in-process `cryo bench store` (the
//! incremental checkpoint). Every figure is measured in the same run as its
//! baseline, on the same bytes. It prints a table with the ratios against
//! their targets and least-squares slopes of how each figure grows, and
//! writes `report.json`, `report.txt` and `bench.svg` (pause time and
//! throughput against state size). It measures; it never fails on a missed
//! target.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench::{run_store_bench, StoreBenchOptions, StoreBenchReport};
use crate::human;

const MIB: u64 = 1 << 20;

/// `cryo bench` options (without a subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Short run: small sizes and rank counts (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// State sizes per node for the size sweep (one rank), e.g.
    /// 256MiB,1GiB. Default: 64MiB,256MiB with --quick, else
    /// 256MiB,512MiB,1GiB,2GiB,4GiB.
    #[arg(long, value_delimiter = ',', value_parser = crate::human::parse_size)]
    pub sizes: Vec<u64>,
    /// Rank counts for the rank sweep. Default: 1,2 with --quick, else
    /// 1,2,4,8,16.
    #[arg(long, value_delimiter = ',')]
    pub ranks: Vec<u32>,
    /// State per rank in the rank sweep. Default: 64MiB with --quick, else
    /// 128MiB.
    #[arg(long, value_parser = crate::human::parse_size)]
    pub rank_size: Option<u64>,
    /// Rank counts for the MPI quiesce figures (skipped without `mpiexec`).
    /// Default: 2 with --quick, else 2,4,8,16.
    #[arg(long, value_delimiter = ',')]
    pub quiesce_ranks: Vec<u32>,
    /// Where the report, JSON and SVG go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Scratch directory for stores and baselines (on the disk to measure).
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// Directory with `cryo-agent`, `cryo-counter` and `quiesce-bench`
    /// (default: next to this `cryo`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Hold an exclusive flock(2) on this file during each measurement, so
    /// cooperating builds on a shared machine wait instead of skewing it.
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Skip the MPI quiesce figures.
    #[arg(long)]
    pub no_quiesce: bool,
    /// `CRYO_QUIESCE_SLACK` for the MPI quiesce figures: `auto` (the
    /// runtime's default: 20 ms worth of safe points, at least 12) or a
    /// fixed number of safe points a rank may run past joining an agreement.
    #[arg(long, default_value = "auto")]
    pub quiesce_slack: String,
}

/// One configuration of `cryo-agent bench` (its `--json` output).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRun {
    /// Ranks on the node.
    pub procs: u32,
    /// State bytes per rank.
    pub size: u64,
    /// The agent's copy budget.
    pub copy_budget: u64,
    /// Bytes captured per rank.
    pub rank_bytes: Vec<u64>,
    /// Each rank's pause.
    pub pause_ns: Vec<u64>,
    /// Each rank's copy time.
    pub copy_ns: Vec<u64>,
    /// memcpy of one rank's bytes.
    pub memcpy_ns: u64,
    /// memcpy of all ranks' bytes.
    pub node_memcpy_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Request to every rank resumed.
    pub resumed_ns: u64,
    /// `zstd -1 -T0` on the same bytes.
    pub zstd_ns: Option<u64>,
    /// `zstd -d -T0` of the same bytes.
    pub zstd_d_ns: Option<u64>,
    /// Process start to every region restored.
    pub restart_ns: u64,
    /// Raw bytes checkpointed.
    pub raw_bytes: u64,
    /// Bytes written.
    pub stored_bytes: u64,
    /// Agent peak RSS.
    pub peak_rss_bytes: u64,
    /// The worst rank's pause in each full checkpoint; `pause_ns` is the
    /// smallest sample.
    #[serde(default)]
    pub pause_samples_ns: Vec<u64>,
    /// The incremental checkpoint after the ranks changed 5% of their
    /// chunks.
    #[serde(default)]
    pub incremental: Option<IncrementalRun>,
}

/// An end-to-end incremental checkpoint (`cryo-agent bench`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncrementalRun {
    /// Steps rank 0 took in between (four change one chunk).
    pub steps: u64,
    /// Region bytes of all ranks.
    pub bytes: u64,
    /// Bytes copied (written since the previous checkpoint).
    pub copied_bytes: u64,
    /// Worst rank's pause.
    pub pause_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
}

impl AgentRun {
    /// Incremental checkpoint time over the first (full) checkpoint's.
    fn incremental_time_ratio(&self) -> Option<f64> {
        self.incremental
            .as_ref()
            .map(|i| ratio(i.checkpoint_ns, self.checkpoint_ns))
    }
    /// Bytes the incremental checkpoint wrote over the full one's.
    fn incremental_bytes_ratio(&self) -> Option<f64> {
        self.incremental
            .as_ref()
            .map(|i| ratio(i.stored_bytes, self.stored_bytes))
    }
    fn worst_pause_ns(&self) -> u64 {
        self.pause_ns.iter().copied().max().unwrap_or(0)
    }
    fn pause_ratio(&self) -> f64 {
        ratio(self.worst_pause_ns(), self.node_memcpy_ns)
    }
    fn checkpoint_ratio(&self) -> Option<f64> {
        self.zstd_ns.map(|z| ratio(self.checkpoint_ns, z))
    }
    fn restart_ratio(&self) -> Option<f64> {
        self.zstd_d_ns.map(|z| ratio(self.restart_ns, z))
    }
    fn rss_over_budget(&self) -> i64 {
        i64::try_from(self.peak_rss_bytes).unwrap_or(i64::MAX)
            - i64::try_from(self.copy_budget).unwrap_or(i64::MAX)
    }
}

/// The safe point's cost at one rank count (`quiesce-bench --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafePointRun {
    /// Ranks.
    pub ranks: u32,
    /// What an iteration's work counts: `cpu` (the rank's CPU time) or
    /// `clock` (wall clock; reports written before `cpu` existed).
    #[serde(default = "clock_work")]
    pub work: String,
    /// One iteration's work.
    pub iter_ns: f64,
    /// Fastest block without safe points, per iteration.
    pub plain_min_ns: f64,
    /// Fastest block with safe points, per iteration.
    pub with_min_ns: f64,
    /// Difference of the minima.
    pub safe_point_ns: f64,
    /// Difference of the medians.
    pub safe_point_median_ns: f64,
    /// Spread of the two fastest plain blocks.
    pub noise_floor_ns: f64,
    /// The A/A control: the difference of the minima of two sides that both
    /// run without safe points (0 in reports made before it existed).
    #[serde(default)]
    pub control_ns: f64,
    /// The safe point's own CPU time, most of any rank (0 in reports made
    /// before it was measured).
    #[serde(default)]
    pub cpu_ns: f64,
}

fn clock_work() -> String {
    "clock".into()
}

impl SafePointRun {
    /// The safe point's cost as a share of the iteration as it ran without
    /// safe points: with more ranks than cores a CPU-time iteration takes
    /// longer than its work, and this is what the application slows down by.
    pub fn share_percent(&self) -> f64 {
        self.share_of_iteration(self.safe_point_ns)
    }

    /// `ns` as a share of the iteration as it ran, in percent.
    fn share_of_iteration(&self, ns: f64) -> f64 {
        ns / self.plain_min_ns.max(self.iter_ns) * 100.0
    }

    /// What of the difference noise alone cannot explain: the part beyond
    /// the A/A control's difference, as a share of the iteration.
    pub fn beyond_noise_percent(&self) -> f64 {
        self.share_of_iteration((self.safe_point_ns - self.control_ns.abs()).max(0.0))
    }

    /// The safe point's own CPU time as a share of the iteration.
    pub fn cpu_percent(&self) -> f64 {
        self.share_of_iteration(self.cpu_ns)
    }
}

/// Quiesce latency under `cryo run` at one rank count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuiesceRun {
    /// Ranks (two emulated nodes).
    pub ranks: u32,
    /// State per rank.
    pub state_bytes: u64,
    /// Request to last rank parked, per checkpoint.
    pub quiesce_ms: Vec<f64>,
    /// Longest rank pause, per checkpoint.
    pub pause_ms: Vec<f64>,
}

/// A least-squares line `y = slope * x + intercept`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fit {
    /// What is fitted.
    pub name: String,
    /// Unit of x.
    pub x_unit: String,
    /// Unit of y.
    pub y_unit: String,
    /// Slope.
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// Coefficient of determination.
    pub r2: f64,
    /// Points fitted.
    pub points: usize,
}

/// The whole report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteReport {
    /// Preset: "quick" or "full".
    pub preset: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// Host name.
    pub host: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// One rank, each state size.
    pub sizes: Vec<AgentRun>,
    /// Each rank count, fixed state per rank.
    pub ranks: Vec<AgentRun>,
    /// Store-level incremental checkpoint per state size.
    pub incremental: Vec<StoreBenchReport>,
    /// `CRYO_QUIESCE_SLACK` of the MPI figures (empty in reports made
    /// before the agreement replaced periodic rounds).
    #[serde(default)]
    pub quiesce_slack: String,
    /// Safe point cost per rank count.
    pub safe_point: Vec<SafePointRun>,
    /// Quiesce latency per rank count.
    pub quiesce: Vec<QuiesceRun>,
    /// Least-squares slopes.
    pub fits: Vec<Fit>,
    /// Steps that could not run, and why.
    pub skipped: Vec<String>,
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// Least squares over `(x, y)` points; `None` with fewer than two distinct x.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - mean_y).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - slope * p.0 - intercept).powi(2))
        .sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some((slope, intercept, r2))
}

/// An exclusive flock held while a measurement runs.
struct Quiet(Option<File>);

impl Quiet {
    fn take(path: Option<&Path>) -> Result<Quiet> {
        let Some(path) = path else {
            return Ok(Quiet(None));
        };
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock only reads the descriptor, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("flock {}", path.display()));
        }
        Ok(Quiet(Some(file)))
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        if let Some(file) = &self.0 {
            // SAFETY: as above; unlocking an fd we hold.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

struct Plan {
    preset: &'static str,
    sizes: Vec<u64>,
    ranks: Vec<u32>,
    rank_size: u64,
    quiesce_ranks: Vec<u32>,
}

fn plan(args: &SuiteArgs) -> Plan {
    let or = |given: &Vec<u64>, quick: &[u64], full: &[u64]| {
        if !given.is_empty() {
            given.clone()
        } else if args.quick {
            quick.to_vec()
        } else {
            full.to_vec()
        }
    };
    let or32 = |given: &Vec<u32>, quick: &[u32], full: &[u32]| {
        if !given.is_empty() {
            given.clone()
        } else if args.quick {
            quick.to_vec()
        } else {
            full.to_vec()
        }
    };
    Plan {
        preset: if args.quick { "quick" } else { "full" },
        sizes: or(
            &args.sizes,
            &[64 * MIB, 256 * MIB],
            &[256 * MIB, 512 * MIB, 1024 * MIB, 2048 * MIB, 4096 * MIB],
        ),
        ranks: or32(&args.ranks, &[1, 2], &[1, 2, 4, 8, 16]),
        rank_size: args
            .rank_size
            .unwrap_or(if args.quick { 64 * MIB } else { 128 * MIB }),
        quiesce_ranks: or32(&args.quiesce_ranks, &[2], &[2, 4, 8, 16]),
    }
}

fn agent_bench(
    bin: &Path,
    scratch: &Path,
    lock: Option<&Path>,
    procs: u32,
    size: u64,
) -> Result<AgentRun> {
    let json = scratch.join(format!("agent-p{procs}-s{}.json", size / MIB));
    let work = scratch.join(format!("agent-p{procs}-s{}", size / MIB));
    let _ = fs::remove_dir_all(&work);
    let quiet = Quiet::take(lock)?;
    let output = Command::new(bin.join("cryo-agent"))
        .arg("bench")
        .arg("--procs")
        .arg(procs.to_string())
        .arg("--sizes")
        .arg(format!("{}MiB", size / MIB))
        .args(["--state-kind", "mixed"])
        .env("RUST_BACKTRACE", "0")
        .arg("--dir")
        .arg(&work)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .context("running cryo-agent bench")?;
    drop(quiet);
    let _ = fs::remove_dir_all(&work);
    if !output.status.success() {
        bail!(
            "cryo-agent bench --procs {procs} --sizes {}: {}: {}",
            human::bytes(size),
            output.status,
            tail(&output.stderr)
        );
    }
    eprint!("{}", String::from_utf8_lossy(&output.stdout));
    let text = fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
    let _ = fs::remove_file(&json);
    let mut runs: Vec<AgentRun> = serde_json::from_slice(&text).context("agent bench JSON")?;
    runs.pop().context("agent bench wrote no figures")
}

fn safe_point(bin: &Path, lock: Option<&Path>, ranks: u32, slack: &str) -> Result<SafePointRun> {
    let quiet = Quiet::take(lock)?;
    let output = Command::new("mpiexec")
        .arg("-n")
        .arg(ranks.to_string())
        .arg(bin.join("quiesce-bench"))
        .args([
            "--iters",
            "200",
            "--trials",
            "15",
            "--state-bytes",
            "4096",
            "--json",
        ])
        .env_remove("CRYO_AGENT_SOCKET")
        .env("CRYO_QUIESCE_SLACK", slack)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .context("running mpiexec quiesce-bench")?;
    drop(quiet);
    if !output.status.success() {
        bail!(
            "quiesce-bench at {ranks} ranks: {}: {}",
            output.status,
            tail(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    eprint!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .context("quiesce-bench printed no JSON line")?;
    serde_json::from_str(line).context("quiesce-bench JSON")
}

/// Runs `quiesce-bench` under `cryo run` on two emulated nodes and takes
/// three checkpoints.
fn quiesce(
    bin: &Path,
    scratch: &Path,
    lock: Option<&Path>,
    ranks: u32,
    slack: &str,
) -> Result<QuiesceRun> {
    let state_bytes = 32 * MIB;
    let work = scratch.join(format!("quiesce-{ranks}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let store = work.join("store");
    let job = format!("q{ranks}");
    let half = ranks / 2;
    let cryo = bin.join("cryo");
    let _quiet = Quiet::take(lock)?;
    let mut run = Command::new(&cryo)
        .env("CRYO_STORE", &store)
        .env("CRYO_QUIESCE_SLACK", slack)
        .args(["run", "--job", &job, "--nodes"])
        .arg(format!("a:{half},b:{}", ranks - half))
        .arg("-n")
        .arg(ranks.to_string())
        .arg("--scratch")
        .arg(work.join("scratch"))
        .arg("--")
        .arg(bin.join("quiesce-bench"))
        .args(["--iters", "10", "--trials", "1", "--run-secs", "40"])
        .arg("--state-bytes")
        .arg(state_bytes.to_string())
        .stdin(Stdio::null())
        .stdout(File::create(work.join("run.out"))?)
        .stderr(File::create(work.join("run.err"))?)
        .spawn()
        .context("starting cryo run")?;
    let result = (|| -> Result<QuiesceRun> {
        let start = Instant::now();
        loop {
            let status = Command::new(&cryo)
                .env("CRYO_STORE", &store)
                .args(["status", &job])
                .stderr(Stdio::null())
                .output()?;
            if String::from_utf8_lossy(&status.stdout).contains("no checkpoint in progress") {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("job {job} did not start within 60 s");
            }
            if let Some(status) = run.try_wait()? {
                bail!("cryo run exited early ({status})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut out = QuiesceRun {
            ranks,
            state_bytes,
            quiesce_ms: Vec::new(),
            pause_ms: Vec::new(),
        };
        for _ in 0..3 {
            let output = Command::new(&cryo)
                .env("CRYO_STORE", &store)
                .args(["checkpoint", &job])
                .output()?;
            let text = String::from_utf8_lossy(&output.stdout);
            eprint!("ranks {ranks}: {text}");
            let number_after = |key: &str| -> Option<f64> {
                let rest = &text[text.find(key)? + key.len()..];
                rest.split_whitespace().next()?.parse().ok()
            };
            match (
                number_after("quiesced in "),
                number_after("longest rank pause "),
            ) {
                (Some(q), Some(p)) => {
                    out.quiesce_ms.push(q);
                    out.pause_ms.push(p);
                }
                _ => bail!(
                    "unexpected `cryo checkpoint` output: {text}{}",
                    String::from_utf8_lossy(&output.stderr)
                ),
            }
        }
        Ok(out)
    })();
    let _ = Command::new(&cryo)
        .env("CRYO_STORE", &store)
        .args(["preempt", &job])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_dir_all(&work);
    result
}

/// The last lines of a child's stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" / ")
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs the suite and writes `report.json`, `report.txt` and `bench.svg`.
pub fn run_suite(args: &SuiteArgs) -> Result<SuiteReport> {
    let plan = plan(args);
    let bin = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("cryo has no parent directory")?
            .to_owned(),
    };
    for needed in ["cryo-agent", "cryo-counter"] {
        if !bin.join(needed).exists() {
            bail!(
                "{} not found: build in release mode (cargo build --release) or pass --bin-dir",
                bin.join(needed).display()
            );
        }
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let scratch = args
        .dir
        .join(format!("cryo-bench-suite-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let lock = args.lock.as_deref();
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

    for &size in &plan.sizes {
        eprintln!("== size sweep: 1 rank x {} ==", human::bytes(size));
        match agent_bench(&bin, &scratch, lock, 1, size) {
            Ok(run) => report.sizes.push(run),
            Err(err) => report
                .skipped
                .push(format!("size {}: {err:#}", human::bytes(size))),
        }
        let quiet = Quiet::take(lock)?;
        let store = run_store_bench(&StoreBenchOptions {
            size,
            dir: scratch.clone(),
            chunk_size: cryo_core::chunk::DEFAULT_CHUNK_SIZE,
            level: cryo_core::chunk::DEFAULT_ZSTD_LEVEL,
            filter: cryo_core::chunk::Filter::Shuffle8,
            changed_fraction: 0.05,
            keep: false,
        });
        drop(quiet);
        match store {
            Ok(store) => report.incremental.push(store),
            Err(err) => report
                .skipped
                .push(format!("store {}: {err:#}", human::bytes(size))),
        }
    }
    for &ranks in &plan.ranks {
        eprintln!(
            "== rank sweep: {ranks} ranks x {} ==",
            human::bytes(plan.rank_size)
        );
        match agent_bench(&bin, &scratch, lock, ranks, plan.rank_size) {
            Ok(run) => report.ranks.push(run),
            Err(err) => report.skipped.push(format!("{ranks} ranks: {err:#}")),
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
                    .push(format!("safe point at {ranks} ranks: {err:#}")),
            }
            match quiesce(&bin, &scratch, lock, ranks, &args.quiesce_slack) {
                Ok(run) => report.quiesce.push(run),
                Err(err) => report
                    .skipped
                    .push(format!("quiesce at {ranks} ranks: {err:#}")),
            }
        }
    }
    let _ = fs::remove_dir_all(&scratch);

    report.fits = fits(&report);
    let text = render(&report);
    fs::write(args.out.join("report.txt"), &text)?;
    fs::write(
        args.out.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    crate::plot::write_svg(&report, &args.out.join("bench.svg"))?;
    Ok(report)
}

fn fits(report: &SuiteReport) -> Vec<Fit> {
    let mib = |b: u64| b as f64 / MIB as f64;
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut out = Vec::new();
    let mut add = |name: &str, x_unit: &str, y_unit: &str, points: Vec<(f64, f64)>| {
        if let Some((slope, intercept, r2)) = fit(&points) {
            out.push(Fit {
                name: name.to_owned(),
                x_unit: x_unit.to_owned(),
                y_unit: y_unit.to_owned(),
                slope,
                intercept,
                r2,
                points: points.len(),
            });
        }
    };
    let s = &report.sizes;
    add(
        "pause vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.worst_pause_ns())))
            .collect(),
    );
    add(
        "memcpy vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.node_memcpy_ns)))
            .collect(),
    );
    add(
        "checkpoint vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.checkpoint_ns)))
            .collect(),
    );
    add(
        "zstd -1 -T0 vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.zstd_ns?))))
            .collect(),
    );
    add(
        "restart vs state size",
        "MiB",
        "ms",
        s.iter().map(|r| (mib(r.size), ms(r.restart_ns))).collect(),
    );
    add(
        "zstd -d -T0 vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.zstd_d_ns?))))
            .collect(),
    );
    add(
        "peak RSS vs state size",
        "MiB",
        "MiB",
        s.iter()
            .map(|r| (mib(r.size), mib(r.peak_rss_bytes)))
            .collect(),
    );
    add(
        "incremental checkpoint vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.incremental.as_ref()?.checkpoint_ns))))
            .collect(),
    );
    let inc = &report.incremental;
    let figure = |r: &StoreBenchReport, prefix: &str| {
        r.figures
            .iter()
            .find(|f| f.name.starts_with(prefix))
            .map(|f| f.seconds * 1e3)
    };
    let changed = |r: &StoreBenchReport| {
        r.figures
            .iter()
            .find(|f| f.name.ends_with("chunks changed"))
            .map(|f| f.seconds * 1e3)
    };
    add(
        "store full epoch vs state size",
        "MiB",
        "ms",
        inc.iter()
            .filter_map(|r| Some((mib(r.size), figure(r, "cryo store, full")?)))
            .collect(),
    );
    add(
        "store 5% epoch vs state size",
        "MiB",
        "ms",
        inc.iter()
            .filter_map(|r| Some((mib(r.size), changed(r)?)))
            .collect(),
    );
    let k = &report.ranks;
    add(
        "worst pause vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.worst_pause_ns())))
            .collect(),
    );
    add(
        "checkpoint vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.checkpoint_ns)))
            .collect(),
    );
    add(
        "restart vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.restart_ns)))
            .collect(),
    );
    add(
        "safe point vs ranks",
        "ranks",
        "ns",
        report
            .safe_point
            .iter()
            .map(|r| (f64::from(r.ranks), r.safe_point_ns))
            .collect(),
    );
    add(
        "quiesce latency vs ranks",
        "ranks",
        "ms",
        report
            .quiesce
            .iter()
            .flat_map(|r| r.quiesce_ms.iter().map(move |q| (f64::from(r.ranks), *q)))
            .collect(),
    );
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The plain-text report.
pub fn render(report: &SuiteReport) -> String {
    let mut out = String::new();
    let ms = |ns: u64| ns as f64 / 1e6;
    let _ = writeln!(
        out,
        "cryo bench ({} preset) on {} ({} CPUs); rank state: 60% smooth doubles + noise, 25% index arrays, 15% zeros",
        report.preset, report.host, report.cpus
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Per configuration (every baseline measured in the same run, on the same bytes):"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>10} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>7} {:>10}",
        "ranks",
        "per rank",
        "pause",
        "memcpy",
        "x",
        "ckpt",
        "zstd -1",
        "x",
        "restart",
        "zstd -d",
        "x",
        "ratio",
        "RSS-budget"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.0} ms", ms(v)));
        let optr = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}x"));
        let _ = writeln!(
            out,
            "{:>5} {:>10} | {:>6.0} ms {:>6.0} ms {:>5.2}x | {:>6.0} ms {:>9} {:>6} | {:>6.0} ms {:>9} {:>6} | {:>6.2}x {:>7} MiB",
            run.procs,
            human::bytes(run.size),
            ms(run.worst_pause_ns()),
            ms(run.node_memcpy_ns),
            run.pause_ratio(),
            ms(run.checkpoint_ns),
            opt(run.zstd_ns),
            optr(run.checkpoint_ratio()),
            ms(run.restart_ns),
            opt(run.zstd_d_ns),
            optr(run.restart_ratio()),
            ratio(run.raw_bytes, run.stored_bytes),
            run.rss_over_budget() / i64::try_from(MIB).unwrap_or(1)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Incremental checkpoint, end to end (the ranks change 5% of their chunks; write tracking copies only those):"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let Some(inc) = &run.incremental else {
            continue;
        };
        let _ = writeln!(
            out,
            "  {:>3} x {:>10}: copied {:.1}% of the state, wrote {:.1}% of the full checkpoint's bytes, pause {:.1} ms, {:.0} ms = {:.1}% of the full checkpoint's time",
            run.procs,
            human::bytes(run.size),
            ratio(inc.copied_bytes, inc.bytes) * 100.0,
            ratio(inc.stored_bytes, run.stored_bytes) * 100.0,
            ms(inc.pause_ns),
            ms(inc.checkpoint_ns),
            ratio(inc.checkpoint_ns, run.checkpoint_ns) * 100.0
        );
    }
    let _ = writeln!(
        out,
        "Full-checkpoint pause samples (worst rank, ms; the smallest is reported above):"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let _ = writeln!(
            out,
            "  {:>3} x {:>10}: {}",
            run.procs,
            human::bytes(run.size),
            run.pause_samples_ns
                .iter()
                .map(|p| format!("{:.0}", ms(*p)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        out,
        "Incremental checkpoint (store level, no tracking: every chunk hashed; smooth doubles + noise, 5% of chunks changed):"
    );
    for r in &report.incremental {
        let _ = writeln!(
            out,
            "  {:>10}: {:.1}% of the bytes, {:.1}% of the time of the full epoch",
            human::bytes(r.size),
            r.incremental_bytes_ratio * 100.0,
            r.incremental_time_ratio * 100.0
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Safe point with nothing pending (interleaved trials, minimum of each side; 1 ms of work per iteration, share of the iteration as it ran; CRYO_QUIESCE_SLACK={}):",
        report.quiesce_slack
    );
    for r in &report.safe_point {
        let _ = writeln!(
            out,
            "  {:>3} ranks: {:.0} ns = {:.4}% of a {:.0} us iteration (median {:.0} ns, noise floor {:.0} ns); A/A control {:.0} ns = {:.4}%; own CPU time {:.0} ns = {:.4}%",
            r.ranks,
            r.safe_point_ns,
            r.share_percent(),
            r.plain_min_ns.max(r.iter_ns) / 1e3,
            r.safe_point_median_ns,
            r.noise_floor_ns,
            r.control_ns,
            r.share_of_iteration(r.control_ns),
            r.cpu_ns,
            r.cpu_percent()
        );
    }
    let _ = writeln!(
        out,
        "Quiesce latency under `cryo run` (two emulated nodes, request to last rank parked):"
    );
    for r in &report.quiesce {
        let _ = writeln!(
            out,
            "  {:>3} ranks x {}: quiesce {:?} ms, longest pause {:?} ms",
            r.ranks,
            human::bytes(r.state_bytes),
            r.quiesce_ms,
            r.pause_ms
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    let worst = |f: &dyn Fn(&AgentRun) -> Option<f64>| {
        report
            .sizes
            .iter()
            .chain(&report.ranks)
            .filter_map(f)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            })
    };
    let line =
        |out: &mut String, what: &str, value: Option<f64>, target: f64, unit: &str| match value {
            Some(v) => {
                let _ = writeln!(
                    out,
                    "  {what:<52} worst {v:>8.3}{unit} (target <= {target}{unit}): {}",
                    verdict(v <= target)
                );
            }
            None => {
                let _ = writeln!(out, "  {what:<52} not measured");
            }
        };
    line(
        &mut out,
        "pause / memcpy of the same bytes",
        worst(&|r| Some(r.pause_ratio())),
        1.5,
        "x",
    );
    line(
        &mut out,
        "checkpoint / zstd -1 -T0 on the same bytes",
        worst(&|r| r.checkpoint_ratio()),
        1.1,
        "x",
    );
    line(
        &mut out,
        "restart / zstd -d -T0 on the same bytes",
        worst(&|r| r.restart_ratio()),
        1.2,
        "x",
    );
    let inc = |f: &dyn Fn(&StoreBenchReport) -> f64| {
        report
            .incremental
            .iter()
            .map(f)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    line(
        &mut out,
        "incremental (5%) bytes / full, end to end",
        worst(&|r| r.incremental_bytes_ratio().map(|v| v * 100.0)),
        10.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) time / full, end to end",
        worst(&|r| r.incremental_time_ratio().map(|v| v * 100.0)),
        20.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) bytes / full, store level",
        inc(&|r| r.incremental_bytes_ratio * 100.0),
        10.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) time / full, store level",
        inc(&|r| r.incremental_time_ratio * 100.0),
        20.0,
        "%",
    );
    let safe_point_worst = |figure: fn(&SafePointRun) -> f64| {
        report
            .safe_point
            .iter()
            .map(figure)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    line(
        &mut out,
        "safe point / 1 ms iteration",
        safe_point_worst(SafePointRun::share_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "  the same, beyond the A/A control",
        safe_point_worst(SafePointRun::beyond_noise_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "  its own CPU time / 1 ms iteration",
        safe_point_worst(SafePointRun::cpu_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "agent peak RSS - copy budget",
        worst(&|r| Some(r.rss_over_budget() as f64 / MIB as f64)),
        64.0,
        " MiB",
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Least-squares fits (y = slope * x + intercept):");
    for f in &report.fits {
        let _ = writeln!(
            out,
            "  {:<34} slope {:>10.4} {}/{}  intercept {:>9.2} {}  R^2 {:.3}  ({} points)",
            f.name, f.slope, f.y_unit, f.x_unit, f.intercept, f.y_unit, f.r2, f.points
        );
    }
    for s in &report.skipped {
        let _ = writeln!(out, "skipped: {s}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line() {
        let points: Vec<(f64, f64)> = (0..5)
            .map(|i| (f64::from(i), 3.0 * f64::from(i) + 2.0))
            .collect();
        let (slope, intercept, r2) = fit(&points).expect("fits");
        assert!((slope - 3.0).abs() < 1e-9);
        assert!((intercept - 2.0).abs() < 1e-9);
        assert!((r2 - 1.0).abs() < 1e-9);
        assert!(fit(&[(1.0, 1.0)]).is_none());
        assert!(fit(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }

    fn run(procs: u32, size: u64) -> AgentRun {
        AgentRun {
            procs,
            size,
            copy_budget: 2 * size,
            rank_bytes: vec![size; procs as usize],
            pause_ns: vec![size / 10; procs as usize],
            copy_ns: vec![size / 12; procs as usize],
            memcpy_ns: size / 12,
            node_memcpy_ns: size / 12,
            checkpoint_ns: size * 2,
            resumed_ns: size / 5,
            zstd_ns: Some(size * 2),
            zstd_d_ns: Some(size),
            restart_ns: size,
            raw_bytes: size,
            stored_bytes: size / 2,
            peak_rss_bytes: 2 * size + MIB,
            pause_samples_ns: vec![size / 10, size / 9],
            incremental: Some(IncrementalRun {
                steps: 10,
                bytes: size,
                copied_bytes: size / 20,
                pause_ns: size / 200,
                checkpoint_ns: size / 10,
                stored_bytes: size / 40,
            }),
        }
    }

    #[test]
    fn report_has_every_section_and_a_plot() {
        let mut report = SuiteReport {
            preset: "quick".into(),
            started_unix: 0,
            host: "test".into(),
            cpus: 2,
            sizes: vec![run(1, 64 * MIB), run(1, 256 * MIB)],
            ranks: vec![run(1, 64 * MIB), run(2, 64 * MIB)],
            incremental: Vec::new(),
            quiesce_slack: "auto".into(),
            safe_point: vec![SafePointRun {
                ranks: 2,
                work: "cpu".into(),
                iter_ns: 1e6,
                plain_min_ns: 1e6,
                with_min_ns: 1e6 + 50.0,
                safe_point_ns: 50.0,
                safe_point_median_ns: 80.0,
                noise_floor_ns: 30.0,
                control_ns: -20.0,
                cpu_ns: 40.0,
            }],
            quiesce: Vec::new(),
            fits: Vec::new(),
            skipped: vec!["MPI quiesce: not requested".into()],
        };
        report.fits = fits(&report);
        assert!(report.fits.iter().any(|f| f.name == "pause vs state size"));
        let text = render(&report);
        for needle in [
            "pause / memcpy",
            "zstd -1 -T0",
            "zstd -d -T0",
            "Least-squares",
            "safe point",
            "skipped:",
            "incremental (5%) time / full, end to end             worst    5.000%",
            "Full-checkpoint pause samples",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let json = serde_json::to_string(&report).expect("serializes");
        let back: SuiteReport = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.sizes.len(), 2);
        let dir = tempfile::tempdir().expect("tempdir");
        let svg = dir.path().join("bench.svg");
        crate::plot::write_svg(&report, &svg).expect("plots");
        let svg = fs::read_to_string(svg).expect("reads");
        assert!(
            svg.starts_with("<svg") && svg.contains("pause"),
            "{}",
            &svg[..200.min(svg.len())]
        );
    }
}
