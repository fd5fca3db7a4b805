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
use cryo_core::protocol::{
    BusyPolicy, CheckpointReport, Completion, ControlRequest, ControlResponse,
};
use cryo_core::store::Store;

use crate::client;
use crate::units::{format_bytes, parse_bytes};

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
}

fn spawn_rank(cfg: &Config<'_>, socket: &Path, rank: u32) -> Result<Child> {
    let tag = format!("p{}-s{}-r{rank}", cfg.procs, cfg.size >> 20);
    Command::new(cfg.counter)
        .args(["--steps", "100000000", "--step-ms", "1"])
        .arg("--state-mb")
        .arg((cfg.size >> 20).to_string())
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

fn one(cfg: &Config<'_>) -> Result<()> {
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
    let cpu_before = cpu_seconds(agent_pid);
    let report: CheckpointReport = match client::request(
        &socket,
        &ControlRequest::Checkpoint {
            epoch: None,
            if_busy: BusyPolicy::Wait,
            until: Completion::Committed,
        },
    )? {
        ControlResponse::Checkpoint(r) => r,
        other => bail!("checkpoint failed: {other:?}"),
    };

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
    let t = Instant::now();
    let zstd = Command::new("zstd")
        .args(["-1", "-T0", "-q", "-f"])
        .arg(&raw)
        .arg("-o")
        .arg(run_dir.join("state.raw.zst"))
        .status();
    let zstd_ns = match zstd {
        Ok(s) if s.success() => Some(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        _ => None,
    };
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(run_dir.join("state.raw.zst"));

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
            epoch: Some(report.epoch),
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

    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "== {} process(es) x {} of state (copy budget {}) ==",
        cfg.procs,
        format_bytes(cfg.size),
        format_bytes(cfg.budget)
    );
    println!(
        "  memcpy of {} (1 thread, warm): {:.1} ms",
        format_bytes(report.ranks[0].bytes),
        ms(copy_ns)
    );
    for rank in &report.ranks {
        println!(
            "  rank {}: pause {:.1} ms (copy {:.1} ms) = {:.2}x memcpy (target <= 1.5x){}",
            rank.rank,
            ms(rank.pause_ns),
            ms(rank.copy_ns),
            rank.pause_ns as f64 / copy_ns as f64,
            if rank.streamed {
                " [streamed: over the copy budget]"
            } else {
                ""
            }
        );
    }
    if report.ranks.len() > 1 {
        // Ranks on a node share its memory bandwidth: the node's pause is
        // bounded by copying all of their bytes.
        let total: u64 = report.ranks.iter().map(|r| r.bytes).sum();
        let sample = total.min(1 << 30);
        let node_copy_ns = u64::try_from(
            (u128::from(memcpy_ns(usize::try_from(sample)?)) * u128::from(total))
                / u128::from(sample.max(1)),
        )?;
        let worst = report.ranks.iter().map(|r| r.pause_ns).max().unwrap_or(0);
        let mean = report.ranks.iter().map(|r| r.pause_ns).sum::<u64>() / report.ranks.len() as u64;
        println!(
            "  node: worst pause {:.1} ms, mean {:.1} ms; memcpy of all {} ranks' {}: {:.1} ms; worst = {:.2}x (target <= 1.5x)",
            ms(worst),
            ms(mean),
            report.ranks.len(),
            format_bytes(total),
            ms(node_copy_ns),
            worst as f64 / node_copy_ns as f64
        );
    }
    match zstd_ns {
        Some(z) => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd -1 -T0 on the same {}: {:.1} ms; ratio {:.2}x (target <= 1.1x)",
            ms(report.total_ns),
            ms(report.resumed_ns),
            format_bytes(report.stats.raw_bytes),
            ms(z),
            report.total_ns as f64 / z as f64
        ),
        None => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd not available for the baseline",
            ms(report.total_ns),
            ms(report.resumed_ns)
        ),
    }
    println!(
        "  agent CPU during the checkpoint: {:.2} s = {:.2} cores busy on average",
        agent_cpu,
        agent_cpu / (report.total_ns as f64 / 1e9)
    );
    println!(
        "  stored {} for {} raw ({:.2}x)",
        format_bytes(report.stats.new_stored_bytes),
        format_bytes(report.stats.raw_bytes),
        report.stats.raw_bytes as f64 / report.stats.new_stored_bytes.max(1) as f64
    );
    println!(
        "  restart (process start to all regions restored): {:.1} ms",
        restart_ns as f64 / 1e6
    );
    println!(
        "  agent peak RSS {} against a copy budget of {} ({:.2}x)",
        format_bytes(report.peak_rss_bytes),
        format_bytes(report.copy_budget),
        report.peak_rss_bytes as f64 / report.copy_budget as f64
    );
    Ok(())
}

/// Single-thread throughput of each stage of storing chunks.
fn stages(dir: &Path) -> Result<()> {
    use cryo_core::chunk::{shuffle8, ChunkCodec, ChunkHash, Filter, DEFAULT_CHUNK_SIZE};
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
    rate("shuffle8 filter", t);
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
    for &procs in &args.procs {
        for &size in &args.sizes {
            one(&Config {
                dir: &dir,
                exe: &exe,
                counter: &counter,
                procs,
                size,
                budget,
                copy_threads: args.copy_threads,
                store_threads: args.store_threads,
                chunk_size: args.chunk_size.as_deref(),
            })
            .with_context(|| format!("{procs} process(es) x {}", format_bytes(size)))?;
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
