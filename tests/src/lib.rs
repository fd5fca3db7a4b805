//! Harness for cryo's end-to-end tests: starts the real `cryo-agent` and
//! real example ranks (Rust and C), waits with [`wait_until`], kills with
//! SIGKILL, and cleans every child up in `Drop`.
//!
//! The binaries come from the workspace's target directory: run
//! `cargo test --workspace` (or `cargo build --workspace` first), which
//! builds `cryo-agent`, `cryo-counter` and `libcryo_rank` before any test
//! runs.
#![deny(missing_docs)]
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cryo_agent::client;
use cryo_core::protocol::{
    BusyPolicy, CheckpointReport, Completion, ControlRequest, ControlResponse,
};

pub mod coordinated;
pub mod counter;
pub mod heat2d;
pub mod netns;
pub mod node_tmpfs;
pub mod preempted;
pub mod recovery;
pub mod slurm_jobs;
pub mod state;
pub mod trees;

pub use heat2d::Heat2dFiles;

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/<test binary>
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

/// Builds the binaries the tests run (`cryo-agent`, `cryo-counter`,
/// `libcryo_rank`), once per test process. `cargo test` builds the test
/// harnesses of other packages' binaries, not the binaries themselves, so
/// without this a test could run a stale `cryo-agent`.
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root).args([
            "build",
            "-p",
            "cryo-agent",
            "-p",
            "cryo-examples",
            "-p",
            "cryo-rank",
        ]);
        if bin_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building the binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A built binary; panics with a clear message when it is missing.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` or `cargo build --workspace` first",
        path.display()
    );
    path
}

/// The live processes, other than this one, whose command line (the
/// arguments, each ended by a NUL) satisfies `keep`.
pub fn pids_where(mut keep: impl FnMut(&[u8]) -> bool) -> Vec<nix::unistd::Pid> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(std::process::id()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if keep(&cmdline) {
            found.push(nix::unistd::Pid::from_raw(pid));
        }
    }
    found
}

/// SIGKILLs every process whose command line mentions `marker` (a test's
/// folder: `cryo run`, the agents, mpiexec, its proxies and the ranks),
/// three times 100 ms apart to catch those started meanwhile.
pub fn kill_every_process_mentioning(marker: &str) {
    for _ in 0..3 {
        for pid in pids_where(|cmdline| String::from_utf8_lossy(cmdline).contains(marker)) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ranks stopped with SIGSTOP by [`checkpoint_frozen`]; they continue when
/// this is dropped.
#[derive(Debug)]
#[must_use = "the ranks continue when this is dropped"]
pub struct Frozen(Vec<nix::unistd::Pid>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// What the example programs print on stderr after each capture.
const CHECKPOINTED: &str = ": checkpointed ";

/// Runs `checkpoint` (a request that returns once the epoch is committed)
/// and stops each of `ranks` as soon as it reports its capture, so that no
/// rank runs on while the epoch drains and commits, however long that
/// takes: the steps between two checkpoints are then the ones the test
/// waited for, and what a test reads right after the capture is what the
/// capture left. A rank that does not report (the checkpoint failed) is not
/// stopped.
pub fn checkpoint_frozen<T>(ranks: &[&Rank], checkpoint: impl FnOnce() -> T) -> (T, Frozen) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchers: Vec<_> = ranks
        .iter()
        .map(|rank| {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(rank.pid()).unwrap_or(0));
            let stderr = rank.files.stderr.clone();
            let reported = move || {
                fs::read_to_string(&stderr)
                    .unwrap_or_default()
                    .matches(CHECKPOINTED)
                    .count()
            };
            let before = reported();
            let done = std::sync::Arc::clone(&done);
            std::thread::spawn(move || loop {
                // Checked before `done`: a report that came with the end of
                // the checkpoint still stops the rank.
                if reported() > before {
                    return nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)
                        .ok()
                        .map(|()| pid);
                }
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        })
        .collect();
    let result = checkpoint();
    done.store(true, std::sync::atomic::Ordering::Release);
    let stopped = watchers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();
    (result, Frozen(stopped))
}

/// Number of lines in a file (0 if it does not exist).
pub fn lines(path: &Path) -> usize {
    fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

/// A running `cryo-agent serve`.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its store.
    pub store: PathBuf,
    /// Its job.
    pub job: String,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Agent {
    /// Starts an agent for `job` in `dir` with extra arguments.
    pub fn start(dir: &Path, job: &str, extra: &[&str]) -> Agent {
        Agent::start_with_env(dir, job, extra, &[])
    }

    /// Starts an agent with extra arguments and environment variables, and
    /// waits until it serves on its socket.
    pub fn start_with_env(dir: &Path, job: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::spawn(dir, job, extra, env);
        agent.wait_ready();
        agent
    }

    /// Spawns an agent without waiting for it (it may exit at once).
    pub fn spawn(dir: &Path, job: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::spawn_node(dir, &dir.join("store"), job, "test-node", extra, env)
    }

    /// Spawns the agent of node `node`, its socket and log in `dir`, its
    /// store at `store` (shared by the agents of several emulated nodes).
    pub fn spawn_node(
        dir: &Path,
        store: &Path,
        job: &str,
        node: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let socket = dir.join(format!("{job}.sock"));
        let store = store.to_owned();
        let log = dir.join(format!("agent-{job}.log"));
        let child = Command::new(bin("cryo-agent"))
            .env_remove("CRYO_TOKEN")
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--store")
            .arg(&store)
            .arg("--job")
            .arg(job)
            .arg("--node")
            .arg(node)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent {
            child,
            socket,
            store,
            job: job.into(),
            log,
        }
    }

    /// Waits until the agent serves on its socket; panics if it exits.
    pub fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        let log = self.log.clone();
        let child = &mut self.child;
        wait_until("the agent's socket", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "agent exited with {status}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// Waits for the agent to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        let child = &mut self.child;
        wait_until("the agent to exit", timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a control request.
    pub fn request(&self, request: &ControlRequest) -> ControlResponse {
        client::request(&self.socket, request).unwrap()
    }

    /// Checkpoints and waits for the commit; panics on failure.
    pub fn checkpoint(&self) -> CheckpointReport {
        match self.request(&ControlRequest::Checkpoint {
            full: false,
            epoch: None,
            if_busy: BusyPolicy::Wait,
            until: Completion::Committed,
        }) {
            ControlResponse::Checkpoint(report) => {
                assert!(report.committed);
                report
            }
            other => panic!(
                "checkpoint failed: {other:?}\nagent log:\n{}",
                self.log_text()
            ),
        }
    }

    /// Makes ranks that register next restart from the newest epoch.
    pub fn arm_restart(&self) -> u64 {
        match self.request(&ControlRequest::ArmRestart { epoch: None }) {
            ControlResponse::RestartArmed { epoch, .. } => epoch,
            other => panic!("arming restart failed: {other:?}"),
        }
    }

    /// Waits until `n` ranks are registered.
    pub fn wait_ranks(&self, n: usize) {
        wait_until(
            &format!("{n} registered ranks"),
            Duration::from_secs(20),
            || matches!(self.request(&ControlRequest::Status), ControlResponse::Status(s) if s.ranks.len() == n),
        );
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The job's store.
    pub fn job_store(&self) -> cryo_core::JobStore {
        cryo_core::Store::open(&self.store)
            .unwrap()
            .existing_job(&self.job)
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which example program.
#[derive(Debug, Clone)]
pub enum Program {
    /// The Rust `cryo-counter`.
    Rust,
    /// The C counter, at this path.
    C(PathBuf),
}

impl Program {
    fn path(&self) -> PathBuf {
        match self {
            Program::Rust => bin("cryo-counter"),
            Program::C(path) => path.clone(),
        }
    }
}

/// The files of one example rank.
#[derive(Debug, Clone)]
pub struct RankFiles {
    /// Log.
    pub log: PathBuf,
    /// Input.
    pub input: PathBuf,
    /// Final state.
    pub final_state: PathBuf,
    /// stdout.
    pub stdout: PathBuf,
    /// stderr.
    pub stderr: PathBuf,
}

impl RankFiles {
    /// Files under `dir` named after `tag`, sharing `input`.
    pub fn new(dir: &Path, tag: &str, input: &Path) -> RankFiles {
        RankFiles {
            log: dir.join(format!("{tag}.log")),
            input: input.to_owned(),
            final_state: dir.join(format!("{tag}.final")),
            stdout: dir.join(format!("{tag}.out")),
            stderr: dir.join(format!("{tag}.err")),
        }
    }
}

/// A running example rank.
#[derive(Debug)]
pub struct Rank {
    child: Option<Child>,
    /// Its files.
    pub files: RankFiles,
}

/// How to run an example rank.
#[derive(Debug, Clone)]
pub struct RankSpec<'a> {
    /// The program.
    pub program: &'a Program,
    /// The rank number.
    pub rank: u32,
    /// The agent (None: run alone).
    pub agent: Option<&'a Agent>,
    /// Steps.
    pub steps: u64,
    /// State size in MiB.
    pub state_mb: u64,
    /// Milliseconds per step.
    pub step_ms: u64,
}

impl Rank {
    /// Starts a rank.
    pub fn start(spec: &RankSpec<'_>, files: &RankFiles) -> Rank {
        Rank::start_with_env(spec, files, &[])
    }

    /// Starts a rank with extra environment variables (say, `CRYO_TOKEN`).
    pub fn start_with_env(spec: &RankSpec<'_>, files: &RankFiles, env: &[(&str, &str)]) -> Rank {
        let mut cmd = Command::new(spec.program.path());
        cmd.arg("--steps")
            .arg(spec.steps.to_string())
            .arg("--log")
            .arg(&files.log)
            .arg("--input")
            .arg(&files.input)
            .arg("--state-mb")
            .arg(spec.state_mb.to_string())
            .arg("--final")
            .arg(&files.final_state)
            .arg("--step-ms")
            .arg(spec.step_ms.to_string())
            .env_remove("CRYO_AGENT_SOCKET")
            .env_remove("CRYO_JOB")
            .env_remove("CRYO_REGION_BASE")
            .env_remove("CRYO_FILE_POLICY")
            .env_remove("CRYO_TOKEN")
            .env_remove("CRYO_RESTART_FROM")
            .env("CRYO_RANK", spec.rank.to_string())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&files.stdout).unwrap())
            .stderr(fs::File::create(&files.stderr).unwrap());
        if let Some(agent) = spec.agent {
            cmd.env("CRYO_AGENT_SOCKET", &agent.socket)
                .env("CRYO_JOB", &agent.job);
        }
        cmd.envs(env.iter().copied());
        Rank {
            child: Some(cmd.spawn().unwrap()),
            files: files.clone(),
        }
    }

    /// Runs a rank to completion and returns its exit status.
    pub fn run(spec: &RankSpec<'_>, files: &RankFiles) -> ExitStatus {
        Rank::start(spec, files).wait()
    }

    /// Waits until its log has at least `n` lines.
    pub fn wait_lines(&mut self, n: usize) {
        let log = self.files.log.clone();
        let stderr = self.files.stderr.clone();
        let child = self.child.as_mut().unwrap();
        wait_until(
            &format!("{n} log lines in {}", log.display()),
            Duration::from_secs(60),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "rank exited early with {status}: {}",
                        fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
                lines(&log) >= n
            },
        );
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for it to exit.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("rank did not finish within 120 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its stderr so far.
    pub fn stderr(files: &RankFiles) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&files.stderr) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A deterministic input file of `len` bytes.
pub fn write_input(path: &Path, len: usize) {
    let mut x = 0x1234_5678_9abc_def0u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    fs::write(path, bytes).unwrap();
}

/// Asserts two files are byte-identical, naming them otherwise.
pub fn assert_same_file(a: &Path, b: &Path) {
    let left = fs::read(a).unwrap_or_else(|e| panic!("reading {}: {e}", a.display()));
    let right = fs::read(b).unwrap_or_else(|e| panic!("reading {}: {e}", b.display()));
    if left != right {
        let first = left
            .iter()
            .zip(&right)
            .position(|(x, y)| x != y)
            .unwrap_or(left.len().min(right.len()));
        panic!(
            "{} ({} bytes) and {} ({} bytes) differ from byte {first}",
            a.display(),
            left.len(),
            b.display(),
            right.len()
        );
    }
}

/// Builds the C example with `cc` against `cryo.h` and `libcryo_rank.so`,
/// once per test process. `None` (with a loud message) when no C compiler
/// is available.
pub fn c_counter() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| build_c_counter(false)).clone()
}

/// Like [`c_counter`], linked against the static `libcryo_rank.a`.
pub fn c_counter_static() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| build_c_counter(true)).clone()
}

fn build_c_counter(static_lib: bool) -> Option<PathBuf> {
    {
        {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_owned();
            ensure_built();
            let lib_dir = bin_dir();
            assert!(
                lib_dir.join("libcryo_rank.so").exists(),
                "libcryo_rank.so is missing from {}: run `cargo build --workspace` first",
                lib_dir.display()
            );
            let kind = if static_lib { "static" } else { "shared" };
            let out =
                std::env::temp_dir().join(format!("cryo-c-counter-{kind}-{}", std::process::id()));
            let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
            cc.arg("-O2")
                .arg("-Wall")
                .arg("-Werror")
                .arg("-o")
                .arg(&out)
                .arg(root.join("examples/c/counter.c"))
                .arg("-I")
                .arg(root.join("rank/include"));
            if static_lib {
                // The static runtime carries the MPI quiesce code: link MPI.
                cc.arg(lib_dir.join("libcryo_rank.a"))
                    .args(["-lmpi", "-lpthread", "-ldl", "-lm"]);
            } else {
                cc.arg("-L")
                    .arg(&lib_dir)
                    .arg("-lcryo_rank")
                    .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
            }
            let status = cc.status();
            match status {
                Ok(s) if s.success() => Some(out),
                Ok(s) => panic!("compiling examples/c/counter.c failed: {s}"),
                Err(err) => {
                    eprintln!("\n!!!!! SKIPPING C EXAMPLE TESTS: no C compiler ({err}) !!!!!\n");
                    None
                }
            }
        }
    }
}

/// Builds workspace packages (binaries and libraries), once per package
/// per test process, and returns the directory holding what they built.
/// `cargo test` builds other packages' test harnesses, not their binaries,
/// so a test that runs a binary must build it first.
pub fn build_packages(packages: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !built.iter().any(|b| b == p))
        .collect();
    if !missing.is_empty() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root).arg("build");
        for package in &missing {
            cmd.args(["-p", package]);
        }
        if bin_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building {missing:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.extend(missing.iter().map(|p| (*p).to_owned()));
    }
    bin_dir()
}

/// A finished command's stdout then stderr, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// XORs `mask` into the stored bytes of `chunk` at each of `at` (offsets
/// within its stored bytes: its chunk header, then its payload), wherever
/// the store keeps it (its own file or an entry of a pack). The file keeps
/// its length. Returns the file changed.
pub fn damage_stored_chunk(
    job: &cryo_core::JobStore,
    chunk: &cryo_core::format::manifest::ChunkRef,
    at: impl Fn(u64) -> Vec<u64>,
    mask: u8,
) -> PathBuf {
    let stored = job
        .locate_chunk(chunk)
        .unwrap_or_else(|| panic!("chunk {} is not in the store", chunk.hash));
    let mut bytes = fs::read(&stored.path).unwrap();
    for offset in at(stored.len) {
        assert!(offset < stored.len, "offset {offset} beyond the chunk");
        bytes[usize::try_from(stored.offset + offset).unwrap()] ^= mask;
    }
    let len = bytes.len();
    fs::write(&stored.path, &bytes).unwrap();
    assert_eq!(fs::metadata(&stored.path).unwrap().len(), len as u64);
    stored.path
}
