//! The heat2d example (Rust, C or Python) under MPICH or Open MPI, with or
//! without `cryo run`: its files, the program and its launcher, and the
//! checkpoint → `kill -9` → restart-elsewhere cycle that every flavour must
//! pass byte for byte.
//!
//! Open MPI is always called by its explicit names (`mpicc.openmpi`,
//! `mpirun.openmpi`): the plain `mpicc` and `mpiexec` are MPICH's
//! (`scripts/install-deps.sh` pins them).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::state::wait_child;
use crate::{
    assert_same_file, bin_dir, build_packages, kill_every_process_mentioning, lines, output_text,
    wait_until,
};

/// The environment variable that lets the Open MPI tests skip, saying so,
/// on a machine without Open MPI (otherwise they fail).
pub const SKIP_OPENMPI: &str = "CRYO_SKIP_OPENMPI";

/// An MPI implementation, called by its explicit names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mpi {
    /// MPICH: `mpicc`, `mpiexec` (Debian's alternatives, pinned to MPICH).
    Mpich,
    /// Open MPI: `mpicc.openmpi`, `mpirun.openmpi`.
    OpenMpi,
}

impl Mpi {
    /// Its C compiler wrapper.
    pub fn mpicc(self) -> &'static str {
        match self {
            Mpi::Mpich => "mpicc",
            Mpi::OpenMpi => "mpicc.openmpi",
        }
    }

    /// Its launcher.
    pub fn launcher(self) -> &'static str {
        match self {
            Mpi::Mpich => "mpiexec",
            Mpi::OpenMpi => "mpirun.openmpi",
        }
    }

    /// The flavour of libcryo_rank its programs link (`-l` name).
    pub fn rank_lib(self) -> &'static str {
        match self {
            Mpi::Mpich => "cryo_rank",
            Mpi::OpenMpi => "cryo_rank_openmpi",
        }
    }

    /// The launcher starting `ranks` ranks on this machine, without cryo.
    pub fn launch(self, ranks: u32) -> Command {
        let mut cmd = Command::new(self.launcher());
        if self == Mpi::OpenMpi {
            cmd.arg("--oversubscribe");
            if nix::unistd::geteuid().is_root() {
                cmd.arg("--allow-run-as-root");
            }
            cmd.arg("-np");
        } else {
            cmd.arg("-n");
        }
        cmd.arg(ranks.to_string());
        cmd
    }

    /// What `cryo run` and `cryo restart` need to use this launcher:
    /// nothing, since `cryo run` picks the launcher of the MPI the program
    /// links (`mpiexec` is MPICH's here, so Open MPI's programs test that).
    pub fn cryo_args(self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Why this MPI cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        let missing = missing_tools(&[self.mpicc(), self.launcher()]);
        (!missing.is_empty()).then(|| format!("{} not found", missing.join(" and ")))
    }
}

/// The tools of `tools` that do not answer `--version` here.
pub fn missing_tools<'a>(tools: &[&'a str]) -> Vec<&'a str> {
    tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

/// Whether Open MPI can run here. Without it the Open MPI tests fail,
/// loudly, unless [`SKIP_OPENMPI`] is set (then `false`, with a message).
pub fn openmpi_available() -> bool {
    match Mpi::OpenMpi.missing() {
        None => true,
        Some(problem) if std::env::var_os(SKIP_OPENMPI).is_some() => {
            eprintln!("\n*** SKIPPED: the Open MPI tests did not run: {problem} ***\n");
            false
        }
        Some(problem) => panic!(
            "the Open MPI tests cannot run: {problem} (scripts/install-deps.sh installs \
             openmpi-bin and libopenmpi-dev). Set {SKIP_OPENMPI}=1 to skip them knowingly."
        ),
    }
}

/// Builds `cryo`, `cryo-agent`, the Rust `heat2d` and `libcryo_rank` once.
pub fn built() -> PathBuf {
    build_packages(&["cryo-coordinator", "cryo-agent", "cryo-heat2d", "cryo-rank"])
}

