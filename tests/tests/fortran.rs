//! The Fortran binding (`rank/fortran/cryo.F90`, `use cryo`) end to end.
//! The module and the programs are compiled with an MPI's Fortran wrapper
//! and run with its launcher against the runtime built for that MPI:
//!
//! - the Fortran heat2d (`examples/fortran/heat2d.f90`) under `cryo run` on
//!   emulated nodes: checkpoint, `kill -9`, restart on other nodes, with
//!   the log and the final grid byte-identical to an uninterrupted run. Its
//!   log goes through a formatted Fortran unit, which buffers, so the
//!   restart also proves that the checkpoint flushed the unit;
//! - the Fortran heat2d against the C one (`examples/c/heat2d.c`): the same
//!   input, log, grid and output, byte for byte;
//! - the typed regions' shapes and bounds, a 3-D int64 region read back in
//!   C order, and the refusals of bad arguments
//!   (`tests/fortran/typed_regions.f90`);
//! - a log opened after `cryo_init` at every start
//!   (`tests/fortran/reopens_its_log.f90`): opened with `position='append'`,
//!   `status='replace'` or neither, it goes on from the checkpoint,
//!   byte-identical; linked with libgfortran before the runtime, every start
//!   says what that loses, the log is not damaged, and the restart names it
//!   as cut.
//!
//! Each body takes its MPI as an [`MpiFlavour`]; the runtime is built
//! against MPICH only, so the MPICH tests are the only ones for now.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cryo_tests::heat2d::{missing_tools, openmpi_available, openmpi_flavour, Mpi};
use cryo_tests::state::{built, repo_root};
use cryo_tests::{
    assert_same_file, bin_dir, kill_every_process_mentioning, lines, output_text, wait_until,
    Heat2dFiles,
};

/// One MPI implementation: its compiler wrappers, its launcher, and the
/// folder holding the `libcryo_rank` flavour built against it.
struct MpiFlavour {
    name: &'static str,
    fortran: &'static str,
    c: &'static str,
    mpi: Mpi,
    runtime: PathBuf,
    /// The runtime's `-l` name in that folder.
    lib: &'static str,
    /// `-L` folders for the MPI's own libraries, ahead of the system's
    /// (see [`MpiFlavour::openmpi`]).
    lib_dirs: Vec<String>,
}

impl MpiFlavour {
    /// MPICH by its explicit names (installing Open MPI beside it may turn
    /// the plain `mpif90` and `mpiexec` into Open MPI's), with the
    /// workspace's runtime. `None`, saying so loudly, when a tool is missing.
    fn mpich() -> Option<MpiFlavour> {
        let tools = ["mpif90.mpich", "mpicc.mpich", "mpiexec.mpich"];
        let missing = missing_tools(&tools);
        if !missing.is_empty() {
            eprintln!(
                "\n!!!!! SKIPPED: no {} (install mpich and gfortran); the MPICH Fortran tests did not run !!!!!\n",
                missing.join(", ")
            );
            return None;
        }
        Some(MpiFlavour {
            name: "mpich",
            fortran: tools[0],
            c: tools[1],
            mpi: Mpi::Mpich,
            runtime: built(),
            lib: "-lcryo_rank",
            lib_dirs: Vec::new(),
        })
    }

    /// Open MPI by its explicit names, with the runtime's Open MPI flavour
    /// (built once per test process). Without Open MPI the tests fail
    /// unless `CRYO_SKIP_OPENMPI` is set.
    fn openmpi() -> Option<MpiFlavour> {
        if !openmpi_available() {
            return None;
        }
        let runtime = openmpi_flavour();
        built();
        // Debian's mpifort.openmpi names no -L for libmpi, so the linker
        // takes the system's libmpi.so, which the MPICH pin points at
        // libmpich: Open MPI's own folder goes first.
        let dirs = Command::new("mpicc.openmpi")
            .arg("--showme:libdirs")
            .output()
            .unwrap();
        let lib_dirs = String::from_utf8_lossy(&dirs.stdout)
            .split_whitespace()
            .map(|dir| format!("-L{dir}"))
            .collect();
        Some(MpiFlavour {
            name: "openmpi",
            fortran: "mpifort.openmpi",
            c: "mpicc.openmpi",
            mpi: Mpi::OpenMpi,
            runtime,
            lib: "-lcryo_rank_openmpi",
            lib_dirs,
        })
    }

