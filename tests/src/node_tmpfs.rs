//! Jobs whose working directory is a tmpfs that only their mount namespace
//! sees, as a node's in-memory scratch is, preempted there and restarted
//! where that tmpfs is gone (another node's view): the harness of the
//! node-local file tests (`node_local.rs`, `node_closed.rs`).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::heat2d::{built, compile_mpich_program_with, openmpi_available};
use crate::state::{have_mpi, wait_child};
use crate::{lines, output_text, wait_until};

/// A test's directory, its program and store, and the job's working
/// directory.
#[derive(Debug)]
pub struct Setup {
    /// Removed with the value.
    pub dir: tempfile::TempDir,
    /// The MPICH program the test runs.
    pub program: PathBuf,
    /// The store.
    pub store: PathBuf,
    /// The job's working directory: a tmpfs while it first runs, an empty
    /// directory of the disk once that tmpfs is gone.
    pub work: PathBuf,
}

/// A directory with `source` compiled (MPICH, with `flags`), when MPI and
/// mount namespaces are here. The namespace cluster tests need the same
/// (root, unshare): they run or are skipped together (`CRYO_SKIP_NETNS`).
#[must_use]
pub fn setup(source: &str, flags: &[&str]) -> Option<Setup> {
    let mut setup = setup_dirs()?;
    let name = Path::new(source).file_stem().unwrap();
    setup.program = setup.dir.path().join(name);
    compile_mpich_program_with(source, flags, &setup.program);
    Some(setup)
}

/// `cryo` with the setup's store.
#[must_use]
pub fn cryo(s: &Setup) -> Command {
    let mut cmd = Command::new(built().join("cryo"));
    cmd.env("CRYO_STORE", &s.store)
        .env("OMP_NUM_THREADS", "2")
        .stdin(Stdio::null());
    cmd
}

/// What runs on the tmpfs: the command after `cryo run --`, the variables
/// it needs, and the log whose lines count its steps.
#[derive(Debug)]
pub struct Job<'a> {
    /// The job's name.
    pub name: &'a str,
    /// The command after `cryo run --`.
    pub command: Vec<OsString>,
    /// Variables it needs.
    pub env: Vec<(&'static str, OsString)>,
    /// The log (in the working directory) whose lines count its steps.
    pub progress: &'a str,
}

/// Runs `job` on nodes a and b with its working directory on a tmpfs
/// that only its mount namespace sees (`prepare` runs there first),
/// preempts it with SIGTERM after 20 steps and returns what `cryo run`
/// said. The tmpfs goes with the namespace.
pub fn preempted_on_tmpfs(s: &Setup, job: &Job, prepare: &str) -> String {
    let log = s.dir.path().join(format!("{}.log", job.name));
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            r#"mount -t tmpfs -o size=64m cryo-scratch "$0" && cd "$0" && {prepare} && exec "$@""#
        ))
        .arg(&s.work)
        .arg(built().join("cryo"))
        .args([
            "run", "--job", job.name, "--nodes", "a:1,b:1", "-n", "2", "--",
        ])
        .args(&job.command)
        .env("CRYO_STORE", &s.store)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(fs::File::create(s.dir.path().join(format!("{}.out", job.name))).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The job's view of its working directory.
    let seen = Path::new(&format!("/proc/{}/root", child.id()))
        .join(s.work.strip_prefix("/").unwrap())
        .join(job.progress);
    wait_until("20 steps logged", Duration::from_secs(60), || {
        lines(&seen) >= 20
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(75), "{said}");
    said
}

/// Open MPI and Python with NumPy and mpi4py, as `python.rs` needs them
/// (`CRYO_SKIP_OPENMPI`, `CRYO_SKIP_PYTHON` skip them knowingly).
#[must_use]
pub fn python_available() -> bool {
    if !openmpi_available() {
        return false;
    }
    let check = Command::new("/usr/bin/python3")
        .args(["-c", "import numpy, mpi4py"])
        .output()
        .unwrap();
    if check.status.success() {
        return true;
    }
    assert!(
        std::env::var_os("CRYO_SKIP_PYTHON").is_some(),
        "Python with NumPy and mpi4py is missing: {}",
        output_text(&check)
    );
    false
}

/// As [`setup`], without a program (a Python job's).
#[must_use]
pub fn setup_dirs() -> Option<Setup> {
    if !have_mpi() || !crate::netns::available() {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-node-local-")
        .tempdir()
        .unwrap();
    let (store, work) = (dir.path().join("store"), dir.path().join("work"));
    fs::create_dir_all(&work).unwrap();
    Some(Setup {
        dir,
        program: PathBuf::new(),
        store,
        work,
    })
}