/// `cryo` run in `dir` with its store at `dir/store` and no terminal on
/// stdin, as a user in a job's directory runs it.
pub fn cryo_in(dir: &Path) -> Command {
    let mut cmd = Command::new(built().join("cryo"));
    cmd.env("CRYO_STORE", dir.join("store"))
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

/// Builds the SPANK plugin once and returns its path.
pub fn spank_plugin() -> PathBuf {
    build_packages(&["cryo-slurm"]).join("libspank_cryo.so")
}

/// Builds the Open MPI flavour, `libcryo_rank_openmpi.so` and `.a`, with
/// `scripts/build-openmpi.sh` into this target directory, once per test
/// process, and returns the folder holding it (that of the other binaries).
pub fn openmpi_flavour() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = repo_root();
        let bins = bin_dir();
        let target = bins.parent().unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("scripts/build-openmpi.sh"))
            .env("CARGO_TARGET_DIR", target)
            .current_dir(&root);
        if bins.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "scripts/build-openmpi.sh failed:\n{}",
            output_text(&out)
        );
    });
    let dir = bin_dir();
    assert!(dir.join("libcryo_rank_openmpi.so").exists());
    dir
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Compiles `examples/c/heat2d.c` with `mpi`'s compiler wrapper against the
/// libcryo_rank flavour `lib` (an `-l` name) in `lib_dir`, into `out`.
pub fn compile_c_heat2d(mpi: Mpi, lib_dir: &Path, lib: &str, out: &Path) -> Output {
    compile_c(mpi, "examples/c/heat2d.c", lib_dir, lib, out)
}

/// Compiles the C MPI program `source` (relative to the repository) with
/// MPICH against libcryo_rank into `out`; panics if it does not compile.
pub fn compile_mpich_program(source: &str, out: &Path) {
    compile_mpich_program_with(source, &[], out);
}

/// [`compile_mpich_program`] with more compiler flags (`-fopenmp`).
pub fn compile_mpich_program_with(source: &str, flags: &[&str], out: &Path) {
    let compiled = compile_c_with(
        Mpi::Mpich,
        source,
        flags,
        &built(),
        Mpi::Mpich.rank_lib(),
        out,
    );
    assert!(
        compiled.status.success(),
        "compiling {source}: {}",
        output_text(&compiled)
    );
}

fn compile_c(mpi: Mpi, source: &str, lib_dir: &Path, lib: &str, out: &Path) -> Output {
    compile_c_with(mpi, source, &[], lib_dir, lib, out)
}

fn compile_c_with(
    mpi: Mpi,
    source: &str,
    flags: &[&str],
    lib_dir: &Path,
    lib: &str,
    out: &Path,
) -> Output {
    let root = repo_root();
    Command::new(mpi.mpicc())
        .args(["-O2", "-Wall", "-Werror"])
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(root.join(source))
        .arg("-I")
        .arg(root.join("rank/include"))
        .arg("-L")
        .arg(lib_dir)
        .arg(format!("-l{lib}"))
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", mpi.mpicc()))
}

/// The C heat2d built with `mpi`'s wrapper against its flavour of
/// libcryo_rank, once per MPI and test process.
pub fn c_heat2d(mpi: Mpi) -> PathBuf {
    static MPICH: OnceLock<PathBuf> = OnceLock::new();
    static OPENMPI: OnceLock<PathBuf> = OnceLock::new();
    let cell = match mpi {
        Mpi::Mpich => &MPICH,
        Mpi::OpenMpi => &OPENMPI,
    };
    cell.get_or_init(|| {
        let lib_dir = match mpi {
            Mpi::Mpich => built(),
            Mpi::OpenMpi => {
                built();
                openmpi_flavour()
            }
        };
        let out = std::env::temp_dir().join(format!(
            "cryo-heat2d-c-{}-{}",
            mpi.rank_lib(),
            std::process::id()
        ));
        let compiled = compile_c_heat2d(mpi, &lib_dir, mpi.rank_lib(), &out);
        assert!(
            compiled.status.success(),
            "compiling examples/c/heat2d.c with {} failed: {}",
            mpi.mpicc(),
            output_text(&compiled)
        );
        out
    })
    .clone()
}