    /// `cryo COMMAND` with a store in `files`' folder and lifecycle events
    /// on; `run` and `restart` launch the ranks with this flavour's
    /// launcher.
    fn cryo(&self, files: &Heat2dFiles, command: &str) -> Command {
        let mut cmd = Command::new(self.runtime.join("cryo"));
        cmd.env("CRYO_STORE", files.path("store"))
            .env("CRYO_LOG", "info")
            .current_dir(files.dir())
            .arg(command);
        if matches!(command, "run" | "restart") {
            cmd.args(["--launcher", self.mpi.launcher()]);
        }
        cmd
    }
}

/// Compiles the module, the Fortran heat2d, `typed_regions` and the C
/// heat2d for `flavour` into a folder of the target directory, once per
/// flavour and test process; returns the folder.
fn programs(flavour: &MpiFlavour) -> PathBuf {
    static BUILT: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = bin_dir().join(format!("fortran-{}", flavour.name));
    if built.contains(&flavour.name) {
        return dir;
    }
    fs::create_dir_all(&dir).unwrap();
    let root = repo_root();
    let runtime = flavour.runtime.as_os_str();
    let rpath = format!("-Wl,-rpath,{}", flavour.runtime.display());
    let mut link: Vec<&OsStr> = flavour.lib_dirs.iter().map(OsStr::new).collect();
    link.extend([
        OsStr::new("-L"),
        runtime,
        flavour.lib.as_ref(),
        rpath.as_ref(),
    ]);
    // The module keeps to the standard (Fortran 2018), so other compilers
    // take it too; cryo.mod and cryo.o land in `dir`.
    let module = root.join("rank/fortran/cryo.F90");
    compile(
        flavour.fortran,
        &dir,
        &["-std=f2018".as_ref(), "-c".as_ref(), module.as_ref()],
    );
    for (name, source, first) in [
        ("heat2d", "examples/fortran/heat2d.f90", None),
        ("typed_regions", "tests/fortran/typed_regions.f90", None),
        ("reopens_its_log", "tests/fortran/reopens_its_log.f90", None),
        // Against the documented order: libgfortran before the runtime.
        (
            "reopens_its_log_gfortran_first",
            "tests/fortran/reopens_its_log.f90",
            Some("-lgfortran"),
        ),
    ] {
        let source = root.join(source);
        let mut args = vec![
            OsStr::new("-o"),
            name.as_ref(),
            source.as_ref(),
            "cryo.o".as_ref(),
        ];
        args.extend(first.map(OsStr::new));
        args.extend(&link);
        compile(flavour.fortran, &dir, &args);
    }
    let source = root.join("examples/c/heat2d.c");
    let include = root.join("rank/include");
    let mut args = vec![
        OsStr::new("-o"),
        "heat2d_c".as_ref(),
        source.as_ref(),
        "-I".as_ref(),
        include.as_ref(),
        "-lm".as_ref(),
    ];
    args.extend(&link);
    compile(flavour.c, &dir, &args);
    built.push(flavour.name);
    dir
}

/// `compiler -O2 -Wall -Werror args` in `dir`; panics with its output if it
/// fails.
fn compile(compiler: &str, dir: &Path, args: &[&OsStr]) {
    let out = Command::new(compiler)
        .args(["-O2", "-Wall", "-Werror"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed:\n{}",
        output_text(&out)
    );
}

/// SIGKILLs, when dropped, every process started for the test's folder.
struct KillAll(String);

impl Drop for KillAll {
    fn drop(&mut self) {
        kill_every_process_mentioning(&self.0);
    }
}

fn text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The Fortran heat2d under `cryo run` on two emulated nodes, checkpointed
/// early, killed with `kill -9`, restarted on four nodes and then on one:
/// both restarts end byte-identical to the uninterrupted run.
fn heat2d_checkpoint_kill_restart_on_other_nodes(flavour: &MpiFlavour) {
    let heat2d = programs(flavour).join("heat2d");
    let files = Heat2dFiles::new("cryo-fortran-", &heat2d);
    let _kill_all = KillAll(files.dir().display().to_string());
    files.run_plain_with(flavour.mpi, &heat2d, 4, "reference");

    let run_log = files.path("cryo-run.log");
    let mut job = flavour
        .cryo(&files, "run")
        .args([
            "--job",
            "heat",
            "--nodes",
            "a:2,b:2",
            "-n",
            "4",
            "--scratch",
        ])
        .arg(files.path("scratch-run"))
        .arg("--")
        .arg(&heat2d)
        .args(files.app_args("run", 40))
        .stdout(fs::File::create(files.path("run.stdout")).unwrap())
        .stderr(fs::File::create(&run_log).unwrap())
        .spawn()
        .unwrap();
    // The log sits in the unit's buffer until a checkpoint: wait for the
    // ranks instead, and checkpoint at whatever iteration they are.
    wait_until("4 registered ranks", Duration::from_secs(60), || {
        text(&run_log).matches("rank.registered").count() >= 4
    });
    let out = flavour
        .cryo(&files, "checkpoint")
        .arg("heat")
        .output()
        .unwrap();
    assert!(
        out.status.success() && output_text(&out).contains("epoch 1 committed"),
        "cryo checkpoint failed: {}\n{}",
        output_text(&out),
        text(&run_log)
    );
    let marker = "heat2d: checkpointed after iteration ";
    wait_until(
        "rank 0 to report the checkpoint",
        Duration::from_secs(30),
        || text(&run_log).contains(marker),
    );
    let log = text(&run_log);
    let at: usize = log[log.find(marker).unwrap() + marker.len()..]
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        at < Heat2dFiles::ITERS,
        "the job finished before it was killed"
    );
    assert!(
        lines(&files.path("run.log")) >= at,
        "the checkpoint after iteration {at} did not flush the log's unit"
    );
    kill_every_process_mentioning(&files.dir().display().to_string());
    job.wait().unwrap();

    for (nodes, extra, scratch) in [
        ("c:1,d:1,e:1,f:1", None, "scratch-restart-4"),
        ("solo", Some("--epoch=1"), "scratch-restart-1"),
    ] {
        let out = flavour
            .cryo(&files, "restart")
            .args(["heat", "--nodes", nodes, "--scratch"])
            .arg(files.path(scratch))
            .args(extra)
            .output()
            .unwrap();
        let said = output_text(&out);
        assert!(out.status.success(), "restart on {nodes} failed: {said}");
        assert!(
            said.contains("restarting job \"heat\" from epoch 1")
                && said.contains(&format!("heat2d: restarted from epoch 1 at iteration {at}")),
            "{said}"
        );
        files.assert_matches_reference("run");
    }
}

