//! A hybrid MPI + OpenMP program (each rank's grid updated by a team of
//! threads, the usual shape of an HPC code) checkpointed at a preemption
//! while its teams are idle between parallel regions, and restarted on
//! another layout: its logs are byte-identical to an uninterrupted run's.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cryo_tests::heat2d::{compile_mpich_program_with, cryo_in};
use cryo_tests::state::{have_mpi, wait_child};
use cryo_tests::{lines, output_text, wait_until};

const RANKS: usize = 2;
const STEPS: &str = "120";
const THREADS: &str = "3";

fn cryo(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = cryo_in(dir);
    cmd.env("OMP_NUM_THREADS", THREADS).args(args);
    cmd
}

fn run_to_end(dir: &Path, program: &Path) -> Output {
    cryo(dir, &["run", "--job", "hybrid", "-n", "2", "--"])
        .arg(program)
        .args([STEPS, "1"])
        .output()
        .unwrap()
}

#[test]
fn an_openmp_program_is_preempted_and_restarted_byte_identical() {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-hybrid-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("omp_stencil");
    compile_mpich_program_with("tests/programs/omp_stencil.c", &["-fopenmp"], &program);
    let reference = dir.path().join("reference");
    let work = dir.path().join("work");
    fs::create_dir_all(&reference).unwrap();
    fs::create_dir_all(&work).unwrap();
    let plain = run_to_end(&reference, &program);
    assert!(plain.status.success(), "{}", output_text(&plain));

    let log = work.join("run.log");
    let mut child = cryo(&work, &["run", "--job", "hybrid"])
        .args(["--nodes", "a:1,b:1", "-n", "2", "--"])
        .arg(&program)
        .args([STEPS, "20"])
        .stdout(fs::File::create(work.join("run.out")).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rank0 = work.join("omp-0.log");
    wait_until("30 steps logged", Duration::from_secs(60), || {
        lines(&rank0) >= 30
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(75), "{said}");
    assert!(lines(&rank0) < 120, "preempted before the end: {said}");

    let restart = cryo(&work, &["restart", "hybrid", "--nodes", "c:2"])
        .output()
        .unwrap();
    assert!(restart.status.success(), "{}", output_text(&restart));
    assert!(
        output_text(&restart).contains("restarting from epoch"),
        "{}",
        output_text(&restart)
    );
    for rank in 0..RANKS {
        let name = format!("omp-{rank}.log");
        let (want, got) = (
            fs::read(reference.join(&name)).unwrap(),
            fs::read(work.join(&name)).unwrap(),
        );
        assert!(
            String::from_utf8_lossy(&want).contains(&format!("threads {THREADS}\n")),
            "the reference ran {THREADS} threads per rank"
        );
        assert!(
            want == got,
            "{name} differs from the uninterrupted run's\n{}",
            output_text(&restart)
        );
    }
}