/// A heat2d to run: the executable (for Python, the interpreter), what
/// comes before heat2d's own arguments (the script), its MPI, and the
/// environment it needs.
#[derive(Debug, Clone)]
pub struct Program {
    /// The executable.
    pub exe: PathBuf,
    /// Arguments before heat2d's own (the script, for Python).
    pub lead: Vec<OsString>,
    /// The MPI it was built for.
    pub mpi: Mpi,
    /// Environment for its runs, with and without cryo.
    pub env: Vec<(String, String)>,
}

impl Program {
    /// A compiled heat2d for `mpi`.
    pub fn compiled(exe: PathBuf, mpi: Mpi) -> Program {
        Program {
            exe,
            lead: Vec::new(),
            mpi,
            env: Vec::new(),
        }
    }
}

/// The heat2d example's files in a folder of their own: its input, and the
/// arguments that make a run write `<tag>.log` (the residual per
/// iteration) and `<tag>.out` (the final grid) there.
#[derive(Debug)]
pub struct Heat2dFiles {
    dir: tempfile::TempDir,
}

impl Heat2dFiles {
    /// Grid size.
    pub const N: &'static str = "96";
    /// Iterations of a run.
    pub const ITERS: usize = 100;

    /// Makes the folder and the input field with `heat2d --make-input`.
    pub fn new(prefix: &str, heat2d: &Path) -> Heat2dFiles {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let out = Command::new(heat2d)
            .arg("--make-input")
            .arg(dir.path().join("input.bin"))
            .args(["--n", Self::N])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "heat2d --make-input: {}",
            output_text(&out)
        );
        Heat2dFiles { dir }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// heat2d's arguments for a run named `tag`, sleeping `step_ms` per
    /// iteration.
    pub fn app_args(&self, tag: &str, step_ms: u32) -> Vec<String> {
        vec![
            "--n".into(),
            Self::N.into(),
            "--iters".into(),
            Self::ITERS.to_string(),
            "--step-ms".into(),
            step_ms.to_string(),
            "--input".into(),
            self.path("input.bin").display().to_string(),
            "--log".into(),
            self.path(&format!("{tag}.log")).display().to_string(),
            "--output".into(),
            self.path(&format!("{tag}.out")).display().to_string(),
        ]
    }

    /// The uninterrupted reference run of `program` (the Rust or C heat2d)
    /// with MPICH, without cryo.
    pub fn reference(&self, program: &Path, ranks: u32) {
        self.run_without_cryo(
            &Program::compiled(program.to_owned(), Mpi::Mpich),
            ranks,
            "reference",
        );
    }

    /// An uninterrupted run named `tag` of `program` (any heat2d) on
    /// `ranks` ranks started by `mpi`'s launcher, without cryo; panics
    /// unless it succeeds, and returns its output.
    pub fn run_plain_with(
        &self,
        mpi: Mpi,
        program: &Path,
        ranks: u32,
        tag: &str,
    ) -> std::process::Output {
        let out = mpi
            .launch(ranks)
            .arg(program)
            .args(self.app_args(tag, 0))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tag} run of {} failed: {}",
            program.display(),
            output_text(&out)
        );
        out
    }

    /// A run of `program` named `tag` under its own launcher, without cryo.
    pub fn run_without_cryo(&self, program: &Program, ranks: u32, tag: &str) {
        let out = program
            .mpi
            .launch(ranks)
            .envs(program.env.iter().map(|(k, v)| (k, v)))
            .arg(&program.exe)
            .args(&program.lead)
            .args(self.app_args(tag, 0))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tag} run of {} failed: {}",
            program.exe.display(),
            output_text(&out)
        );
    }

    /// The run named `tag` ended byte-identical to the reference: the
    /// final grid and the residual log.
    pub fn assert_matches_reference(&self, tag: &str) {
        self.assert_runs_match("reference", tag);
    }

    /// The runs named `a` and `b` ended byte-identical.
    pub fn assert_runs_match(&self, a: &str, b: &str) {
        assert_same_file(
            &self.path(&format!("{a}.out")),
            &self.path(&format!("{b}.out")),
        );
        assert_same_file(
            &self.path(&format!("{a}.log")),
            &self.path(&format!("{b}.log")),
        );
    }
}