/// The Fortran and C heat2d on the same input and ranks: the same input
/// file from `--make-input`, log, grid and standard output.
fn heat2d_matches_c(flavour: &MpiFlavour) {
    let dir = programs(flavour);
    let (fortran, c) = (dir.join("heat2d"), dir.join("heat2d_c"));
    let files = Heat2dFiles::new("cryo-fortran-c-", &c);
    let _kill_all = KillAll(files.dir().display().to_string());
    let made = files.path("input-fortran.bin");
    let out = Command::new(&fortran)
        .arg("--make-input")
        .arg(&made)
        .args(["--n", Heat2dFiles::N])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_same_file(&files.path("input.bin"), &made);
    // 5 ranks split the 96 rows unevenly.
    for ranks in [1, 5] {
        let outputs: Vec<Output> = [("c", &c), ("fortran", &fortran)]
            .into_iter()
            .map(|(tag, program)| {
                files.run_plain_with(flavour.mpi, program, ranks, &format!("{tag}-{ranks}"))
            })
            .collect();
        for kind in ["log", "out"] {
            assert_same_file(
                &files.path(&format!("c-{ranks}.{kind}")),
                &files.path(&format!("fortran-{ranks}.{kind}")),
            );
        }
        let stdout = String::from_utf8_lossy(&outputs[1].stdout);
        assert_eq!(String::from_utf8_lossy(&outputs[0].stdout), stdout);
        assert_eq!(
            stdout,
            format!("heat2d: OK 96x96 after 100 iterations on {ranks} ranks\n")
        );
    }
    assert_eq!(lines(&files.path("fortran-5.log")), Heat2dFiles::ITERS);
}

