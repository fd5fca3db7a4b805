//! Harness of the state suite (`tests/tests/state.rs`,
//! `tests/tests/state_faults.rs`), in the spirit of CRIU's zdtm: small C
//! programs (`tests/state/`), each holding its open files in one "shape" the
//! way real applications do, plus `all`, every shape in one job.
//!
//! A [`Case`] compiles its program with `mpicc`, runs it uninterrupted with
//! `mpiexec` (the reference), then runs it under `cryo run` on emulated
//! nodes ([`Case::start`], [`Case::start_with_env`]), checkpoints it
//! ([`Case::capture`]), lets it run a few steps past the checkpoint,
//! `kill -9`s everything ([`Case::stop_at_past`], [`Case::kill_unfinished`])
//! and restarts it on another node layout
//! ([`Case::assert_restart_matches_reference`]). The restarted run must
//! resume right after the checkpointed step and end with an output
//! directory byte-identical to the reference's, file by file, with the same
//! names ([`compare_trees`]). The programs check themselves as they go (fd
//! flags and offsets, file sizes, read-back contents, mappings) and abort
//! with the reason on stderr, which `cryo restart` passes on.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use crate::heat2d::Mpi;
pub use crate::trees::{compare_trees, tree, Entry};
use crate::{build_packages, kill_every_process_mentioning, output_text, pids_where, wait_until};