/// A heat2d job under `cryo run` with its own folder and store; every
/// process mentioning the folder is killed on drop.
#[derive(Debug)]
pub struct Case {
    /// The files.
    pub files: Heat2dFiles,
    /// The program.
    pub program: Program,
    /// Where `cryo` runs: this machine, or a namespace cluster's head.
    pub site: crate::netns::Site,
}

impl Case {
    /// A folder with the input (made by the Rust heat2d).
    pub fn new(program: Program) -> Case {
        let files = Heat2dFiles::new("cryo-mpi-", &built().join("heat2d"));
        Case {
            files,
            program,
            site: crate::netns::Site::Local,
        }
    }

    /// A compiled `program` for MPICH.
    pub fn mpich(program: PathBuf) -> Case {
        Case::new(Program::compiled(program, Mpi::Mpich))
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }

    /// The store.
    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// The uninterrupted reference run, without cryo.
    pub fn reference(&self, ranks: u32) {
        self.files
            .run_without_cryo(&self.program, ranks, "reference");
    }

    /// `cryo` with this case's store, folder and the program's environment.
    pub fn cryo(&self) -> Command {
        let mut cmd = Command::new(built().join("cryo"));
        cmd.env("CRYO_STORE", self.store())
            .env("CRYO_LOG", "info")
            // A developer's setting would change what the quiesce tests see.
            .env_remove("CRYO_QUIESCE_SLACK")
            .envs(self.program.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.files.dir());
        self.site.cryo(cmd)
    }

    /// `cryo run` of the program with `args` in the background, with
    /// extra environment `env` for it and what it starts (say,
    /// `CRYO_FAULT`); stdout goes to `<job>.stdout`.
    pub fn spawn(
        &self,
        job: &str,
        nodes: &str,
        ranks: u32,
        extra: &[&str],
        args: &[String],
        env: &[(&str, &str)],
    ) -> Job {
        let log = self.path(&format!("cryo-run-{job}.log"));
        let child = self
            .cryo()
            .envs(env.iter().copied())
            .args([
                "run",
                "--job",
                job,
                self.site.nodes_flag(),
                nodes,
                "-n",
                &ranks.to_string(),
            ])
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}")))
            .args(self.program.mpi.cryo_args())
            .args(extra)
            .arg("--")
            .arg(&self.program.exe)
            .args(&self.program.lead)
            .args(args)
            .stdout(fs::File::create(self.path(&format!("{job}.stdout"))).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Job {
            child: Some(child),
            log,
        }
    }

    /// heat2d under `cryo run` in the background, writing the run `run`.
    pub fn start(&self, job: &str, nodes: &str, ranks: u32, extra: &[&str], step_ms: u32) -> Job {
        self.start_with_env(job, nodes, ranks, extra, step_ms, &[])
    }

    /// [`Case::start`] with extra environment.
    pub fn start_with_env(
        &self,
        job: &str,
        nodes: &str,
        ranks: u32,
        extra: &[&str],
        step_ms: u32,
        env: &[(&str, &str)],
    ) -> Job {
        self.spawn(
            job,
            nodes,
            ranks,
            extra,
            &self.files.app_args("run", step_ms),
            env,
        )
    }

