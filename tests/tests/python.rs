//! The Python package (`python/`, `import cryo`) with Debian's mpi4py,
//! which is built against Open MPI, so it loads the `libcryo_rank_openmpi`
//! flavour: installed with pip from the repository into a virtual
//! environment, its errors, and the Python heat2d
//! (`examples/python/heat2d.py`) under `cryo run`: checkpoint, `kill -9`,
//! restart on other nodes, byte-identical to an uninterrupted run and to
//! the C heat2d; logs a program reopens for appending at each step; and a
//! log opened with "w" at every start and held.
//!
//! Without Open MPI or Python with NumPy and mpi4py these tests fail,
//! loudly: set `CRYO_SKIP_OPENMPI=1` or `CRYO_SKIP_PYTHON=1` to skip them on
//! a machine that cannot run them (they then print SKIPPED).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cryo_tests::heat2d::{
    c_heat2d, checkpoint_kill_restart_elsewhere, openmpi_available, openmpi_flavour, repo_root,
    Case, Mpi, Program,
};
use cryo_tests::{bin_dir, lines, output_text, wait_until};

/// The interpreter Debian's `python3-numpy` and `python3-mpi4py` belong to.
const PYTHON: &str = "/usr/bin/python3";
const SKIP_PYTHON: &str = "CRYO_SKIP_PYTHON";

/// Whether Python with NumPy, mpi4py and pip can run here (and Open MPI,
/// which Debian's mpi4py uses).
fn python_available() -> bool {
    if !openmpi_available() {
        return false;
    }
    let check = Command::new(PYTHON)
        .args(["-c", "import numpy, mpi4py, pip, venv"])
        .output();
    let problem = match check {
        Ok(out) if out.status.success() => return true,
        Ok(out) => output_text(&out),
        Err(err) => format!("{PYTHON}: {err}"),
    };
    if std::env::var_os(SKIP_PYTHON).is_some() {
        eprintln!("\n*** SKIPPED: the Python tests did not run: {problem} ***\n");
        return false;
    }
    panic!(
        "the Python tests cannot run: {problem} (scripts/install-deps.sh installs python3-numpy, \
         python3-mpi4py, python3-pip and python3-venv). Set {SKIP_PYTHON}=1 to skip them knowingly."
    );
}

/// A virtual environment (seeing the system's NumPy and mpi4py) with the
/// package installed by `pip install python/`; removed on drop.
struct Venv {
    dir: tempfile::TempDir,
}

impl Venv {
    fn new() -> Venv {
        let dir = tempfile::Builder::new()
            .prefix("cryo-venv-")
            .tempdir()
            .unwrap();
        let made = Command::new(PYTHON)
            .args(["-m", "venv", "--system-site-packages", "--without-pip"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "python3 -m venv: {}",
            output_text(&made)
        );
        let venv = Venv { dir };
        // pip builds in the source tree (build/, *.egg-info): build a copy,
        // so that the repository stays clean.
        let source = venv.dir.path().join("src");
        let copied = Command::new("cp")
            .arg("-r")
            .arg(repo_root().join("python"))
            .arg(&source)
            .output()
            .unwrap();
        assert!(copied.status.success(), "{}", output_text(&copied));
        // Offline: the build backend (setuptools), pip itself and the
        // dependencies are the system's.
        let pip = Command::new(venv.python())
            .args(["-m", "pip", "install", "--no-index", "--no-build-isolation"])
            .arg(&source)
            .output()
            .unwrap();
        assert!(
            pip.status.success(),
            "pip install python/: {}",
            output_text(&pip)
        );
        venv
    }

    fn python(&self) -> PathBuf {
        self.dir.path().join("bin/python")
    }

    /// Runs `code` under `mpirun.openmpi -np 1`, with `CRYO_RANK_LIB` set
    /// to `rank_lib` (or unset), without an agent.
    fn run(&self, code: &str, rank_lib: Option<&Path>) -> Output {
        let mut cmd = Mpi::OpenMpi.launch(1);
        cmd.env_remove("CRYO_AGENT_SOCKET")
            .env_remove("CRYO_RANK_LIB");
        if let Some(lib) = rank_lib {
            cmd.env("CRYO_RANK_LIB", lib);
        }
        // Outside the repository, so that `import cryo` finds the installed
        // package, not the source folder.
        cmd.current_dir(std::env::temp_dir())
            .arg(self.python())
            .args(["-c", code])
            .output()
            .unwrap()
    }
}

#[test]
fn pip_installs_the_package_from_the_repository() {
    if !python_available() {
        return;
    }
    let venv = Venv::new();
    let out = Command::new(venv.python())
        .current_dir(std::env::temp_dir())
        .args(["-c", "import cryo; print(cryo.__file__)"])
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.trim()
            .starts_with(&venv.dir.path().display().to_string()),
        "cryo should be imported from the venv {}: {said}",
        venv.dir.path().display()
    );
}