/// Steps of a one-shape run.
pub const ITERS: u64 = 40;
/// Steps of `all` (6 ranks on 2 cores): rank 0's stdout, forwarded by
/// Hydra, can lag several steps behind the ranks while the agents commit an
/// epoch, so the killed run needs more room to stop in.
pub const ALL_ITERS: u64 = 60;
/// Milliseconds each step sleeps under `cryo run`.
pub const STEP_MS: u64 = 50;
/// The step after which the test asks for the checkpoint (at least). The
/// ranks' first quiesce agreement lets them run 6 (2 ranks) to 10 (6 ranks)
/// safe points past the request (13 steps were seen with 6 ranks on 2 cores)
/// before they park, so the capture lands at about step 16 to 23, leaving
/// room for the steps past it.
pub const CHECKPOINT_AT: u64 = 10;
/// Steps the killed run must make past the checkpointed one, so that the
/// restart has writes to undo.
pub const PAST_CHECKPOINT: u64 = 3;
/// Every shape, one program each (`tests/state/<shape>.c`).
pub const SHAPES: &[&str] = &[
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
    "stdout_file",
    "own_buffer",
    "reopened",
    "mpiio",
    "odirect",
    "region_file",
    "process",
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
pub fn have_mpi() -> bool {
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

/// Builds `cryo`, `cryo-agent` and `libcryo_rank` once; returns the
/// directory holding them.
pub fn built() -> PathBuf {
    build_packages(&["cryo-coordinator", "cryo-agent", "cryo-rank"])
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The Fortran shape (`tests/state/fortran_unit.f90`, built with mpif90).
pub const FORTRAN_SHAPE: &str = "fortran_unit";

/// Whether MPICH's `mpif90` and gfortran are there; says loudly when not.
pub fn have_fortran() -> bool {
    let works = Command::new("mpif90")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!(
            "\n!!!!! SKIPPED: no mpif90 (install gfortran); the Fortran state test did not run !!!!!\n"
        );
    }
    works
}

/// Compiles `shape` (or `all`, every C shape; or the Fortran shape, with
/// MPICH's mpif90) with `mpi`'s compiler against its flavour of
/// libcryo_rank into `out`.
pub fn compile(shape: &str, out: &Path, mpi: Mpi) {
    let bins = match mpi {
        Mpi::Mpich => built(),
        Mpi::OpenMpi => {
            built();
            crate::heat2d::openmpi_flavour()
        }
    };
    let root = repo_root();
    let state = root.join("tests/state");
    if shape == FORTRAN_SHAPE {
        let output = Command::new("mpif90")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(out)
            .arg(state.join(format!("{shape}.f90")))
            .arg("-L")
            .arg(&bins)
            .arg("-lcryo_rank")
            .arg(format!("-Wl,-rpath,{}", bins.display()))
            .current_dir(out.parent().unwrap_or(Path::new("/tmp")))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "compiling tests/state/{shape}.f90 failed:\n{}",
            output_text(&output)
        );
        return;
    }
    let mut cc = Command::new(mpi.mpicc());
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
        .arg(format!("-l{}", mpi.rank_lib()))
        .arg(format!("-Wl,-rpath,{}", bins.display()));
    let output = cc.output().unwrap();
    assert!(
        output.status.success(),
        "compiling tests/state/{shape} failed:\n{}",
        output_text(&output)
    );
}

/// N of each "<prefix>N" line of `stdout`, in order.
fn numbers_after(stdout: &str, prefix: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The step numbers in rank 0's "step N" lines, in order.
pub fn steps(stdout: &str) -> Vec<u64> {
    numbers_after(stdout, "step ")
}

/// N of each of rank 0's "checkpointed after step N" lines, in order.
pub fn checkpointed_after(stdout: &str) -> Vec<u64> {
    numbers_after(stdout, "checkpointed after step ")
}

/// The job name `cryo run` gets for `shape`.
pub fn job_name(shape: &str) -> String {
    format!("state-{shape}").replace('_', "-")
}

/// One test's folder: the program, the reference and run output folders,
/// the store, the scratch folders and the logs.
#[derive(Debug)]
pub struct Case {
    dir: tempfile::TempDir,
    /// The compiled program.
    pub program: PathBuf,
    /// `cryo checkpoint`s started so far, to name their output files.
    checkpoints: std::cell::Cell<u32>,
    /// Extra environment for `cryo restart` (and so for the restarted ranks).
    restart_env: std::cell::RefCell<Vec<(String, String)>>,
    /// Where `cryo` runs: this machine, or a namespace cluster's head.
    site: crate::netns::Site,
    /// The MPI the program is built with and launched by.
    mpi: Mpi,
}

impl Case {
    /// A fresh folder with `shape` (or `all`) compiled in it, for MPICH.
    pub fn new(shape: &str) -> Case {
        Case::with_mpi(shape, Mpi::Mpich)
    }

    /// A fresh folder with `shape` (or `all`) compiled in it for `mpi`.
    pub fn with_mpi(shape: &str, mpi: Mpi) -> Case {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cryo-state-{shape}-"))
            .tempdir()
            .unwrap();
        let program = dir.path().join(shape);
        compile(shape, &program, mpi);
        Case {
            dir,
            program,
            checkpoints: std::cell::Cell::new(0),
            restart_env: std::cell::RefCell::new(Vec::new()),
            site: crate::netns::Site::Local,
            mpi,
        }
    }

    /// The case with its `cryo` commands run at `site`.
    #[must_use]
    pub fn on(mut self, site: crate::netns::Site) -> Case {
        self.site = site;
        self
    }

    /// A path in the case's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The store `cryo` writes to.
    pub fn store(&self) -> PathBuf {
        self.path("store")
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
    pub fn reference(&self, ranks: u32, iters: u64) {
        let mut cmd = self.mpi.launch(ranks);
        for var in CRYO_RANK_ENV {
            cmd.env_remove(var);
        }
        let out = cmd
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

    /// `cryo` with this case's store, logging at `info`.
    pub fn cryo(&self) -> Command {
        let mut cmd = Command::new(built().join("cryo"));
        cmd.env("CRYO_STORE", self.store())
            .env("CRYO_LOG", "info")
            .current_dir(self.dir.path());
        self.site.cryo(cmd)
    }

    /// `cryo run` in the background, writing into `run/`; its stdout (rank
    /// 0's "step N" lines) goes to `run.stdout`.
    pub fn start(&self, job: &str, nodes: &str, ranks: u32, iters: u64) -> Job {
        self.start_with_env(job, nodes, ranks, iters, &[])
    }

    /// [`Case::start`] with extra environment for `cryo run`, which
    /// mpiexec passes on to the ranks (say, `CRYO_UNLINKED_CAP`).
    pub fn start_with_env(
        &self,
        job: &str,
        nodes: &str,
        ranks: u32,
        iters: u64,
        env: &[(&str, &str)],
    ) -> Job {
        let mut cmd = self.cryo();
        cmd.envs(env.iter().copied())
            .args(["run", "--job", job, self.site.nodes_flag(), nodes])
            .args(self.mpi.cryo_args())
            .arg("-n")
            .arg(ranks.to_string())
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}")))
            .arg("--")
            .arg(&self.program)
            .args(self.app_args("run", iters, STEP_MS));
        Job::spawn(
            &mut cmd,
            self.path("run.stdout"),
            self.path(&format!("cryo-run-{job}.log")),
        )
    }

    /// `cryo restart` of `job` on `nodes`, to the end.
    pub fn restart(&self, job: &str, nodes: &str) -> Output {
        self.cryo()
            .envs(self.restart_env.borrow().iter().map(|(k, v)| (k, v)))
            .args(["restart", job, self.site.nodes_flag(), nodes])
            .args(self.mpi.cryo_args())
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}-restart")))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Sets extra environment for the next `cryo restart`.
    pub fn set_restart_env(&self, env: &[(&str, &str)]) {
        *self.restart_env.borrow_mut() = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// `cryo checkpoint` in the background, its output in
    /// `checkpoint-<n>.out` (the n-th asked for in this case).
    pub fn checkpoint(&self, job: &str) -> Checkpoint {
        let n = self.checkpoints.get() + 1;
        self.checkpoints.set(n);
        let out_path = self.path(&format!("checkpoint-{n}.out"));
        let out = fs::File::create(&out_path).unwrap();
        let child = self
            .cryo()
            .args(["checkpoint", job])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Checkpoint {
            child: Some(child),
            out: out_path,
        }
    }

    /// Epochs of `job` committed in the store.
    pub fn committed(&self, job: &str) -> Vec<u64> {
        cryo_core::Store::open(self.store())
            .and_then(|s| s.job(job))
            .ok()
            .and_then(|j| j.committed_epochs().ok())
            .unwrap_or_default()
    }

    /// `job`'s store.
    pub fn job_store(&self, job: &str) -> cryo_core::JobStore {
        cryo_core::Store::open(self.store())
            .unwrap()
            .existing_job(job)
            .unwrap()
    }

    /// The ranks: the processes running this case's program.
    pub fn ranks(&self) -> Vec<nix::unistd::Pid> {
        let program = self.program.as_os_str().as_encoded_bytes();
        pids_where(|cmdline| cmdline.split(|b| *b == 0).next() == Some(program))
    }

    /// The process of MPI rank `rank` (its `PMI_RANK`), if it runs.
    pub fn rank_pid(&self, rank: u32) -> Option<nix::unistd::Pid> {
        let want = format!("PMI_RANK={rank}");
        self.ranks().into_iter().find(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|var| var == want.as_bytes())
        })
    }

    /// Stops every rank with SIGSTOP (they are killed next).
    pub fn stop_ranks(&self) {
        for pid in self.ranks() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// The last lines of every agent log under `scratch`, for failure
    /// messages.
    pub fn agent_logs(&self, scratch: &str) -> String {
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
    pub fn kill_everything(&self) {
        kill_every_process_mentioning(&self.dir.path().display().to_string());
    }

    /// Asks for a checkpoint of `job_name` (run by `job`) and waits until
    /// rank 0 says "checkpointed after step N" once more; returns N and the
    /// `cryo checkpoint` still in flight (it returns once the epoch is
    /// committed, and the ranks compute on meanwhile). Panics, with the
    /// logs, if `cryo checkpoint` fails first.
    pub fn capture(&self, job_name: &str, job: &Job) -> (u64, Checkpoint) {
        let before = checkpointed_after(&job.stdout_text()).len();
        let mut checkpoint = self.checkpoint(job_name);
        let mut captured = None;
        wait_until(
            "rank 0 to say \"checkpointed after step N\"",
            Duration::from_secs(60),
            || {
                if let Some(status) = checkpoint.try_status() {
                    assert!(
                        status.success(),
                        "cryo checkpoint failed ({status}):\n{}\n{}\n{}",
                        checkpoint.said(),
                        job.describe(),
                        self.agent_logs(&format!("scratch-{job_name}"))
                    );
                }
                captured = checkpointed_after(&job.stdout_text()).get(before).copied();
                captured.is_some()
            },
        );
        (captured.unwrap(), checkpoint)
    }

    /// Waits for `checkpoint` to commit `epoch` and returns its output;
    /// panics with the logs if it does not.
    pub fn committed_by(
        &self,
        job_name: &str,
        job: &Job,
        checkpoint: &mut Checkpoint,
        epoch: u64,
    ) -> String {
        let status = checkpoint.wait(Duration::from_secs(60));
        let said = checkpoint.said();
        assert!(
            status.success() && said.contains(&format!("epoch {epoch} committed")),
            "cryo checkpoint did not commit epoch {epoch} ({status}):\n{said}\n{}\n{}",
            job.describe(),
            self.agent_logs(&format!("scratch-{job_name}"))
        );
        said
    }

    /// Lets the job run [`PAST_CHECKPOINT`] steps past `captured` (the
    /// step epoch `epoch` captured), stops the ranks there, waits for
    /// `checkpoint` to commit `epoch`, and returns its output.
    pub fn stop_at_past(
        &self,
        job_name: &str,
        job: &mut Job,
        captured: u64,
        iters: u64,
        checkpoint: &mut Checkpoint,
        epoch: u64,
    ) -> String {
        let past = captured + PAST_CHECKPOINT;
        assert!(
            past < iters,
            "the checkpoint came too late (after step {captured} of {iters}) to run past it"
        );
        job.wait_step(past, &format!("step {past}, past the checkpoint"));
        self.stop_ranks();
        self.committed_by(job_name, job, checkpoint, epoch)
    }

    /// `kill -9`s everything and checks that the job had not finished;
    /// returns the last step rank 0 had printed (the ranks may have been a
    /// few steps further) and `cryo run`'s log.
    pub fn kill_unfinished(&self, job: Job, captured: u64) -> (u64, String) {
        self.kill_everything();
        let stdout = job.stdout_text();
        let killed_at = steps(&stdout).last().copied().unwrap_or(0);
        // Each rank writes its summary last, at finish: not there, not
        // finished.
        assert!(
            !self.path("run/summary.0.out").exists() && !stdout.contains("\nOK\n"),
            "the job finished before it was killed (checkpoint after step {captured})"
        );
        let log = fs::read_to_string(&job.log).unwrap_or_default();
        drop(job);
        (killed_at, log)
    }

    /// `cryo restart` of `job_name` on `restart_nodes` must restart from
    /// `epoch`, resume right after step `captured`, run to step `iters` and
    /// end with `run/` byte-identical to `ref/`. Returns what
    /// `cryo restart` said (stdout, then stderr).
    pub fn assert_restart_matches_reference(
        &self,
        job_name: &str,
        restart_nodes: &str,
        epoch: u64,
        captured: u64,
        killed_at: u64,
        iters: u64,
    ) -> String {
        let out = self.restart(job_name, restart_nodes);
        let said = output_text(&out);
        let context = || {
            format!(
                "{said}\n{}",
                self.agent_logs(&format!("scratch-{job_name}-restart"))
            )
        };
        assert!(
            out.status.success(),
            "cryo restart on {restart_nodes} failed ({}):\n{}",
            out.status,
            context()
        );
        assert!(
            said.contains(&format!(
                "restarting job \"{job_name}\" from epoch {epoch}\n"
            )),
            "not restarted from epoch {epoch}:\n{}",
            context()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("resumed after step {captured} from epoch {epoch}\n")),
            "the restarted ranks did not resume after step {captured} (the one epoch {epoch} captured):\n{}",
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
        self.assert_run_matches_reference(&format!(
            "checkpointed after step {captured} (epoch {epoch}), killed at about step {killed_at}, restarted on {restart_nodes}"
        ));
        said
    }

    /// `run/` equals `ref/`: the same names with the same bytes; `what`
    /// says how the run went, for the message.
    pub fn assert_run_matches_reference(&self, what: &str) {
        let problems = compare_trees(&self.path("ref"), &self.path("run"));
        assert!(
            problems.is_empty(),
            "{}: {what}: the output differs from the uninterrupted run in {} place(s):\n  {}\n(reference: {}, run: {})",
            self.program.display(),
            problems.len(),
            problems.join("\n  "),
            self.path("ref").display(),
            self.path("run").display()
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

/// A `cryo run` in the background.
#[derive(Debug)]
pub struct Job {
    child: Option<Child>,
    /// `cryo run`'s stderr: its log, and the ranks' stderr.
    pub log: PathBuf,
    /// `cryo run`'s stdout: rank 0's report.
    pub stdout: PathBuf,
}

impl Job {
    /// Spawns `cmd` (a `cryo run`) with its stdout to `stdout` and its
    /// stderr to `log`.
    fn spawn(cmd: &mut Command, stdout: PathBuf, log: PathBuf) -> Job {
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&log).unwrap());
        Job {
            child: Some(cmd.spawn().unwrap()),
            log,
            stdout,
        }
    }

    /// Rank 0's report so far.
    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// `cryo run`'s stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its stdout and `cryo run`'s log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- cryo run stdout:\n{}\n--- cryo run log:\n{}",
            self.stdout_text(),
            self.log_text()
        )
    }

    /// Waits until rank 0 has reported step `n`; panics if the job ends
    /// first.
    pub fn wait_step(&mut self, n: u64, what: &str) {
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

    /// Waits until rank 0 has reported step [`CHECKPOINT_AT`], where the
    /// tests ask for their first checkpoint.
    pub fn wait_checkpoint_step(&mut self) {
        self.wait_step(CHECKPOINT_AT, &format!("step {CHECKPOINT_AT}"));
    }

    /// Waits for `cryo run` to end; kills it and panics after `timeout`.
    pub fn wait_end(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(self.child.as_mut().unwrap(), timeout)
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

/// A `cryo checkpoint` in the background.
#[derive(Debug)]
pub struct Checkpoint {
    child: Option<Child>,
    /// Its stdout and stderr.
    pub out: PathBuf,
}

impl Checkpoint {
    /// Its exit status, if it has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits for it to end; kills it and panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(self.child.as_mut().unwrap(), timeout)
    }

    /// What it said so far (stdout and stderr, interleaved).
    pub fn said(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for a child (say, `cryo checkpoint`) to exit; kills it and
/// panics after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?} waiting for {child:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a run of one shape left behind, for a test's further checks.
#[derive(Debug)]
pub struct Survived {
    /// The case (its folder, store and logs).
    pub case: Case,
    /// The job's name.
    pub job: String,
    /// The step epoch 1 captured.
    pub captured: u64,
    /// What `cryo checkpoint` said.
    pub checkpoint: String,
    /// `cryo run`'s stderr, up to the `kill -9`.
    pub run_log: String,
    /// What `cryo restart` said.
    pub restart: String,
}

/// The whole scenario for one program: reference run; `cryo run` (with
/// `env`) of `ranks` ranks on `nodes`; checkpoint at about step 20; a few
/// more steps; `kill -9` of everything; `cryo restart` on `restart_nodes`;
/// the restarted run resumes after the checkpointed step and its output
/// folder equals the reference's byte for byte. `None` without MPI.
pub fn survives_kill_and_restart(
    shape: &str,
    iters: u64,
    ranks: u32,
    nodes: (&str, &str),
    env: &[(&str, &str)],
) -> Option<Survived> {
    survives_with_restart_env(shape, iters, ranks, nodes, [env, &[]])
}

/// [`survives_kill_and_restart`] with extra environment for the restart
/// too (`[run, restart]`).
pub fn survives_with_restart_env(
    shape: &str,
    iters: u64,
    ranks: u32,
    nodes: (&str, &str),
    envs: [&[(&str, &str)]; 2],
) -> Option<Survived> {
    if !have_mpi() {
        return None;
    }
    Some(survives_on(
        Case::new(shape),
        shape,
        iters,
        ranks,
        nodes,
        envs,
    ))
}

/// [`survives_with_restart_env`] for a `case` made for `shape` (which may
/// run at another site).
pub fn survives_on(
    case: Case,
    shape: &str,
    iters: u64,
    ranks: u32,
    (nodes, restart_nodes): (&str, &str),
    [env, restart_env]: [&[(&str, &str)]; 2],
) -> Survived {
    case.reference(ranks, iters);
    case.set_restart_env(restart_env);
    let job_name = job_name(shape);

    let mut job = case.start_with_env(&job_name, nodes, ranks, iters, env);
    job.wait_checkpoint_step();
    // The ranks are stopped a few steps past the captured one, however long
    // the commit takes.
    let (captured, mut checkpoint) = case.capture(&job_name, &job);
    let said = case.stop_at_past(&job_name, &mut job, captured, iters, &mut checkpoint, 1);
    let (killed_at, run_log) = case.kill_unfinished(job, captured);
    let restart = case.assert_restart_matches_reference(
        &job_name,
        restart_nodes,
        1,
        captured,
        killed_at,
        iters,
    );
    Survived {
        case,
        job: job_name,
        captured,
        checkpoint: said,
        run_log,
        restart,
    }
}
