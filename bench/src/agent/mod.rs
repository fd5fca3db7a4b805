//! `cryo-agent bench`: checkpoint and restart figures on real processes.
//!
//! For each process count and state size it starts a `cryo-agent serve`
//! child and that many `cryo-counter` ranks, checkpoints them, and prints:
//! * the pause of each rank, against a plain single-threaded memcpy of the
//!   same number of bytes into warm memory, measured in the same run
//!   (target ≤ 1.5×);
//! * the end-to-end checkpoint time (request to commit, fsyncs included),
//!   against `zstd -1 -T0` on the same bytes (target ≤ 1.1×);
//! * the restart time (process start to every region restored);
//! * the agent's peak RSS against its copy budget.
//!
//! Build in release mode first: `cargo build --release`, then
//! `target/release/cryo-agent bench`.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cryo_core::chunk::DEFAULT_CHUNK_SIZE;
use cryo_core::protocol::{
    BusyPolicy, CheckpointReport, Completion, ControlRequest, ControlResponse,
};
use cryo_core::store::Store;

use crate::client;
use crate::units::{format_bytes, parse_bytes};

/// The block `cryo-counter` changes per step.
const COUNTER_BLOCK: u64 = 256 << 10;

/// Benchmark options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
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
    /// The example rank binary (default: `cryo-counter` next to this one).
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
}

/// An incremental checkpoint after the ranks changed part of their state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IncrementalResult {
    /// Steps rank 0 had taken since the previous checkpoint when the
    /// incremental one was requested (each changes one 256 KiB block of the
    /// changing chunks, in turn).
    pub steps: u64,
    /// Region bytes of all ranks.
    pub bytes: u64,
    /// Of those, bytes copied (written since the previous checkpoint).
    pub copied_bytes: u64,
    /// Worst rank's pause.
    pub pause_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
}

/// The figures of one configuration, all measured in the same run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentBenchResult {
    /// Ranks on the node.
    pub procs: u32,
    /// State bytes per rank (the region; the counter adds a 4 KiB header).
    pub size: u64,
    /// The agent's copy budget.
    pub copy_budget: u64,
    /// Bytes captured per rank.
    pub rank_bytes: Vec<u64>,
    /// Each rank's job-visible pause.
    pub pause_ns: Vec<u64>,
    /// Each rank's copy time inside its pause.
    pub copy_ns: Vec<u64>,
    /// Whether each rank streamed (over the copy budget).
    pub streamed: Vec<bool>,
    /// Single-threaded memcpy of one rank's bytes into warm memory.
    pub memcpy_ns: u64,
    /// memcpy of all ranks' bytes (scaled from at most 1 GiB).
    pub node_memcpy_ns: u64,
    /// Request to commit.
    pub checkpoint_ns: u64,
    /// Request to every rank resumed.
    pub resumed_ns: u64,
    /// `zstd -1 -T0` on the same bytes (from tmpfs, written beside the store).
    pub zstd_ns: Option<u64>,
    /// `zstd -d -T0` of that output (to tmpfs).
    pub zstd_d_ns: Option<u64>,
    /// Process start to every region restored.
    pub restart_ns: u64,
    /// Agent CPU seconds during the checkpoint.
    pub agent_cpu_s: f64,
    /// Raw bytes checkpointed.
    pub raw_bytes: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
    /// Agent peak RSS.
    pub peak_rss_bytes: u64,
    /// The worst rank's pause in each full checkpoint (`pause_ns` is the
    /// sample with the smallest).
    #[serde(default)]
    pub pause_samples_ns: Vec<u64>,
    /// The incremental checkpoint, if measured.
    #[serde(default)]
    pub incremental: Option<IncrementalResult>,
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

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !cond()? {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn memcpy_ns(bytes: usize) -> u64 {
    let src: Vec<u8> = (0..bytes)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31))
        .collect();
    let mut dst = vec![1u8; bytes]; // written once: warm, like the agent's pool
    let mut best = u64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        std::hint::black_box(&dst);
    }
    best
}

struct Config<'a> {
    dir: &'a Path,
    exe: &'a Path,
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
}

