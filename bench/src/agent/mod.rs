//! `cryo-bench agent` (also `cryo-agent bench`): checkpoint and restart
//! figures on real processes.
//!
//! For each process count and state size it starts a `cryo-agent serve`
//! child and that many `cryo-counter` ranks, checkpoints them, and prints:
//! * the pause of each rank, against a plain single-threaded memcpy of the
//!   same number of bytes into warm memory, measured in the same run
//!   (target ≤ 1.5×);
//! * the end-to-end checkpoint time (request to commit, fsyncs included),
//!   against `zstd -1 -T0` on the same bytes (target ≤ 1.1×);
//! * the restart time (process start to every region restored), beside
//!   `zstd -d -T0` of the same bytes and the raw-image baseline: the same
//!   bytes uncompressed in one file read back into fresh memory, what a
//!   whole-process checkpointer without compression does;
//! * the agent's peak RSS against its copy budget.
//!
//! Build in release mode first: `cargo build --release`, then
//! `target/release/cryo-bench agent`.
//!
//! * `print`: the figures of one configuration as text.
//! * `stages`: `--stages`, the single-thread cost of each stage of storing a
//!   chunk.

use std::fs;
use std::num::TryFromIntError;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryo_agent::client::{self, ClientError};
use cryo_agent::units::{format_bytes, parse_bytes};
use cryo_core::env::ENV_RESTORE_THREADS;
use cryo_core::format::chunk::ChunkEncodeError;
use cryo_core::format::limits::DEFAULT_CHUNK_SIZE;
use cryo_core::protocol::{
    BusyPolicy, CheckpointReport, Completion, ControlRequest, ControlResponse,
};
use cryo_core::store::fs::{IoStep, IoStepError};
use cryo_core::store::reader::StreamError;
use cryo_core::store::{LoadError, Store, StoreError};
use thiserror::Error;

use crate::figures::{AgentRun, IncrementalRun, ThreadsRestart};

pub(crate) mod baselines;
mod print;
mod restart;
mod stages;

use baselines::{memcpy_ns, raw_image_ns};
use print::print_result;
use restart::restart;
use stages::stages;

/// The block `cryo-counter` changes per step.
const COUNTER_BLOCK: u64 = 256 << 10;

/// `cryo-bench agent` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentBenchArgs {
    /// Work directory (store, sockets, logs); default: a new directory
    /// under /tmp, removed at the end.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Process counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub procs: Vec<u32>,
    /// State size per process.
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes, default_value = "256MiB,1GiB")]
    pub sizes: Vec<u64>,
    /// Copy budget (default: the largest total state plus 64 MiB, so no rank
    /// streams).
    #[arg(long, value_parser = parse_bytes)]
    pub copy_budget: Option<u64>,
    /// Threads the agent copies with (default: all cores).
    #[arg(long)]
    pub copy_threads: Option<usize>,
    /// Threads the agent stores chunks with (default: four per core).
    #[arg(long)]
    pub store_threads: Option<usize>,
    /// Chunk size passed to the agent (default: the agent's, 1 MiB).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Only measure the single-thread cost of each stage of storing a chunk
    /// (hash, shuffle, zstd, write + fsync), to see where drain time goes.
    #[arg(long)]
    pub stages: bool,
    /// The agent binary (default: `cryo-agent` next to this one).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// The example rank binary (default: `cryo-counter` next to the agent).
    #[arg(long)]
    pub counter: Option<PathBuf>,
    /// What the ranks' state holds: `mixed` (smooth doubles plus noise,
    /// index arrays, zeros: like a solver's memory) or `counter` (a pattern
    /// that compresses ~23x).
    #[arg(long, default_value = "mixed")]
    pub state_kind: String,
    /// Also write every configuration's figures as a JSON array to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Full checkpoints per configuration; the pause reported is the
    /// smallest (descheduling on a shared machine only ever adds time).
    #[arg(long, default_value_t = 3)]
    pub pause_samples: u32,
    /// Share of the state's chunks the ranks change before the incremental
    /// checkpoint (0 skips it).
    #[arg(long, default_value_t = 0.05)]
    pub changed: f64,
    /// Restart again with each of these counts of restore threads
    /// (`CRYO_RESTORE_THREADS`), to show how the restart scales with cores.
    #[arg(long, value_delimiter = ',')]
    pub restore_threads: Vec<usize>,
}

