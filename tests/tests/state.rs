//! The state suite, in the spirit of CRIU's zdtm: small C programs
//! (`tests/state/`), each holding its open files in one "shape" the way real
//! applications do (dup'ed fds, an `O_APPEND` log, `O_RDWR` read-back,
//! `pread`/`pwrite`, unlinked scratch files, a file replaced at its path,
//! `/dev/null` and `/dev/zero`, a directory fd with `openat`, stdio streams
//! with full and line buffers, a renamed file, `MAP_SHARED` and
//! `MAP_PRIVATE` file mappings), plus `all`, every shape in one job.
//!
//! Each test compiles its program with `mpicc`, runs it uninterrupted with
//! `mpiexec` (the reference), then runs it under `cryo run` on emulated
//! nodes, checkpoints it halfway, lets it run a few steps past the
//! checkpoint, `kill -9`s everything and restarts it on another node
//! layout. The restarted run must resume right after the checkpointed step
//! and end with an output directory byte-identical to the reference's, file
//! by file, with the same names. The programs check themselves as they go
//! (fd flags and offsets, file sizes, read-back contents, mappings) and
//! abort with the reason on stderr, which `cryo restart` passes on.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use cryo_tests::{build_packages, output_text, wait_until};

/// Steps of a one-shape run.
const ITERS: u64 = 40;
/// Steps of `all` (6 ranks on 2 cores): rank 0's stdout, forwarded by
/// Hydra, can lag several steps behind the ranks while the agents commit an
/// epoch, so the killed run needs more room to stop in.
const ALL_ITERS: u64 = 60;
/// Milliseconds each step sleeps under `cryo run`.
const STEP_MS: u64 = 50;
/// The step after which the test asks for the checkpoint (at least). The
/// ranks' first quiesce agreement lets them run 6 (2 ranks) to 10 (6 ranks)
/// safe points past the request (13 steps were seen with 6 ranks on 2 cores)
/// before they park, so the capture lands at about step 16 to 23, leaving
/// room for the steps past it.
const CHECKPOINT_AT: u64 = 10;
/// Steps the killed run must make past the checkpointed one, so that the
/// restart has writes to undo.
const PAST_CHECKPOINT: u64 = 3;
/// Every shape, one program each (`tests/state/<shape>.c`).
const SHAPES: &[&str] = &[
    "dup",
    "append",
    "rdwr",
    "pio",
    "unlinked",
    "recreated",
    "devnull",
    "dirfd",
    "stdio_full",
    "stdio_line",
    "renamed",
    "map_shared",
    "map_private",
];
/// Variables that would attach an uninterrupted reference run to an agent.
const CRYO_RANK_ENV: &[&str] = &[
    "CRYO_AGENT_SOCKET",
    "CRYO_JOB",
    "CRYO_TOKEN",
    "CRYO_REGION_BASE",
    "CRYO_FILE_POLICY",
    "CRYO_RANK",
];

/// Whether `mpiexec` and `mpicc` are there; says loudly when not.
fn have_mpi() -> bool {
    let works = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works("mpiexec", "--version") {
        eprintln!(
            "\n!!!!! SKIPPED: no mpiexec (install mpich); the state suite did not run !!!!!\n"
        );
        return false;
    }
    if !works("mpicc", "-show") {
        eprintln!("\n!!!!! SKIPPED: no mpicc (install mpich); the state suite did not run !!!!!\n");
        return false;
    }
    true
}