    /// `cryo restart` on `nodes`.
    /// `cryo restart` on `nodes`. It names no launcher: the job's own
    /// (`cryo run --launcher`, for Open MPI) is remembered with its command.
    pub fn restart(&self, job: &str, nodes: &str, extra: &[&str]) -> Output {
        self.cryo()
            .args(["restart", job, self.site.nodes_flag(), nodes])
            .arg("--scratch")
            .arg(self.path(&format!("scratch-{job}-restart")))
            .args(extra)
            .output()
            .unwrap()
    }

    /// `cryo checkpoint`.
    pub fn checkpoint(&self, job: &str) -> Output {
        self.cryo().args(["checkpoint", job]).output().unwrap()
    }

    /// The job's committed epochs.
    pub fn committed(&self, job: &str) -> Vec<u64> {
        cryo_core::Store::open(self.store())
            .and_then(|s| s.job(job))
            .ok()
            .and_then(|j| j.committed_epochs().ok())
            .unwrap_or_default()
    }

    /// SIGKILLs every process whose command line mentions this case's
    /// directory: `cryo run`, the agents, the launcher, its proxies and the
    /// ranks.
    pub fn kill_everything(&self) {
        kill_every_process_mentioning(&self.files.dir().display().to_string());
    }

    /// The run `run` ended byte-identical to the reference.
    pub fn assert_matches_reference(&self) {
        self.files.assert_matches_reference("run");
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

/// `cryo run` in the background; killed on drop.
#[derive(Debug)]
pub struct Job {
    /// The `cryo run` process.
    pub child: Option<Child>,
    /// Its stderr.
    pub log: PathBuf,
}

impl Job {
    /// What `cryo run` said so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 2 min) for `cryo run` to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_child(&mut child, Duration::from_secs(120))
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

/// Checkpoint at about iteration 50 of 100 on 2 emulated nodes, kill -9
/// everything, restart on 4 nodes, then again on 1 node: both
/// byte-identical to the reference, an uninterrupted run of `program`
/// without cryo. Returns the case, for more comparisons.
pub fn checkpoint_kill_restart_elsewhere(program: Program) -> Case {
    let case = Case::new(program);
    case.reference(4);
    let job = case.start("heat", "a:2,b:2", 4, &[], 40);
    wait_until("iteration 45", Duration::from_secs(60), || {
        lines(&case.path("run.log")) >= 45
    });
    let out = case.checkpoint("heat");
    assert!(
        out.status.success(),
        "cryo checkpoint failed: {}\n{}",
        output_text(&out),
        job.log_text()
    );
    assert!(
        output_text(&out).contains("epoch 1 committed"),
        "{}",
        output_text(&out)
    );
    // heat2d holds nothing a restart cannot give back: the runtime's own
    // control page and the MPI library's shared memory are not the
    // application's.
    assert!(
        !output_text(&out).contains("warning"),
        "no warning expected: {}",
        output_text(&out)
    );
    let at = lines(&case.path("run.log"));
    assert!(
        at < Heat2dFiles::ITERS,
        "the job finished before it was killed"
    );
    case.kill_everything();
    drop(job);

    let out = case.restart("heat", "c:1,d:1,e:1,f:1", &[]);
    assert!(
        out.status.success(),
        "restart on 4 nodes failed: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("restarting job \"heat\" from epoch 1"),
        "{}",
        output_text(&out)
    );
    // A compiled program loads the runtime before MPI_Init, so its
    // prefetch is done by the time the state is back (Python loads it in
    // cryo.init_mpi, after).
    if case.program.lead.is_empty() {
        let said = output_text(&out);
        let line = said
            .lines()
            .find(|l| l.contains("heat2d: prefetch:"))
            .unwrap_or_else(|| panic!("no prefetch line:\n{said}"));
        assert!(
            line.contains("prefetch: epoch 1: asked for") && line.contains(" 0 failed"),
            "{line}"
        );
    }
    case.assert_matches_reference();

    let out = case.restart("heat", "solo", &["--epoch", "1"]);
    assert!(
        out.status.success(),
        "restart on 1 node failed: {}",
        output_text(&out)
    );
    case.assert_matches_reference();
    case
}