/// The agent benchmark failed.
#[derive(Debug, Error)]
pub enum AgentBenchError {
    /// This executable could not be found.
    #[error("finding this executable: {0}")]
    CurrentExe(std::io::Error),
    /// A binary to run is missing.
    #[error("{} not found: build it (cargo build --release) or pass --{option}", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
        /// The option that names it.
        option: &'static str,
    },
    /// `--chunk-size` is not a size.
    #[error("--chunk-size: {0}")]
    ChunkSize(String),
    /// A file step failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
    /// A process could not be started.
    #[error("starting {what}: {source}")]
    Start {
        /// The process.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// The agent could not be asked.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent answered something else than asked.
    #[error("{what} failed: {answer}")]
    Answer {
        /// The request.
        what: &'static str,
        /// The answer.
        answer: String,
    },
    /// The benchmark's store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The checkpoint's manifest could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The checkpointed bytes could not be read back for the baselines.
    #[error(transparent)]
    Stream(#[from] StreamError<std::io::Error>),
    /// A chunk could not be encoded (`--stages`).
    #[error(transparent)]
    Encode(#[from] ChunkEncodeError),
    /// A size does not fit.
    #[error("size out of range: {0}")]
    Range(#[from] TryFromIntError),
    /// The figures could not be written as JSON.
    #[error("figures as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// One configuration failed.
    #[error("{procs} process(es) x {size}: {source}")]
    Config {
        /// Ranks.
        procs: u32,
        /// State per rank.
        size: String,
        /// What failed.
        source: Box<AgentBenchError>,
    },
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_until(
    what: &'static str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool, AgentBenchError>,
) -> Result<(), AgentBenchError> {
    let start = Instant::now();
    while !cond()? {
        if start.elapsed() > timeout {
            return Err(AgentBenchError::Timeout { what, timeout });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

struct Config<'a> {
    dir: &'a Path,
    agent: &'a Path,
    counter: &'a Path,
    procs: u32,
    size: u64,
    budget: u64,
    copy_threads: Option<usize>,
    store_threads: Option<usize>,
    chunk_size: Option<&'a str>,
    state_kind: &'a str,
    pause_samples: u32,
    changed: f64,
    restore_threads: &'a [usize],
}

/// The chunk size the agent runs with.
fn chunk_bytes(cfg: &Config<'_>) -> Result<u64, AgentBenchError> {
    cfg.chunk_size.map_or(Ok(DEFAULT_CHUNK_SIZE as u64), |s| {
        parse_bytes(s).map_err(AgentBenchError::ChunkSize)
    })
}

fn spawn_rank(
    cfg: &Config<'_>,
    socket: &Path,
    rank: u32,
    restore_threads: Option<usize>,
) -> Result<Child, AgentBenchError> {
    let tag = format!("p{}-s{}-r{rank}", cfg.procs, cfg.size >> 20);
    let mut command = Command::new(cfg.counter);
    // The ranks change only `changed` of their chunks, spread evenly over the
    // state, however many steps they take between two checkpoints: they run
    // on while the previous epoch drains, so a share set by counting steps
    // would grow with the drain time.
    if cfg.changed > 0.0 {
        command
            .arg("--changing-share")
            .arg(cfg.changed.min(1.0).to_string())
            .arg("--change-unit-kib")
            .arg((chunk_bytes(cfg)? >> 10).to_string());
    }
    if let Some(threads) = restore_threads {
        command.env(ENV_RESTORE_THREADS, threads.to_string());
    }
    let err = cfg.dir.join(format!("{tag}.err"));
    command
        .args(["--steps", "100000000", "--step-ms", "1"])
        .arg("--state-mb")
        .arg((cfg.size >> 20).to_string())
        .arg("--state-kind")
        .arg(cfg.state_kind)
        .arg("--log")
        .arg(cfg.dir.join(format!("{tag}.log")))
        .arg("--input")
        .arg(cfg.dir.join("input.dat"))
        .arg("--final")
        .arg(cfg.dir.join(format!("{tag}.final")))
        .env("CRYO_AGENT_SOCKET", socket)
        .env("CRYO_JOB", "bench")
        .env("CRYO_RANK", rank.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err).step("creating", &err)?)
        .spawn()
        .map_err(|source| AgentBenchError::Start {
            what: "cryo-counter",
            source,
        })
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz.max(1) as f64
}

fn status(socket: &Path) -> Result<cryo_core::protocol::AgentStatus, AgentBenchError> {
    match client::request(socket, &ControlRequest::Status)? {
        ControlResponse::Status(s) => Ok(s),
        other => Err(AgentBenchError::Answer {
            what: "status",
            answer: format!("unexpected {other:?}"),
        }),
    }
}

fn one(cfg: &Config<'_>) -> Result<AgentRun, AgentBenchError> {
    let run_dir = cfg.dir.join(format!("p{}-s{}", cfg.procs, cfg.size >> 20));
    fs::create_dir_all(&run_dir).step("creating", &run_dir)?;
    let socket = run_dir.join("agent.sock");
    let store = run_dir.join("store");
    let agent_log = run_dir.join("agent.log");
    let mut children = Kill(Vec::new());
    let mut agent = Command::new(cfg.agent);
    // Warm at once: these figures are of a pause into a warm budget (the
    // start benchmark shows what the default delay is for).
    agent.args(["serve", "--prefault-delay", "0"]);
    if let Some(n) = cfg.copy_threads {
        agent.arg("--copy-threads").arg(n.to_string());
    }
    if let Some(n) = cfg.store_threads {
        agent.arg("--store-threads").arg(n.to_string());
    }
    if let Some(size) = cfg.chunk_size {
        agent.arg("--chunk-size").arg(size);
    }
    children.0.push(
        agent
            .arg("--socket")
            .arg(&socket)
            .arg("--store")
            .arg(&store)
            .args(["--job", "bench", "--node", "bench"])
            .arg("--copy-budget")
            .arg(cfg.budget.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&agent_log).step("creating", &agent_log)?)
            .spawn()
            .map_err(|source| AgentBenchError::Start {
                what: "the agent",
                source,
            })?,
    );
    wait_until("the agent", Duration::from_secs(30), || {
        Ok(UnixStream::connect(&socket).is_ok())
    })?;
    for rank in 0..cfg.procs {
        children.0.push(spawn_rank(cfg, &socket, rank, None)?);
    }
    let logs: Vec<PathBuf> = (0..cfg.procs)
        .map(|r| {
            cfg.dir
                .join(format!("p{}-s{}-r{r}.log", cfg.procs, cfg.size >> 20))
        })
        .collect();
    wait_until("every rank to run", Duration::from_secs(300), || {
        Ok(logs
            .iter()
            .all(|l| fs::metadata(l).map(|m| m.len() > 0).unwrap_or(false)))
    })?;
    // The agent warms as much of its budget as its ranks' state needs,
    // once it has seen them: a checkpoint then pauses for a memcpy.
    let state = u64::from(cfg.procs).saturating_mul(cfg.size);
    wait_until(
        "the copy budget to be pre-faulted",
        Duration::from_secs(300),
        || {
            let s = status(&socket)?;
            Ok(s.copy_budget_warm >= s.copy_budget.min(state))
        },
    )?;
    let agent_pid = children.0[0].id();
    let checkpoint = |full: bool| -> Result<CheckpointReport, AgentBenchError> {
        match client::request(
            &socket,
            &ControlRequest::Checkpoint {
                full,
                epoch: None,
                if_busy: BusyPolicy::Wait,
                until: Completion::Committed,
            },
        )? {
            ControlResponse::Checkpoint(r) => Ok(r),
            other => Err(AgentBenchError::Answer {
                what: "checkpoint",
                answer: format!("{other:?}"),
            }),
        }
    };
    let worst_pause = |r: &CheckpointReport| r.ranks.iter().map(|r| r.pause_ns).max().unwrap_or(0);
    let cpu_before = cpu_seconds(agent_pid);
    let report = checkpoint(false)?;

    let agent_cpu = cpu_seconds(agent_pid) - cpu_before;

    // Baselines on the same bytes, in the same run.
    let per_rank = usize::try_from(report.ranks[0].bytes)?;
    let copy_ns = memcpy_ns(per_rank);
    let job = Store::open(&store)?.existing_job("bench")?;
    let manifest = job.load_manifest(report.epoch)?;
    // zstd reads the bytes from memory (tmpfs) as the agent does, and
    // writes next to the store, on the same disk.
    let shm = Path::new("/dev/shm");
    let raw = if shm.is_dir() {
        shm.join(format!("cryo-bench-{}.raw", std::process::id()))
    } else {
        run_dir.join("state.raw")
    };
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(fs::File::create(&raw).step("creating", &raw)?);
        for rank in &manifest.ranks {
            for region in &rank.regions {
                job.stream_region(region, 64 << 20, |_, bytes| out.write_all(bytes))?;
            }
        }
        out.flush().step("writing", &raw)?;
    }
    let zst = run_dir.join("state.raw.zst");
    let zstd_ns = timed_command(
        Command::new("zstd")
            .args(["-1", "-T0", "-q", "-f"])
            .arg(&raw)
            .arg("-o")
            .arg(&zst),
    );
    let _ = fs::remove_file(&raw);
    // Restart's baseline: decompress the same bytes back into memory (tmpfs).
    let zstd_d_ns = zstd_ns.and_then(|_| {
        timed_command(
            Command::new("zstd")
                .args(["-d", "-T0", "-q", "-f"])
                .arg(&zst)
                .arg("-o")
                .arg(&raw),
        )
    });
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(&zst);

    // More full checkpoints: the pause is the smallest sample.
    let mut best = report.ranks.clone();
    let mut pause_samples_ns = vec![worst_pause(&report)];
    for _ in 1..cfg.pause_samples {
        let sample = checkpoint(true)?;
        let worst = worst_pause(&sample);
        if worst < pause_samples_ns.iter().copied().min().unwrap_or(u64::MAX) {
            best = sample.ranks.clone();
        }
        pause_samples_ns.push(worst);
    }
    // Incremental: the ranks cycle through the blocks of `changed` of their
    // chunks; once rank 0 has been through every one, an ordinary checkpoint.
    let mut restart_epoch = report.epoch;
    let incremental = if cfg.changed > 0.0 {
        let chunk = chunk_bytes(cfg)?;
        let chunks = cfg.size.div_ceil(chunk).max(1) as f64;
        let blocks_per_chunk = (chunk / COUNTER_BLOCK).max(1);
        // A share of a chunk count that fits in memory: the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let steps = (cfg.changed.clamp(0.0, 1.0) * chunks).ceil() as u64 * blocks_per_chunk;
        let log = &logs[0];
        let start = count_lines(log);
        wait_until(
            "the ranks to change their state",
            Duration::from_secs(600),
            || Ok(count_lines(log) >= start + steps),
        )?;
        let steps = count_lines(log).saturating_sub(start);
        let inc = checkpoint(false)?;
        restart_epoch = inc.epoch;
        Some(IncrementalRun {
            steps,
            bytes: inc.ranks.iter().map(|r| r.bytes).sum(),
            copied_bytes: inc.ranks.iter().map(|r| r.copied_bytes).sum(),
            pause_ns: worst_pause(&inc),
            checkpoint_ns: inc.total_ns,
            stored_bytes: inc.stats.new_stored_bytes,
        })
    } else {
        None
    };

    // Restart: kill -9, arm, start again, time until every rank restored;
    // then again with each count of restore threads asked for.
    let restart_ns = restart(cfg, &socket, &mut children, restart_epoch, None)?;
    let mut restart_by_threads = Vec::new();
    for &threads in cfg.restore_threads {
        restart_by_threads.push(ThreadsRestart {
            threads,
            restart_ns: restart(cfg, &socket, &mut children, restart_epoch, Some(threads))?,
        });
    }
    drop(children);
    let raw_image_ns = raw_image_ns(cfg.dir, report.stats.raw_bytes)
        .inspect_err(|err| eprintln!("raw-image baseline skipped: {err}"))
        .ok();

    let node_copy_ns = if report.ranks.len() > 1 {
        // Ranks on a node share its memory bandwidth: the node's pause is
        // bounded by copying all of their bytes.
        let total: u64 = report.ranks.iter().map(|r| r.bytes).sum();
        let sample = total.min(1 << 30);
        u64::try_from(
            (u128::from(memcpy_ns(usize::try_from(sample)?)) * u128::from(total))
                / u128::from(sample.max(1)),
        )?
    } else {
        copy_ns
    };
    let result = AgentRun {
        procs: cfg.procs,
        size: cfg.size,
        copy_budget: report.copy_budget,
        rank_bytes: report.ranks.iter().map(|r| r.bytes).collect(),
        pause_ns: best.iter().map(|r| r.pause_ns).collect(),
        copy_ns: best.iter().map(|r| r.copy_ns).collect(),
        streamed: report.ranks.iter().map(|r| r.streamed).collect(),
        memcpy_ns: copy_ns,
        node_memcpy_ns: node_copy_ns,
        checkpoint_ns: report.total_ns,
        resumed_ns: report.resumed_ns,
        zstd_ns,
        zstd_d_ns,
        restart_ns,
        raw_image_ns,
        restart_by_threads,
        agent_cpu_s: agent_cpu,
        raw_bytes: report.stats.raw_bytes,
        stored_bytes: report.stats.new_stored_bytes,
        peak_rss_bytes: report.peak_rss_bytes,
        pause_samples_ns,
        incremental,
    };
    print_result(&result);
    Ok(result)
}

fn count_lines(path: &Path) -> u64 {
    fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
        .unwrap_or(0)
}

fn timed_command(command: &mut Command) -> Option<u64> {
    let t = Instant::now();
    match command.status() {
        Ok(s) if s.success() => Some(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        _ => None,
    }
}

/// Runs the benchmark.
pub fn run(args: &AgentBenchArgs) -> Result<(), AgentBenchError> {
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(AgentBenchError::CurrentExe)?
            .with_file_name("cryo-agent"),
    };
    let counter = match &args.counter {
        Some(p) => p.clone(),
        None => agent.with_file_name("cryo-counter"),
    };
    for (path, option) in [(&agent, "agent"), (&counter, "counter")] {
        if !path.exists() {
            return Err(AgentBenchError::Missing {
                path: path.clone(),
                option,
            });
        }
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d).step("creating", d)?;
            d.clone()
        }
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    if args.stages {
        return stages(&dir);
    }
    let mut input = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for byte in &mut input {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x.to_le_bytes()[0];
    }
    let input_path = dir.join("input.dat");
    fs::write(&input_path, input).step("writing", &input_path)?;
    let largest = args.procs.iter().max().copied().unwrap_or(1) as u64
        * args.sizes.iter().max().copied().unwrap_or(0);
    let budget = args.copy_budget.unwrap_or(largest + (64 << 20));
    let mut results = Vec::new();
    for &procs in &args.procs {
        for &size in &args.sizes {
            let result = one(&Config {
                dir: &dir,
                agent: &agent,
                counter: &counter,
                procs,
                size,
                budget,
                copy_threads: args.copy_threads,
                store_threads: args.store_threads,
                chunk_size: args.chunk_size.as_deref(),
                state_kind: &args.state_kind,
                pause_samples: args.pause_samples.max(1),
                changed: args.changed,
                restore_threads: &args.restore_threads,
            })
            .map_err(|source| AgentBenchError::Config {
                procs,
                size: format_bytes(size),
                source: Box::new(source),
            })?;
            results.push(result);
            // Written after each configuration, so a long run that fails
            // later still leaves its figures.
            if let Some(path) = &args.json {
                fs::write(path, serde_json::to_vec_pretty(&results)?).step("writing", path)?;
            }
        }
    }
    Ok(())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, IoStepError> {
        let path = std::env::temp_dir().join(format!("cryo-bench-{}", std::process::id()));
        fs::create_dir_all(&path).step("creating", &path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