/// Builds `cryo`, `cryo-agent` and `libcryo_rank` once.
fn built() -> PathBuf {
    build_packages(&["cryo-coordinator", "cryo-agent", "cryo-rank"])
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Compiles `shape` (or `all`, every shape) with mpicc into `out`.
fn compile(shape: &str, out: &Path) {
    let bins = built();
    let root = repo_root();
    let state = root.join("tests/state");
    let mut cc = Command::new("mpicc");
    cc.args(["-std=c11", "-O2", "-Wall", "-Werror", "-o"])
        .arg(out)
        .arg("-I")
        .arg(root.join("rank/include"))
        .arg("-I")
        .arg(&state)
        .arg(state.join("harness.c"));
    if shape == "all" {
        cc.args(SHAPES.iter().map(|s| state.join(format!("{s}.c"))));
    } else {
        cc.arg(format!("-DSTATE_SHAPE={shape}"))
            .arg(state.join(format!("{shape}.c")));
    }
    cc.arg("-L")
        .arg(&bins)
        .arg("-lcryo_rank")
        .arg(format!("-Wl,-rpath,{}", bins.display()));
    let output = cc.output().unwrap();
    assert!(
        output.status.success(),
        "compiling tests/state/{shape} failed:\n{}",
        output_text(&output)
    );
}

/// The step numbers in rank 0's "step N" lines, in order.
fn steps(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// N of rank 0's "checkpointed after step N", if it said so.
fn checkpointed_after(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("checkpointed after step "))
        .and_then(|n| n.trim().parse().ok())
}

/// One test's folder: the program, the reference and run output folders,
/// the store, the scratch folders and the logs.
struct Case {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Case {
    fn new(shape: &str) -> Case {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cryo-state-{shape}-"))
            .tempdir()
            .unwrap();
        let program = dir.path().join(shape);
        compile(shape, &program);
        Case { dir, program }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn app_args(&self, out: &str, iters: u64, step_ms: u64) -> Vec<String> {
        vec![
            "--dir".into(),
            self.path(out).display().to_string(),
            "--iters".into(),
            iters.to_string(),
            "--step-ms".into(),
            step_ms.to_string(),
        ]
    }

    /// The uninterrupted reference run, without cryo, into `ref/`.
    fn reference(&self, ranks: u32, iters: u64) {
        let mut cmd = Command::new("mpiexec");
        for var in CRYO_RANK_ENV {
            cmd.env_remove(var);
        }
        let out = cmd
            .args(["-n", &ranks.to_string()])
            .arg(&self.program)
            .args(self.app_args("ref", iters, 0))
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).ends_with("OK\n"),
            "the uninterrupted reference run failed ({}):\n{}",
            out.status,
            output_text(&out)
        );
    }

    fn cryo(&self) -> Command {
        let mut cmd = Command::new(built().join("cryo"));
        cmd.env("CRYO_STORE", self.path("store"))
            .env("CRYO_LOG", "info")
            .current_dir(self.dir.path());
        cmd
    }

    /// `cryo run` in the background, writing into `run/`; its stdout (rank
    /// 0's "step N" lines) goes to `run.stdout`.
    fn start(&self, job: &str, nodes: &str, ranks: u32, iters: u64) -> Job {
        let log = self.path(&format!("cryo-run-{job}.log"));
        let stdout = self.path("run.stdout");
        let child = self
            .cryo()
            .args(["run", "--job", job, "--nodes", nodes, "-n"])
            .arg(ranks.to_string())
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}")))
            .arg("--")
            .arg(&self.program)
            .args(self.app_args("run", iters, STEP_MS))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Job {
            child: Some(child),
            log,
            stdout,
        }
    }

    fn restart(&self, job: &str, nodes: &str) -> Output {
        self.cryo()
            .args(["restart", job, "--nodes", nodes])
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}-restart")))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `cryo checkpoint` in the background, its output in `checkpoint.out`.
    fn checkpoint(&self, job: &str) -> Child {
        let out = fs::File::create(self.path("checkpoint.out")).unwrap();
        self.cryo()
            .args(["checkpoint", job])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap()
    }

    /// The ranks: the processes running this case's program.
    fn ranks(&self) -> Vec<nix::unistd::Pid> {
        let program = self.program.as_os_str().as_encoded_bytes();
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| {
                let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
                let argv0 = cmdline.split(|b| *b == 0).next()?;
                (argv0 == program).then(|| nix::unistd::Pid::from_raw(pid))
            })
            .collect()
    }

    /// Stops every rank with SIGSTOP (they are killed next).
    fn stop_ranks(&self) {
        for pid in self.ranks() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// The last lines of every agent log under `scratch`, for failure
    /// messages.
    fn agent_logs(&self, scratch: &str) -> String {
        let mut text = String::new();
        let Ok(nodes) = fs::read_dir(self.path(scratch)) else {
            return text;
        };
        let mut nodes: Vec<_> = nodes.flatten().map(|e| e.path()).collect();
        nodes.sort();
        for node in nodes {
            let log = node.join("agent.log");
            if let Ok(body) = fs::read_to_string(&log) {
                let lines: Vec<&str> = body.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                let _ = writeln!(text, "--- {} (last lines)", log.display());
                for line in tail {
                    let _ = writeln!(text, "{line}");
                }
            }
        }
        text
    }

    /// SIGKILLs every process whose command line mentions this case's
    /// folder: `cryo run`, the agents, mpiexec and the ranks.
    fn kill_everything(&self) {
        let marker = self.dir.path().display().to_string();
        for _ in 0..3 {
            for entry in fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if u32::try_from(pid).ok() == Some(std::process::id()) {
                    continue;
                }
                let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

/// A `cryo run` in the background.
struct Job {
    child: Option<Child>,
    log: PathBuf,
    stdout: PathBuf,
}

impl Job {
    fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its stdout and `cryo run`'s log, for failure messages.
    fn describe(&self) -> String {
        format!(
            "--- cryo run stdout:\n{}\n--- cryo run log:\n{}",
            self.stdout_text(),
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Waits until rank 0 has reported step `n`; panics if the job ends
    /// first.
    fn wait_step(&mut self, n: u64, what: &str) {
        let child = self.child.as_mut().unwrap();
        let stdout = self.stdout.clone();
        let log = self.log.clone();
        wait_until(what, Duration::from_secs(60), || {
            let text = fs::read_to_string(&stdout).unwrap_or_default();
            if steps(&text).last().copied().unwrap_or(0) >= n {
                return true;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "cryo run ended ({status}) while waiting for {what}:\n--- stdout:\n{text}\n--- log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            false
        });
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for a child (say, `cryo checkpoint`) to exit; kills it and
/// panics after `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let mut status = None;
    let start = std::time::Instant::now();
    while status.is_none() {
        status = child.try_wait().unwrap();
        if status.is_none() && start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?} waiting for {child:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    status.unwrap()
}

/// What a path in an output folder is.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Other(String),
}

/// Everything under `root`, by path relative to it.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(rel, Entry::File(fs::read(&path).unwrap()));
            } else {
                out.insert(rel, Entry::Other(format!("{:?}", meta.file_type())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The line of `bytes` around offset `at`, escaped, for a message.
fn excerpt(bytes: &[u8], at: usize) -> String {
    let at = at.min(bytes.len());
    let line_start = bytes[..at]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let start = line_start.max(at.saturating_sub(60));
    let end = bytes.len().min(start + 100);
    format!("\"{}\"", bytes[start..end].escape_ascii())
}

/// How two versions of one file differ: sizes, the first differing byte,
/// its line, and both sides there.
fn file_diff(name: &Path, reference: &[u8], run: &[u8]) -> String {
    let at = reference
        .iter()
        .zip(run)
        .position(|(a, b)| a != b)
        .unwrap_or(reference.len().min(run.len()));
    let line = reference[..at].iter().filter(|b| **b == b'\n').count() + 1;
    format!(
        "{}: reference {} bytes, restarted run {} bytes; first difference at byte {at} (line {line})\n    reference: {}\n    restarted: {}",
        name.display(),
        reference.len(),
        run.len(),
        excerpt(reference, at),
        excerpt(run, at)
    )
}

/// Every difference between the reference folder and the run's; empty
/// when they are the same names with the same bytes.
fn compare_trees(reference: &Path, run: &Path) -> Vec<String> {
    let want = tree(reference);
    let got = tree(run);
    let mut problems = Vec::new();
    for (name, entry) in &want {
        match (entry, got.get(name)) {
            (_, None) => problems.push(format!(
                "{}: in the reference, missing after the restart",
                name.display()
            )),
            (Entry::File(a), Some(Entry::File(b))) if a != b => {
                problems.push(file_diff(name, a, b));
            }
            (a, Some(b)) if std::mem::discriminant(a) != std::mem::discriminant(b) => {
                problems.push(format!(
                    "{}: {} in the reference, {} after the restart",
                    name.display(),
                    kind(a),
                    kind(b)
                ));
            }
            _ => {}
        }
    }
    for (name, entry) in &got {
        if !want.contains_key(name) {
            problems.push(format!(
                "{}: {} left after the restart, not in the reference",
                name.display(),
                kind(entry)
            ));
        }
    }
    problems
}

fn kind(entry: &Entry) -> String {
    match entry {
        Entry::Dir => "a directory".into(),
        Entry::File(bytes) => format!("a file of {} bytes", bytes.len()),
        Entry::Other(what) => what.clone(),
    }
}

/// The whole scenario for one program: reference run; `cryo run` of
/// `ranks` ranks on `nodes`; checkpoint at about step 20; a few more
/// steps; `kill -9` of everything; `cryo restart` on `restart_nodes`; the
/// restarted run resumes after the checkpointed step and its output folder
/// equals the reference's byte for byte.
fn survives_kill_and_restart(
    shape: &str,
    iters: u64,
    ranks: u32,
    nodes: &str,
    restart_nodes: &str,
) {
    if !have_mpi() {
        return;
    }
    let case = Case::new(shape);
    case.reference(ranks, iters);
    let job_name = format!("state-{shape}").replace('_', "-");
    let job_name = job_name.as_str();

    let mut job = case.start(job_name, nodes, ranks, iters);
    job.wait_step(CHECKPOINT_AT, &format!("step {CHECKPOINT_AT}"));
    // `cryo checkpoint` returns once the epoch is committed, and the ranks
    // compute on meanwhile; so it runs in the background, and the ranks are
    // stopped a few steps past the captured one, however long the commit.
    let mut checkpoint = case.checkpoint(job_name);
    let checkpoint_out = case.path("checkpoint.out");
    let mut captured = None;
    wait_until(
        "rank 0 to say \"checkpointed after step N\"",
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = checkpoint.try_wait() {
                assert!(
                    status.success(),
                    "cryo checkpoint failed ({status}):\n{}\n{}\n{}",
                    fs::read_to_string(&checkpoint_out).unwrap_or_default(),
                    job.describe(),
                    case.agent_logs(&format!("scratch-{job_name}"))
                );
            }
            captured = checkpointed_after(&job.stdout_text());
            captured.is_some()
        },
    );
    let captured = captured.unwrap();
    let past = captured + PAST_CHECKPOINT;
    assert!(
        past < iters,
        "the checkpoint came too late (after step {captured} of {iters}) to run past it"
    );
    job.wait_step(past, &format!("step {past}, past the checkpoint"));
    case.stop_ranks();
    let status = wait_child(&mut checkpoint, Duration::from_secs(60));
    let said = fs::read_to_string(&checkpoint_out).unwrap_or_default();
    assert!(
        status.success() && said.contains("epoch 1 committed"),
        "cryo checkpoint failed ({status}):\n{said}\n{}\n{}",
        job.describe(),
        case.agent_logs(&format!("scratch-{job_name}"))
    );
    case.kill_everything();
    // What rank 0 had printed; the ranks may have been a few steps further.
    let killed_at = steps(&job.stdout_text()).last().copied().unwrap_or(0);
    // Each rank writes its summary last, at finish: not there, not finished.
    assert!(
        !case.path("run/summary.0.out").exists() && !job.stdout_text().contains("\nOK\n"),
        "the job finished before it was killed (checkpoint after step {captured})"
    );
    drop(job);

    let out = case.restart(job_name, restart_nodes);
    let said = output_text(&out);
    let context = || {
        format!(
            "{said}\n{}",
            case.agent_logs(&format!("scratch-{job_name}-restart"))
        )
    };
    assert!(
        out.status.success(),
        "cryo restart on {restart_nodes} failed ({}):\n{}",
        out.status,
        context()
    );
    assert!(
        said.contains(&format!("restarting job \"{job_name}\" from epoch 1")),
        "{}",
        context()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("resumed after step {captured} from epoch 1\n")),
        "the restarted ranks did not resume after step {captured} (the checkpointed one):\n{}",
        context()
    );
    let resumed = steps(&stdout);
    assert_eq!(
        (resumed.first().copied(), resumed.last().copied()),
        (Some(captured + 1), Some(iters)),
        "the restarted run must go on from step {} to {iters}:\n{}",
        captured + 1,
        context()
    );
    assert!(stdout.ends_with("OK\n"), "{}", context());

    let problems = compare_trees(&case.path("ref"), &case.path("run"));
    assert!(
        problems.is_empty(),
        "{shape}: checkpointed after step {captured}, killed at about step {killed_at}, restarted on {restart_nodes}: the output differs from the uninterrupted run in {} place(s):\n  {}\n(reference: {}, restarted run: {})",
        problems.len(),
        problems.join("\n  "),
        case.path("ref").display(),
        case.path("run").display()
    );
}

/// One test per shape: 2 ranks on two emulated nodes, restarted on one
/// node with both.
macro_rules! shape_test {
    ($name:ident, $shape:literal) => {
        #[test]
        fn $name() {
            survives_kill_and_restart($shape, ITERS, 2, "a:1,b:1", "c:2");
        }
    };
}

shape_test!(state_dup_survives_kill_and_restart, "dup");
shape_test!(state_append_survives_kill_and_restart, "append");
shape_test!(state_rdwr_survives_kill_and_restart, "rdwr");
shape_test!(state_pio_survives_kill_and_restart, "pio");
shape_test!(state_unlinked_survives_kill_and_restart, "unlinked");
shape_test!(state_recreated_survives_kill_and_restart, "recreated");
shape_test!(state_devnull_survives_kill_and_restart, "devnull");
shape_test!(state_dirfd_survives_kill_and_restart, "dirfd");
shape_test!(state_stdio_full_survives_kill_and_restart, "stdio_full");
shape_test!(state_stdio_line_survives_kill_and_restart, "stdio_line");
shape_test!(state_renamed_survives_kill_and_restart, "renamed");
shape_test!(state_map_shared_survives_kill_and_restart, "map_shared");
shape_test!(state_map_private_survives_kill_and_restart, "map_private");

/// Every shape in one job of 6 ranks on three nodes, restarted on six.
#[test]
fn state_all_survives_kill_and_restart() {
    survives_kill_and_restart(
        "all",
        ALL_ITERS,
        6,
        "a:2,b:2,c:2",
        "d:1,e:1,f:1,g:1,h:1,i:1",
    );
}

/// The list above names every program in tests/state/ (a new shape's file
/// without a test, or a test without its file, fails here).
#[test]
fn state_suite_lists_every_shape() {
    let dir = repo_root().join("tests/state");
    let mut on_disk: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".c").map(str::to_owned)
        })
        .filter(|name| name != "harness")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SHAPES.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "tests/state/*.c and SHAPES disagree");
    let header = fs::read_to_string(dir.join("state.h")).unwrap();
    for shape in SHAPES {
        assert!(
            header.contains(&format!("X({shape})")),
            "{shape} is missing from STATE_SHAPES in tests/state/state.h"
        );
    }
}
