//! The suite's measurements that run as subprocesses: `cryo-bench agent`,
//! `quiesce-bench` under `mpiexec` and under `cryo run`. Each one holds the
//! `--lock` file while it measures.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryo_coordinator::human;
use cryo_core::store::fs::{IoStep, IoStepError};

use super::{points, QuiesceRun, SafePointRun, SuiteError, MIB};
use crate::agent::baselines::memcpy_ns;
use crate::figures::AgentRun;

/// An exclusive flock held while a measurement runs.
pub(super) struct Quiet(Option<File>);

impl Quiet {
    pub(super) fn take(path: Option<&Path>) -> Result<Quiet, SuiteError> {
        let Some(path) = path else {
            return Ok(Quiet(None));
        };
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .step("opening lock file", path)?;
        // SAFETY: flock only reads the descriptor, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(IoStepError::new("flock", path, std::io::Error::last_os_error()).into());
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

/// Runs `cryo-bench agent` (this executable, `exe`) with the agent and ranks
/// in `bin` for one configuration.
pub(super) fn agent_bench(
    exe: &Path,
    bin: &Path,
    scratch: &Path,
    lock: Option<&Path>,
    procs: u32,
    size: u64,
) -> Result<AgentRun, SuiteError> {
    let json = scratch.join(format!("agent-p{procs}-s{}.json", size / MIB));
    let work = scratch.join(format!("agent-p{procs}-s{}", size / MIB));
    let _ = fs::remove_dir_all(&work);
    let quiet = Quiet::take(lock)?;
    let output = Command::new(exe)
        .arg("agent")
        .arg("--agent")
        .arg(bin.join("cryo-agent"))
        .arg("--procs")
        .arg(procs.to_string())
        .arg("--sizes")
        .arg(format!("{}MiB", size / MIB))
        .args(["--state-kind", "mixed"])
        .arg("--restore-threads")
        .arg(restore_sweep())
        .env("RUST_BACKTRACE", "0")
        .arg("--dir")
        .arg(&work)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .map_err(run_err("cryo-bench agent"))?;
    drop(quiet);
    let _ = fs::remove_dir_all(&work);
    if !output.status.success() {
        return Err(SuiteError::Failed {
            command: format!(
                "cryo-bench agent --procs {procs} --sizes {}",
                human::bytes(size)
            ),
            status: output.status,
            stderr: tail(&output.stderr),
        });
    }
    eprint!("{}", String::from_utf8_lossy(&output.stdout));
    let text = fs::read(&json).step("reading", &json)?;
    let _ = fs::remove_file(&json);
    let mut runs: Vec<AgentRun> =
        serde_json::from_slice(&text).map_err(|source| SuiteError::Json {
            what: "agent bench JSON",
            source,
        })?;
    runs.pop()
        .ok_or(SuiteError::NoFigures("agent bench wrote no figures"))
}

/// The restore thread counts the restart is repeated with: 1, then
/// doubling up to every core.
fn restore_sweep() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut counts = vec![1];
    while counts.last().is_some_and(|&n| n < cores) {
        counts.push((counts[counts.len() - 1] * 2).min(cores));
    }
    counts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `quiesce-bench` under `mpiexec`: the safe point's cost.
pub(super) fn safe_point(
    bin: &Path,
    lock: Option<&Path>,
    ranks: u32,
    slack: &str,
) -> Result<SafePointRun, SuiteError> {
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
        .map_err(run_err("mpiexec quiesce-bench"))?;
    drop(quiet);
    if !output.status.success() {
        return Err(SuiteError::Failed {
            command: format!("quiesce-bench at {ranks} ranks"),
            status: output.status,
            stderr: tail(&output.stderr),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    eprint!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or(SuiteError::NoFigures("quiesce-bench printed no JSON line"))?;
    serde_json::from_str(line).map_err(|source| SuiteError::Json {
        what: "quiesce-bench JSON",
        source,
    })
}

/// One `quiesce-bench` job under `cryo run`.
#[derive(Debug, Clone)]
pub(crate) struct QuiesceJob<'a> {
    /// Ranks, over two emulated nodes.
    pub(crate) ranks: u32,
    /// `CRYO_QUIESCE_SLACK`.
    pub(crate) slack: &'a str,
    /// CPU µs per iteration.
    pub(crate) iter_us: u64,
    /// State per rank.
    pub(crate) state_bytes: u64,
    /// More environment for `cryo run` (and so its agents and ranks).
    pub(crate) env: Vec<(&'a str, &'a str)>,
    /// Emulated nodes the ranks are spread over (1 or 2).
    pub(crate) nodes: u32,
    /// More arguments for `quiesce-bench`.
    pub(crate) bench_args: Vec<String>,
    /// Request the first checkpoint as soon as every rank has registered
    /// with its agent (before its first safe point), rather than once every
    /// rank runs its iterations.
    pub(crate) first_at_start: bool,
}

impl<'a> QuiesceJob<'a> {
    /// The suite's job: 32 MiB per rank, at most 512 MiB in all, so that 64
    /// ranks fit beside each other.
    pub(crate) fn suite(ranks: u32, slack: &'a str, iter_us: u64) -> QuiesceJob<'a> {
        QuiesceJob {
            ranks,
            slack,
            iter_us,
            state_bytes: (32 * MIB).min((512 * MIB / u64::from(ranks.max(1))) & !(MIB - 1)),
            env: Vec::new(),
            nodes: 2,
            bench_args: Vec::new(),
            first_at_start: false,
        }
    }
}

/// Runs `quiesce-bench` under `cryo run` on two emulated nodes and takes
/// three checkpoints, the first as soon as every rank runs its iterations.
pub(crate) fn quiesce(
    bin: &Path,
    scratch: &Path,
    lock: Option<&Path>,
    job_spec: &QuiesceJob<'_>,
) -> Result<QuiesceRun, SuiteError> {
    let QuiesceJob {
        ranks,
        slack,
        iter_us,
        state_bytes,
        ..
    } = *job_spec;
    let work = scratch.join(format!("quiesce-{ranks}-{iter_us}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).step("creating", &work)?;
    let store = work.join("store");
    let job = format!("q{ranks}");
    // The fuller node's ranks, and the nodes as `cryo run --nodes` takes them.
    let (fuller, nodes) = if job_spec.nodes <= 1 {
        (ranks, format!("a:{ranks}"))
    } else {
        let half = ranks / 2;
        (ranks - half, format!("a:{half},b:{}", ranks - half))
    };
    let cryo = bin.join("cryo");
    let (out, err) = (work.join("run.out"), work.join("run.err"));
    let _quiet = Quiet::take(lock)?;
    let mut run = Command::new(&cryo)
        .env("CRYO_STORE", &store)
        .env("CRYO_QUIESCE_SLACK", slack)
        .envs(job_spec.env.iter().copied())
        .args(["run", "--job", &job, "--nodes"])
        .arg(nodes)
        .arg("-n")
        .arg(ranks.to_string())
        .arg("--scratch")
        .arg(work.join("scratch"))
        .arg("--")
        .arg(bin.join("quiesce-bench"))
        .args(["--trials", "0", "--run-secs", "120"])
        .arg("--iter-us")
        .arg(iter_us.to_string())
        .arg("--state-bytes")
        .arg(state_bytes.to_string())
        .arg("--points-log")
        .arg(work.join("points"))
        .args(&job_spec.bench_args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).step("creating", &out)?)
        .stderr(File::create(&err).step("creating", &err)?)
        .spawn()
        .map_err(run_err("cryo run"))?;
    let result = (|| -> Result<QuiesceRun, SuiteError> {
        let start = Instant::now();
        loop {
            let status = Command::new(&cryo)
                .env("CRYO_STORE", &store)
                .args(["status", &job])
                .stderr(Stdio::null())
                .output()
                .map_err(run_err("cryo status"))?;
            if String::from_utf8_lossy(&status.stdout).contains("no checkpoint in progress") {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(SuiteError::NotStarted { job: job.clone() });
            }
            if let Some(status) = run.try_wait().map_err(run_err("cryo run"))? {
                return Err(SuiteError::ExitedEarly(status));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Every rank creates its points log as it enters the iterations
        // that log their safe points (after MPI_Init, cryo_init and the
        // safe-point blocks): only then is every checkpoint one they log.
        // A first request at the start comes before that, on purpose.
        let logs: Vec<PathBuf> = (0..ranks)
            .map(|rank| PathBuf::from(format!("{}.{rank}", work.join("points").display())))
            .collect();
        while !job_spec.first_at_start && !logs.iter().all(|log| log.exists()) {
            if start.elapsed() > Duration::from_secs(300) {
                return Err(SuiteError::NotStarted { job: job.clone() });
            }
            if let Some(status) = run.try_wait().map_err(run_err("cryo run"))? {
                return Err(SuiteError::ExitedEarly(status));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !job_spec.first_at_start {
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut out = QuiesceRun {
            ranks,
            state_bytes,
            quiesce_ms: Vec::new(),
            pause_ms: Vec::new(),
            iter_us,
            points_to_park: Vec::new(),
            app_pause_ms: Vec::new(),
            app_lost_ms: Vec::new(),
            node_memcpy_ms: 0.0,
        };
        let mut requests = Vec::new();
        for nth in 0..3 {
            if nth > 0 && job_spec.first_at_start {
                // Later requests once the first checkpoint is written.
                std::thread::sleep(Duration::from_secs(2));
            }
            let (requested_ns, output) = loop {
                let requested_ns = unix_ns();
                let output = Command::new(&cryo)
                    .env("CRYO_STORE", &store)
                    .args(["checkpoint", &job])
                    .output()
                    .map_err(run_err("cryo checkpoint"))?;
                // Refused until every rank has registered: ask again.
                let early = nth == 0
                    && job_spec.first_at_start
                    && [&output.stdout, &output.stderr]
                        .iter()
                        .any(|out| String::from_utf8_lossy(out).contains("have registered"))
                    && start.elapsed() < Duration::from_secs(300);
                if !early {
                    break (requested_ns, output);
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let text = String::from_utf8_lossy(&output.stdout);
            eprint!("ranks {ranks}: {text}");
            let number_after = |key: &str| -> Option<f64> {
                let rest = &text[text.find(key)? + key.len()..];
                rest.split_whitespace().next()?.parse().ok()
            };
            match (
                number_after("quiesced in "),
                number_after("longest rank pause "),
                number_after("epoch "),
            ) {
                (Some(q), Some(p), Some(epoch)) => {
                    out.quiesce_ms.push(q);
                    out.pause_ms.push(p);
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    requests.push((requested_ns, epoch as u64));
                }
                _ => {
                    return Err(SuiteError::Output(format!(
                        "{text}{}",
                        String::from_utf8_lossy(&output.stderr)
                    )))
                }
            }
        }
        count_points(&work.join("points"), ranks, &requests, &mut out)?;
        Ok(out)
    })();
    let _ = Command::new(&cryo)
        .env("CRYO_STORE", &store)
        .args(["preempt", &job])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.try_wait().map_err(run_err("cryo run"))?.is_none() {
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_dir_all(&work);
    // The baseline once the job has stopped: during a pause its ranks are
    // parked, so a memcpy beside ranks that compute (on a node with more
    // ranks than cores, 30 times slower) is not what the pause competes
    // with.
    result.map(|mut out| {
        let node_bytes = u64::from(fuller) * state_bytes;
        out.node_memcpy_ms =
            memcpy_ns(usize::try_from(node_bytes).unwrap_or(usize::MAX)) as f64 / 1e6;
        out
    })
}

/// Reads every rank's points log and fills in, per checkpoint, the most
/// safe points any rank passed from the request to its park and the
/// longest parking safe point.
fn count_points(
    prefix: &Path,
    ranks: u32,
    requests: &[(u128, u64)],
    out: &mut QuiesceRun,
) -> Result<(), SuiteError> {
    let mut logs = Vec::new();
    for rank in 0..ranks {
        let path = PathBuf::from(format!("{}.{rank}", prefix.display()));
        let text = fs::read_to_string(&path).step("reading", &path)?;
        logs.push(
            points::parse(&text)
                .map_err(|why| SuiteError::Output(format!("{}: {why}", path.display())))?,
        );
    }
    for &(requested_ns, epoch) in requests {
        let mut most = 0;
        let mut longest_ns = 0;
        // None once a rank's log ends before the iterations after the park
        // (the job was preempted).
        let mut lost_ns = Some(0);
        for (rank, log) in logs.iter().enumerate() {
            let (passed, len_ns) = points::to_park(log, requested_ns, epoch).ok_or_else(|| {
                SuiteError::Output(format!("rank {rank} logged no park for epoch {epoch}"))
            })?;
            most = most.max(passed);
            longest_ns = longest_ns.max(len_ns);
            lost_ns = lost_ns
                .zip(points::time_lost(log, epoch, 2))
                .map(|(a, b)| a.max(b));
        }
        out.points_to_park.push(most);
        out.app_pause_ms.push(longest_ns as f64 / 1e6);
        out.app_lost_ms.push(lost_ns.map(|ns| ns as f64 / 1e6));
    }
    Ok(())
}

/// The wall clock in nanoseconds since the Unix epoch, as `quiesce-bench`
/// logs it.
fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Names the command that could not be run.
fn run_err(command: &str) -> impl FnOnce(std::io::Error) -> SuiteError {
    let command = command.to_owned();
    move |source| SuiteError::Run { command, source }
}

/// The last lines of a child's stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" / ")
}

/// Whether `program --version` runs.
pub(super) fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