/// The chunk size the agent runs with.
fn chunk_bytes(cfg: &Config<'_>) -> Result<u64> {
    cfg.chunk_size.map_or(Ok(DEFAULT_CHUNK_SIZE as u64), |s| {
        parse_bytes(s).map_err(|e| anyhow::anyhow!("--chunk-size: {e}"))
    })
}

fn spawn_rank(cfg: &Config<'_>, socket: &Path, rank: u32) -> Result<Child> {
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
        .stderr(fs::File::create(cfg.dir.join(format!("{tag}.err")))?)
        .spawn()
        .context("starting cryo-counter")
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

fn status(socket: &Path) -> Result<cryo_core::protocol::AgentStatus> {
    match client::request(socket, &ControlRequest::Status)? {
        ControlResponse::Status(s) => Ok(s),
        other => bail!("unexpected {other:?}"),
    }
}

fn one(cfg: &Config<'_>) -> Result<AgentBenchResult> {
    let run_dir = cfg.dir.join(format!("p{}-s{}", cfg.procs, cfg.size >> 20));
    fs::create_dir_all(&run_dir)?;
    let socket = run_dir.join("agent.sock");
    let store = run_dir.join("store");
    let mut children = Kill(Vec::new());
    let mut agent = Command::new(cfg.exe);
    agent.arg("serve");
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
            .stderr(fs::File::create(run_dir.join("agent.log"))?)
            .spawn()
            .context("starting the agent")?,
    );
    wait_until("the agent", Duration::from_secs(30), || {
        Ok(UnixStream::connect(&socket).is_ok())
    })?;
    wait_until(
        "the copy budget to be pre-faulted",
        Duration::from_secs(300),
        || {
            let s = status(&socket)?;
            Ok(s.copy_budget_warm >= s.copy_budget)
        },
    )?;
    for rank in 0..cfg.procs {
        children.0.push(spawn_rank(cfg, &socket, rank)?);
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
    let agent_pid = children.0[0].id();
    let checkpoint = |full: bool| -> Result<CheckpointReport> {
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
            other => bail!("checkpoint failed: {other:?}"),
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
        let mut out = std::io::BufWriter::new(fs::File::create(&raw)?);
        for rank in &manifest.ranks {
            for region in &rank.regions {
                job.stream_region(region, 64 << 20, |_, bytes| out.write_all(bytes))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        out.flush()?;
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
        Some(IncrementalResult {
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

    // Restart: kill -9, arm, start again, time until every rank restored.
    for child in children.0.iter_mut().skip(1) {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.0.truncate(1);
    wait_until("the ranks to leave", Duration::from_secs(30), || {
        Ok(status(&socket)?.ranks.is_empty())
    })?;
    match client::request(
        &socket,
        &ControlRequest::ArmRestart {
            epoch: Some(restart_epoch),
        },
    )? {
        ControlResponse::RestartArmed { .. } => {}
        other => bail!("arming the restart failed: {other:?}"),
    }
    let errs: Vec<PathBuf> = (0..cfg.procs)
        .map(|r| {
            cfg.dir
                .join(format!("p{}-s{}-r{r}.err", cfg.procs, cfg.size >> 20))
        })
        .collect();
    let t = Instant::now();
    for rank in 0..cfg.procs {
        children.0.push(spawn_rank(cfg, &socket, rank)?);
    }
    wait_until("every rank to restart", Duration::from_secs(600), || {
        Ok(errs.iter().all(|e| {
            fs::read_to_string(e)
                .map(|t| t.contains("restarted from epoch"))
                .unwrap_or(false)
        }))
    })?;
    let restart_ns = t.elapsed().as_nanos();
    drop(children);

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
    let result = AgentBenchResult {
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
        restart_ns: u64::try_from(restart_ns).unwrap_or(u64::MAX),
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

fn print_result(r: &AgentBenchResult) {
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "== {} process(es) x {} of state (copy budget {}) ==",
        r.procs,
        format_bytes(r.size),
        format_bytes(r.copy_budget)
    );
    println!(
        "  memcpy of {} (1 thread, warm): {:.1} ms",
        format_bytes(r.rank_bytes.first().copied().unwrap_or(0)),
        ms(r.memcpy_ns)
    );
    for (rank, pause) in r.pause_ns.iter().enumerate() {
        println!(
            "  rank {rank}: pause {:.1} ms (copy {:.1} ms) = {:.2}x memcpy (target <= 1.5x){}",
            ms(*pause),
            ms(r.copy_ns.get(rank).copied().unwrap_or(0)),
            *pause as f64 / r.memcpy_ns.max(1) as f64,
            if r.streamed.get(rank).copied().unwrap_or(false) {
                " [streamed: over the copy budget]"
            } else {
                ""
            }
        );
    }
    if r.pause_ns.len() > 1 {
        let worst = r.pause_ns.iter().max().copied().unwrap_or(0);
        let mean = r.pause_ns.iter().sum::<u64>() / r.pause_ns.len() as u64;
        println!(
            "  node: worst pause {:.1} ms, mean {:.1} ms; memcpy of all {} ranks' {}: {:.1} ms; worst = {:.2}x (target <= 1.5x)",
            ms(worst),
            ms(mean),
            r.pause_ns.len(),
            format_bytes(r.rank_bytes.iter().sum()),
            ms(r.node_memcpy_ns),
            worst as f64 / r.node_memcpy_ns.max(1) as f64
        );
    }
    match r.zstd_ns {
        Some(z) => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd -1 -T0 on the same {}: {:.1} ms; ratio {:.2}x (target <= 1.1x)",
            ms(r.checkpoint_ns),
            ms(r.resumed_ns),
            format_bytes(r.raw_bytes),
            ms(z),
            r.checkpoint_ns as f64 / z.max(1) as f64
        ),
        None => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd not available for the baseline",
            ms(r.checkpoint_ns),
            ms(r.resumed_ns)
        ),
    }
    println!(
        "  agent CPU during the checkpoint: {:.2} s = {:.2} cores busy on average",
        r.agent_cpu_s,
        r.agent_cpu_s / (r.checkpoint_ns.max(1) as f64 / 1e9)
    );
    println!(
        "  stored {} for {} raw ({:.2}x)",
        format_bytes(r.stored_bytes),
        format_bytes(r.raw_bytes),
        r.raw_bytes as f64 / r.stored_bytes.max(1) as f64
    );
    match r.zstd_d_ns {
        Some(z) => println!(
            "  restart (process start to all regions restored): {:.1} ms; zstd -d -T0 of the same bytes: {:.1} ms; ratio {:.2}x (target <= 1.2x)",
            ms(r.restart_ns),
            ms(z),
            r.restart_ns as f64 / z.max(1) as f64
        ),
        None => println!(
            "  restart (process start to all regions restored): {:.1} ms",
            ms(r.restart_ns)
        ),
    }
    if r.pause_samples_ns.len() > 1 {
        println!(
            "  pause samples (worst rank, full checkpoints): {:?} ms; the smallest is reported",
            r.pause_samples_ns
                .iter()
                .map(|p| (ms(*p) * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    if let Some(inc) = &r.incremental {
        println!(
            "  incremental after {} steps: copied {} of {} ({:.1}%), wrote {} ({:.1}% of the full checkpoint's), pause {:.1} ms, checkpoint {:.1} ms = {:.1}% of the full one's (target <= 20%)",
            inc.steps,
            format_bytes(inc.copied_bytes),
            format_bytes(inc.bytes),
            inc.copied_bytes as f64 * 100.0 / inc.bytes.max(1) as f64,
            format_bytes(inc.stored_bytes),
            inc.stored_bytes as f64 * 100.0 / r.stored_bytes.max(1) as f64,
            ms(inc.pause_ns),
            ms(inc.checkpoint_ns),
            inc.checkpoint_ns as f64 * 100.0 / r.checkpoint_ns.max(1) as f64
        );
    }
    println!(
        "  agent peak RSS {} against a copy budget of {} ({:.2}x; target <= budget + 64 MiB)",
        format_bytes(r.peak_rss_bytes),
        format_bytes(r.copy_budget),
        r.peak_rss_bytes as f64 / r.copy_budget.max(1) as f64
    );
}

/// Single-thread throughput of each stage of storing chunks.
fn stages(dir: &Path) -> Result<()> {
    use cryo_core::chunk::{shuffle8, ChunkCodec, ChunkHash, Filter};
    let total = 64usize << 20;
    // Like the counter's state: a smooth pattern with some noise.
    let mut data = vec![0u8; total];
    let mut x = 1u64;
    for (i, word) in data.chunks_exact_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let value =
            (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ if i % 64 == 0 { x } else { 0 };
        word.copy_from_slice(&value.to_le_bytes());
    }
    let chunks: Vec<&[u8]> = data.chunks(DEFAULT_CHUNK_SIZE).collect();
    let rate = |label: &str, t: Instant| {
        let secs = t.elapsed().as_secs_f64();
        println!("  {label:<40} {:>8.0} MB/s", total as f64 / secs / 1e6);
    };
    println!(
        "== stage costs, one thread, {} in 1 MiB chunks ==",
        format_bytes(total as u64)
    );
    let t = Instant::now();
    for c in &chunks {
        std::hint::black_box(ChunkHash::of(c));
    }
    rate("blake3 hash", t);
    let mut out = vec![0u8; DEFAULT_CHUNK_SIZE];
    let t = Instant::now();
    for c in &chunks {
        shuffle8(c, &mut out[..c.len()]);
        std::hint::black_box(&out);
    }
    rate("shuffle8 filter (SIMD where available)", t);
    let t = Instant::now();
    for c in &chunks {
        cryo_core::shuffle::shuffle8_scalar(c, &mut out[..c.len()]);
        std::hint::black_box(&out);
    }
    rate("shuffle8 filter (scalar reference)", t);
    for (label, codec) in [
        (
            "encode: hash + zstd -1 (no filter)",
            ChunkCodec {
                level: 1,
                filter: Filter::None,
            },
        ),
        (
            "encode: hash + shuffle8 + zstd -1 (default)",
            ChunkCodec::default(),
        ),
    ] {
        let t = Instant::now();
        for c in &chunks {
            std::hint::black_box(codec.encode(c)?);
        }
        rate(label, t);
    }
    let encoded: Vec<_> = chunks
        .iter()
        .map(|c| ChunkCodec::default().encode(c))
        .collect::<Result<_, _>>()?;
    let chunk_dir = dir.join("stage-chunks");
    fs::create_dir_all(&chunk_dir)?;
    let t = Instant::now();
    for (i, e) in encoded.iter().enumerate() {
        cryo_core::durable::write_replace(&chunk_dir.join(format!("{i}")), &[&e.file])?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  {:<40} {:>8.2} ms per chunk ({} stored per chunk)",
        "write + fsync (durable::write_replace)",
        secs * 1e3 / encoded.len() as f64,
        format_bytes(
            encoded.iter().map(|e| e.file.len() as u64).sum::<u64>() / encoded.len() as u64
        )
    );
    let _ = fs::remove_dir_all(&chunk_dir);
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let counter = match &args.counter {
        Some(p) => p.clone(),
        None => exe.with_file_name("cryo-counter"),
    };
    if !counter.exists() {
        bail!(
            "{} not found: build it (cargo build --release) or pass --counter",
            counter.display()
        );
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
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
    fs::write(dir.join("input.dat"), input)?;
    let largest = args.procs.iter().max().copied().unwrap_or(1) as u64
        * args.sizes.iter().max().copied().unwrap_or(0);
    let budget = args.copy_budget.unwrap_or(largest + (64 << 20));
    let mut results = Vec::new();
    for &procs in &args.procs {
        for &size in &args.sizes {
            let result = one(&Config {
                dir: &dir,
                exe: &exe,
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
            })
            .with_context(|| format!("{procs} process(es) x {}", format_bytes(size)))?;
            results.push(result);
            // Written after each configuration, so a long run that fails
            // later still leaves its figures.
            if let Some(path) = &args.json {
                fs::write(path, serde_json::to_vec_pretty(&results)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("cryo-bench-{}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