/// Every element type and rank of the typed regions, a 3-D int64 region
/// read back in C order, a file region, `cryo_protect` of an allocatable
/// array, and each bad argument's status and message.
fn typed_regions(flavour: &MpiFlavour) {
    let program = programs(flavour).join("typed_regions");
    let dir = tempfile::Builder::new()
        .prefix("cryo-fortran-regions-")
        .tempdir()
        .unwrap();
    let _kill_all = KillAll(dir.path().display().to_string());
    let run = |mode: &str| {
        flavour
            .mpi
            .launch(1)
            .arg(&program)
            .arg(dir.path())
            .arg(mode)
            .output()
            .unwrap()
    };
    let out = run("");
    assert!(out.status.success(), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let expect = |line: &str| {
        assert!(
            said.lines().any(|l| l == line),
            "no line {line:?} in:\n{said}"
        );
    };
    for (name, shape) in [
        ("cube", "3 4 5"),
        ("r64-1", "512"),
        ("r64-2", "8 64"),
        ("r64-3", "2 4 64"),
        ("r32-1", "1024"),
        ("r32-2", "32 32"),
        ("r32-3", "4 16 16"),
        ("i32-1", "1024"),
        ("i32-2", "16 64"),
        ("i32-3", "16 16 4"),
        ("i64-1", "512"),
        ("i64-2", "64 8"),
    ] {
        let ones = vec!["1"; shape.split(' ').count()].join(" ");
        expect(&format!("{name}: shape {shape}"));
        expect(&format!("{name}: lbound {ones}"));
        expect(&format!("{name}: ubound {shape}"));
    }
    // Each array was filled whole with its own value, the file region holds
    // the file's 0..511, and no agent means nothing to checkpoint or restore.
    expect("sums: 768 1280 1792 1536 2560 3584 1024 2048 3072 512 1024");
    expect("field: 0 15 16 511");
    expect("safe-point: 0 0");
    for (case, code, message) in [
        ("before-init", 2, "cryo is not initialized"),
        ("null-comm", 1, "the communicator is MPI_COMM_NULL"),
        ("protect-table", 0, "success"),
        ("protect-strided", 1, "the array is not contiguous"),
        (
            "protect-twice",
            5,
            "rank 0: region \"table\" already exists",
        ),
        (
            "extents-for-rank",
            1,
            "shape has 2 extents for a pointer of rank 1",
        ),
        ("zero-extent", 1, "extent 2 of shape is 0"),
        ("negative-extent", 1, "extent 2 of shape is -2"),
        ("nul-in-name", 1, "name contains a NUL character"),
        (
            "duplicate-name",
            5,
            "rank 0: region \"cube\" already exists",
        ),
        (
            "file-too-short",
            5,
            "is 4096 bytes, the region needs 4224 bytes",
        ),
        ("negative-bytes", 1, "nbytes is -1; it cannot be negative"),
    ] {
        let prefix = format!("{case}: {code} ");
        let line = said.lines().find(|l| l.starts_with(&prefix));
        assert!(
            line.is_some_and(|l| l.contains(message)),
            "{case}: wanted status {code} and {message:?}, got {line:?}"
        );
    }

    // cube(i, j, k) = i + 10 j + 100 k is, in C, cube[k-1][j-1][i-1].
    let bytes = fs::read(dir.path().join("cube.bin")).unwrap();
    let cube: Vec<i64> = bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(cube.len(), 3 * 4 * 5);
    for k in 1..=5 {
        for j in 1..=4 {
            for i in 1..=3 {
                let at = usize::try_from(((k - 1) * 4 + (j - 1)) * 3 + (i - 1)).unwrap();
                assert_eq!(cube[at], i + 10 * j + 100 * k, "cube({i}, {j}, {k})");
            }
        }
    }

    // Without ierr, a bad call stops the program with the message.
    let out = run("stop");
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("cryo: cryo_region_real64: shape has 2 extents for a pointer of rank 1")
            && !said.contains("not stopped"),
        "{said}"
    );
}

/// What `cryo_init` says of a program linked with libgfortran first.
const LINK_ORDER: &str = "WARNING: the program is linked with libgfortran before libcryo_rank";

/// What a run of a `reopens_its_log` build left: what the first run and
/// the restart said, and each rank's log.
struct LogRun {
    first_run: String,
    restart: String,
    logs: [String; 2],
}

/// `program` (a build of `reopens_its_log`) in `mode` under `cryo run` on
/// two emulated nodes: checkpointed after ten steps, run past it, killed,
/// restarted on one node, run to its end.
fn run_reopening_log(flavour: &MpiFlavour, program: &str, mode: &str) -> LogRun {
    let program = programs(flavour).join(program);
    let files = Heat2dFiles::new("cryo-fortran-log-", &programs(flavour).join("heat2d"));
    let _kill_all = KillAll(files.dir().display().to_string());
    let log = |rank: u32| text(&files.path(&format!("log.{rank}")));
    let mut job = flavour
        .cryo(&files, "run")
        .args(["--job", "logs", "--nodes", "a:1,b:1", "-n", "2", "--"])
        .arg(&program)
        .args([&LOG_STEPS.to_string(), mode])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(files.path("run.err")).unwrap())
        .spawn()
        .unwrap();
    wait_until("ten steps", Duration::from_secs(60), || {
        log(1).lines().count() >= 10
    });
    let out = flavour
        .cryo(&files, "checkpoint")
        .arg("logs")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let at = log(1).lines().count();
    wait_until("steps past the checkpoint", Duration::from_secs(60), || {
        log(1).lines().count() >= (at + 5).min(LOG_STEPS)
    });
    assert!(
        at + 5 <= LOG_STEPS,
        "the job ended before it could be killed"
    );
    kill_every_process_mentioning(&files.dir().display().to_string());
    job.wait().unwrap();
    let out = flavour
        .cryo(&files, "restart")
        .args(["logs", "--nodes", "c:2"])
        .output()
        .unwrap();
    let restart = output_text(&out);
    assert!(out.status.success(), "{mode}: {restart}");
    LogRun {
        first_run: text(&files.path("run.err")),
        restart,
        logs: [log(0), log(1)],
    }
}