/// The package's errors: a call before `init_mpi`, no library where
/// `CRYO_RANK_LIB` says, and the MPICH flavour under mpi4py's Open MPI:
/// each a `cryo.Error` saying what to do, never a crash.
#[test]
fn python_errors_name_the_problem() {
    if !python_available() {
        return;
    }
    let venv = Venv::new();
    let try_init = "import cryo\n\
                    try:\n    cryo.init_mpi()\n\
                    except cryo.Error as err:\n    print('init:', err)\n    raise SystemExit(3)\n\
                    print('init: ok')\n";

    let out = venv.run(
        "import cryo, numpy\n\
         try:\n    cryo.region('x', 4, numpy.int64)\n\
         except cryo.Error as err:\n    print('before init:', err)\n",
        None,
    );
    assert!(
        output_text(&out)
            .contains("before init: cryo is not initialised: call cryo.init_mpi(comm) first"),
        "{}",
        output_text(&out)
    );

    let missing = std::env::temp_dir().join("cryo-no-such-folder");
    let out = venv.run(try_init, Some(&missing));
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("init: cannot load libcryo_rank_openmpi.so (cryo's runtime for openmpi")
            && said.contains("set CRYO_RANK_LIB"),
        "{said}"
    );

    cryo_tests::heat2d::built();
    let out = venv.run(try_init, Some(&bin_dir().join("libcryo_rank.so")));
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("libcryo_rank.so was built for mpich, but mpi4py runs on openmpi")
            && said.contains("use libcryo_rank_openmpi.so"),
        "{said}"
    );

    // The right flavour, without an agent: runs alone (no checkpoints). A
    // region larger than any address space is refused by name (ctypes
    // would pass its size cut to 64 bits), and leaves its name free.
    let huge = format!(
        "{try_init}import numpy\n\
         try:\n    cryo.region('big', ((1 << 61) + 512,), numpy.float64)\n\
         except cryo.Error as err:\n    print('huge:', err)\n\
         print('again:', cryo.region('big', 16).size)\n"
    );
    let out = venv.run(&huge, Some(&openmpi_flavour()));
    let said = output_text(&out);
    assert!(said.contains("init: ok"), "{said}");
    assert!(
        said.contains(
            "huge: region 'big' of 18446744073709555712 bytes is larger than any address space"
        ),
        "{said}"
    );
    assert!(said.contains("again: 16"), "{said}");
}

/// `cryo.flush_python_files` (which the package registers with the
/// runtime, for each checkpoint) puts what Python buffered in text and
/// binary files into the files, and passes over closed and read-only ones.
#[test]
fn python_file_buffers_are_flushed_for_a_checkpoint() {
    if !python_available() {
        return;
    }
    let venv = Venv::new();
    let out = venv.run(
        "import os, tempfile, cryo\n\
         d = tempfile.mkdtemp()\n\
         paths = [os.path.join(d, n) for n in ('text', 'binary')]\n\
         text = open(paths[0], 'w')\n\
         text.write('a line of text\\n')\n\
         binary = open(paths[1], 'wb')\n\
         binary.write(b'binary\\n')\n\
         open(os.path.join(d, 'closed'), 'w').close()\n\
         reader = open(paths[0])\n\
         print('before', [os.path.getsize(p) for p in paths])\n\
         cryo.flush_python_files()\n\
         print('after', [os.path.getsize(p) for p in paths])\n",
        Some(&openmpi_flavour()),
    );
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("before [0, 0]"), "{said}");
    assert!(said.contains("after [15, 7]"), "{said}");
}