/// Long enough (50 ms a step) that the job cannot end while a loaded
/// machine takes its checkpoint.
const LOG_STEPS: usize = 120;

/// "rank R step S" for each step from `from` on.
fn steps_of(rank: usize, from: usize) -> String {
    (from..LOG_STEPS)
        .map(|step| format!("rank {rank} step {step}\n"))
        .collect()
}

/// Whether the restart named rank `rank`'s log as emptied by its set-up.
fn named_as_lost(run: &LogRun, rank: usize) -> bool {
    run.restart
        .contains(&format!("cryo: rank {rank}: WARNING: "))
        && {
            let line = (run.restart.lines()).find(|l| {
                l.contains(&format!(
                    "log.{rank} (held open for writing at the checkpoint"
                ))
            });
            line.is_some_and(|l| l.contains("what it wrote before the checkpoint is lost"))
        }
}

/// `reopens_its_log`, linked as documented: whether opened with
/// `position='append'`, `status='replace'` or neither, each rank's log
/// holds every step once, and no log is named as lost.
fn log_opened_at_every_start(flavour: &MpiFlavour) {
    for mode in ["append", "asis", "replace"] {
        let run = run_reopening_log(flavour, "reopens_its_log", mode);
        let said = &run.restart;
        assert!(
            !said.contains(LINK_ORDER) && !run.first_run.contains(LINK_ORDER),
            "{said}"
        );
        for (rank, held) in run.logs.iter().enumerate() {
            let every_step = steps_of(rank, 0);
            assert!(*held == every_step, "{mode}: log.{rank}:\n{held}\n{said}");
            assert!(!named_as_lost(&run, rank), "{said}");
        }
    }
}

/// `reopens_its_log` linked with libgfortran before the runtime, so that
/// the runtime cannot tell a unit's OPEN from C's: every start warns of it,
/// and the restarted unit is not handed the restored fd at the
/// checkpoint's offset (it would write its first record there while
/// counting from zero, and leave a hole of zeros): the log starts again at
/// the checkpoint's step, and the restart names it.
fn linked_with_libgfortran_first(flavour: &MpiFlavour) {
    let run = run_reopening_log(flavour, "reopens_its_log_gfortran_first", "asis");
    let said = &run.restart;
    for rank in 0..2 {
        let warning = format!("cryo: rank {rank}: {LINK_ORDER}");
        assert!(run.first_run.contains(&warning), "{}", run.first_run);
        assert!(said.contains(&warning), "{said}");
        let held = &run.logs[rank];
        let from = (held.lines().next())
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            from >= 10 && *held == steps_of(rank, from),
            "log.{rank}: {held:?}\n{said}"
        );
        assert!(named_as_lost(&run, rank), "{said}");
    }
}

/// One `#[test]` per body, with the flavour `$flavour` gives (`None`:
/// skipped, as it said).
macro_rules! flavour_tests {
    ($flavour:expr; $($name:ident => $body:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            if let Some(flavour) = $flavour {
                $body(&flavour);
            }
        }
    )*};
}

flavour_tests! {
    MpiFlavour::openmpi();
    fortran_heat2d_checkpoint_kill_restart_on_other_nodes_openmpi =>
        heat2d_checkpoint_kill_restart_on_other_nodes,
    fortran_heat2d_is_byte_identical_to_c_heat2d_openmpi => heat2d_matches_c,
    fortran_typed_regions_have_the_requested_shapes_openmpi => typed_regions,
    fortran_log_opened_at_every_start_openmpi => log_opened_at_every_start,
    fortran_linked_with_libgfortran_first_is_named_openmpi => linked_with_libgfortran_first,
}

flavour_tests! {
    MpiFlavour::mpich();
    fortran_heat2d_checkpoint_kill_restart_on_other_nodes_mpich =>
        heat2d_checkpoint_kill_restart_on_other_nodes,
    fortran_heat2d_is_byte_identical_to_c_heat2d_mpich => heat2d_matches_c,
    fortran_typed_regions_have_the_requested_shapes_mpich => typed_regions,
    fortran_log_opened_at_every_start_mpich => log_opened_at_every_start,
    fortran_linked_with_libgfortran_first_is_named_mpich => linked_with_libgfortran_first,
}