/// The Python heat2d under `cryo run` with Open MPI: checkpoint, `kill -9`
/// of everything, restart on 4 and then 1 other nodes, each byte-identical
/// to an uninterrupted Python run, which is byte-identical to the C one.
/// Its log is a buffered Python file: the lines still in the buffer at the
/// checkpoint are lost unless the package flushes them there.
#[test]
fn python_heat2d_checkpoint_kill_restart_matches_c() {
    if !python_available() {
        return;
    }
    let venv = Venv::new();
    let program = Program {
        exe: venv.python(),
        lead: vec![repo_root().join("examples/python/heat2d.py").into()],
        mpi: Mpi::OpenMpi,
        env: vec![(
            "CRYO_RANK_LIB".into(),
            openmpi_flavour().display().to_string(),
        )],
    };
    let case = checkpoint_kill_restart_elsewhere(program);
    case.files.run_without_cryo(
        &Program::compiled(c_heat2d(Mpi::OpenMpi), Mpi::OpenMpi),
        4,
        "c",
    );
    case.files.assert_runs_match("c", "run");
}

/// The table of files opened for appending (`python/cryo/_appended.py`),
/// by itself: only opens with `O_APPEND` of a path are noted; a checkpoint's
/// sizes come back in a restarted process, which cuts the file back, also
/// when another host numbers the file's device differently; a file made
/// again at its size (a new inode) is left without a word, one replaced by
/// another is named and left; paths that do not fit are named; a damaged
/// table is said, never trusted.
#[test]
fn python_appended_files_table_round_trips_and_refuses_damage() {
    if !python_available() {
        return;
    }
    let venv = Venv::new();
    let out = venv.run(
        "import json, os, tempfile, numpy as np\n\
         from mpi4py import MPI\n\
         from cryo import _appended\n\
         d = tempfile.mkdtemp()\n\
         log = os.path.join(d, 'log')\n\
         a = _appended.Appended(np.zeros(4096, np.uint8))\n\
         a.audit('open', (log, 'a', os.O_WRONLY | os.O_APPEND | os.O_CREAT))\n\
         a.audit('open', (os.path.join(d, 'w'), 'w', os.O_WRONLY))\n\
         a.audit('open', (3, 'a', os.O_APPEND))\n\
         a.audit('exec', (None,))\n\
         print('noted', list(a.paths) == [log])\n\
         with open(log, 'a') as f: f.write('kept\\n')\n\
         print('left out', a.record())\n\
         with open(log, 'a') as f: f.write('after the checkpoint\\n')\n\
         b = _appended.Appended(a.table)\n\
         print('said', b.cut_back(MPI.COMM_WORLD))\n\
         print('log', repr(open(log).read()))\n\
         def table_of(rows):\n\
         \x20   data = json.dumps(rows).encode()\n\
         \x20   head = _appended._LENGTH.pack(len(data))\n\
         \x20   return np.frombuffer((head + data).ljust(4096, b'\\0'), np.uint8).copy()\n\
         with open(log, 'a') as f: f.write('after again\\n')\n\
         moved = [[p, s, dev + 1, ino] for p, s, dev, ino in a.saved()]\n\
         print('other host', _appended.Appended(table_of(moved)).cut_back(MPI.COMM_WORLD), repr(open(log).read()))\n\
         def swap(text, n):\n\
         \x20   os.rename(log, f'{log}.{n}')\n\
         \x20   open(log, 'w').write(text)\n\
         swap('kept\\n', 1)\n\
         print('made again', _appended.Appended(a.table).cut_back(MPI.COMM_WORLD))\n\
         swap('another file\\n', 2)\n\
         print('replaced', _appended.Appended(a.table).cut_back(MPI.COMM_WORLD))\n\
         small = _appended.Appended(np.zeros(64, np.uint8))\n\
         for i in range(5):\n\
         \x20   p = os.path.join(d, f'a-rather-long-file-name-{i}')\n\
         \x20   open(p, 'w').close()\n\
         \x20   small.paths[p] = None\n\
         print('overflow', len(small.record()))\n\
         bad = _appended.Appended(np.full(64, 255, np.uint8))\n\
         print('damaged', bad.cut_back(MPI.COMM_WORLD))\n",
        Some(&openmpi_flavour()),
    );
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    for line in [
        "noted True",
        "left out []",
        "said []",
        "log 'kept\\n'",
        "other host [] 'kept\\n'",
        "made again []",
        "replaced ['cryo: ",
        "is another file than at the checkpoint; left as it is']",
        "overflow 5",
        "damaged ['cryo: the table of appended files is damaged",
    ] {
        assert!(said.contains(line), "{line:?} not in:\n{said}");
    }
}

/// `script` (in `tests/programs`, given the case's folder, `iters` and 40 ms
/// steps) as job `job` under `cryo run` with `ranks` ranks on `nodes`:
/// checkpointed once rank 0's `log` has 10 lines, run 3 steps past it,
/// killed, and restarted with all its ranks on one node. Returns the case
/// (its venv with it) and what the restart said.
fn checkpoint_kill_restart(
    script: &str,
    job: &str,
    (nodes, ranks): (&str, u32),
    iters: usize,
    log: &str,
) -> (Case, Venv, String) {
    let venv = Venv::new();
    let case = Case::new(Program {
        exe: venv.python(),
        lead: vec![repo_root().join("tests/programs").join(script).into()],
        mpi: Mpi::OpenMpi,
        env: vec![(
            "CRYO_RANK_LIB".into(),
            openmpi_flavour().display().to_string(),
        )],
    });
    let log = case.path(log);
    let args = [
        case.files.dir().display().to_string(),
        iters.to_string(),
        "40".to_owned(),
    ];
    let running = case.spawn(job, nodes, ranks, &[], &args, &[]);
    wait_until("step 10", Duration::from_secs(60), || lines(&log) >= 10);
    let out = case.checkpoint(job);
    assert!(
        out.status.success() && output_text(&out).contains("epoch 1 committed"),
        "{}\n{}",
        output_text(&out),
        running.log_text()
    );
    // Steps logged after the checkpoint, which the restart must take back.
    let at = lines(&log);
    wait_until(
        "3 steps past the checkpoint",
        Duration::from_secs(60),
        || lines(&log) >= at + 3,
    );
    assert!(lines(&log) < iters, "the job finished before it was killed");
    case.kill_everything();
    drop(running);

    let out = case.restart(job, &format!("c:{ranks}"), &[]);
    let said = output_text(&out);
    assert!(out.status.success(), "restart failed: {said}");
    (case, venv, said)
}

/// "rank R step S" for each of `iters` steps.
fn every_step(rank: usize, iters: usize) -> String {
    (1..=iters)
        .map(|step| format!("rank {rank} step {step:04}\n"))
        .collect()
}

/// A program that reopens its logs with `"a"` at every step and closes
/// them again (`tests/programs/append_log.py`), so that no log is open at
/// the checkpoint: the steps it logged after the checkpoint, before the
/// kill, are taken back on the restart (each rank's own log, and one all
/// ranks append to), so every line is there exactly once at the end.
#[test]
fn python_logs_reopened_for_appending_come_back_at_the_checkpoint() {
    const ITERS: usize = 150;
    if !python_available() {
        return;
    }
    let (case, _venv, said) = checkpoint_kill_restart(
        "append_log.py",
        "append",
        ("a:1,b:1", 2),
        ITERS,
        "append.0.log",
    );
    assert!(said.contains("rank 0: resumed after step"), "{said}");
    for rank in 0..2 {
        assert_eq!(
            fs::read_to_string(case.path(&format!("append.{rank}.log"))).unwrap(),
            every_step(rank, ITERS),
            "rank {rank}'s log"
        );
    }
    let mut shared: Vec<String> = fs::read_to_string(case.path("shared.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    shared.sort();
    let mut want: Vec<String> = (0..2)
        .flat_map(|rank| (1..=ITERS).map(move |step| format!("shared rank {rank} step {step:04}")))
        .collect();
    want.sort();
    assert_eq!(shared, want, "the shared log");
}

/// A program that opens its log with `open(path, "w")` (`pathlib`,
/// `os.open` with `O_TRUNC`) at every start and holds it
/// (`tests/programs/held_log.py`): on the restart that open is
/// given the file held at the checkpoint, as it was then, so every line is
/// there exactly once at the end.
#[test]
fn python_log_opened_again_with_w_after_a_restart_continues() {
    const ITERS: usize = 200;
    if !python_available() {
        return;
    }
    let (case, _venv, said) =
        checkpoint_kill_restart("held_log.py", "held", ("a:2,b:1", 3), ITERS, "held.0.log");
    assert!(!said.contains("WARNING"), "{said}");
    for rank in 0..3 {
        assert_eq!(
            fs::read_to_string(case.path(&format!("held.{rank}.log"))).unwrap(),
            every_step(rank, ITERS),
            "rank {rank}'s log\n{said}"
        );
    }
}
