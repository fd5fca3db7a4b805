//! The C heat2d with Open MPI: compiled with `mpicc.openmpi` against the
//! `libcryo_rank_openmpi` flavour (built by `scripts/build-openmpi.sh`),
//! run under `cryo run`, which picks `mpirun.openmpi` from the program's
//! libraries (`mpiexec` is MPICH's here): the same checkpoint →
//! `kill -9` → restart-on-other-nodes test as with MPICH, byte-identical.
//! The state suite's `all` program (every way of holding files, MPI-IO
//! through Open MPI's own implementation included) survives the same. A
//! program linked with the wrong flavour gets a clear error, and so does a
//! `--launcher` of the other MPI.
//!
//! Without Open MPI these tests fail, loudly: set `CRYO_SKIP_OPENMPI=1` to
//! skip them on a machine that cannot run it (they then print SKIPPED).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use cryo_tests::heat2d::{
    built, c_heat2d, checkpoint_kill_restart_elsewhere, compile_c_heat2d, openmpi_available,
    Heat2dFiles, Mpi, Program,
};
use cryo_tests::output_text;
use std::process::Command;

#[test]
fn c_heat2d_with_open_mpi_checkpoint_kill_restart_on_other_nodes() {
    if !openmpi_available() {
        return;
    }
    let program = Program::compiled(c_heat2d(Mpi::OpenMpi), Mpi::OpenMpi);
    let case = checkpoint_kill_restart_elsewhere(program);
    // Open MPI's run computes what MPICH's does.
    case.files.run_without_cryo(
        &Program::compiled(c_heat2d(Mpi::Mpich), Mpi::Mpich),
        4,
        "mpich",
    );
    case.files.assert_runs_match("mpich", "run");
}

/// Every shape of the state suite in one Open MPI job of 4 ranks on two
/// nodes, restarted on four: byte-identical to an uninterrupted Open MPI run.
#[test]
fn state_all_with_open_mpi_survives_kill_and_restart() {
    if !openmpi_available() {
        return;
    }
    let survived = cryo_tests::state::survives_on(
        cryo_tests::state::Case::with_mpi("all", Mpi::OpenMpi),
        "all",
        cryo_tests::state::ALL_ITERS,
        4,
        ("a:2,b:2", "c:1,d:1,e:1,f:1"),
        [&[], &[]],
    );
    for (what, said) in [("run", &survived.run_log), ("restart", &survived.restart)] {
        assert!(
            said.contains("mpirun.openmpi"),
            "cryo {what} did not launch with Open MPI:\n{said}"
        );
    }
}

/// An Open MPI program linked with the MPICH flavour must not pass its
/// pointer handle to MPICH code: `cryo_init_mpi` refuses it, naming the
/// library to link.
#[test]
fn an_open_mpi_program_linked_with_the_mpich_flavour_is_told_which_to_link() {
    if !openmpi_available() {
        return;
    }
    let bins = built();
    let files = Heat2dFiles::new("cryo-wrong-flavour-", &bins.join("heat2d"));
    let exe = files.path("heat2d-c-wrong");
    let compiled = compile_c_heat2d(Mpi::OpenMpi, &bins, Mpi::Mpich.rank_lib(), &exe);
    assert!(compiled.status.success(), "{}", output_text(&compiled));
    let out = Mpi::OpenMpi
        .launch(1)
        .env_remove("CRYO_AGENT_SOCKET")
        .arg(&exe)
        .args(files.app_args("wrong", 0))
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(!out.status.success(), "must refuse: {said}");
    assert!(
        said.contains(
            "cryo_init_mpi: this program's MPI_Comm is 8 bytes (openmpi handles), but this \
             libcryo_rank was built for mpich (4-byte handles): link libcryo_rank_openmpi.so"
        ),
        "{said}"
    );
}

/// `cryo run -n 2 --launcher mpiexec` (MPICH's Hydra) of the Open MPI
/// heat2d, behind `wrapper` (words before the program): whether it
/// succeeded, what it said, and the run's files.
fn run_with_mpichs_launcher(tag: &str, wrapper: &[&str]) -> (bool, String, Heat2dFiles) {
    let bins = built();
    let files = Heat2dFiles::new(&format!("cryo-{tag}-"), &bins.join("heat2d"));
    let out = Command::new(bins.join("cryo"))
        .env("CRYO_STORE", files.path("store"))
        .args(["run", "--job", tag, "-n", "2"])
        .args(["--launcher", Mpi::Mpich.launcher(), "--"])
        .args(wrapper)
        .arg(c_heat2d(Mpi::OpenMpi))
        .args(files.app_args(tag, 0))
        .output()
        .unwrap();
    (out.status.success(), output_text(&out), files)
}

/// `--launcher` naming MPICH's Hydra for a program built with Open MPI
/// would start every rank alone in a world of one: `cryo run` refuses it
/// before starting anything, naming the library and the launcher to pass.
#[test]
fn a_launcher_of_the_other_mpi_is_refused_naming_the_programs_library() {
    if !openmpi_available() {
        return;
    }
    let (ok, said, files) = run_with_mpichs_launcher("other", &[]);
    assert!(!ok, "must refuse: {said}");
    assert!(
        said.contains("which cannot start this program: it is built with Open MPI")
            && said.contains("links libmpi.so.40")
            && said.contains("(e.g. mpirun.openmpi)"),
        "{said}"
    );
    assert!(
        !files.path("other.log").exists(),
        "no rank may have started: {said}"
    );
}

/// A program whose MPI cannot be told (here behind a shell) and that the
/// other MPI's launcher starts comes up as ranks alone in worlds of one:
/// each says so at `cryo_init_mpi`, pointing at the launcher.
#[test]
fn ranks_started_by_the_other_mpis_launcher_say_they_are_alone() {
    if !openmpi_available() {
        return;
    }
    let (ok, said, _files) = run_with_mpichs_launcher("alone", &["sh", "-c", "exec \"$0\" \"$@\""]);
    assert!(!ok, "must fail: {said}");
    assert!(
        said.contains(
            "of the communicator of size 1: was the program started by the launcher of another MPI"
        ),
        "{said}"
    );
}

/// A file open through MPI-IO in an Open MPI job that is preempted: OMPIO
/// maps each such file's shared file pointer from the job's session
/// directory, which `mpirun` removes when it ends cleanly (as it does
/// after `cryo preempt`, where a `kill -9` would leave it). That mapping is
/// the library's, left out of the checkpoint, so the restart on other nodes
/// does not look for it and ends byte-identical.
#[test]
fn mpiio_with_open_mpi_survives_a_preemption() {
    if !openmpi_available() {
        return;
    }
    use cryo_tests::state::{job_name, steps, Case, ITERS};
    let case = Case::with_mpi("mpiio", Mpi::OpenMpi);
    case.reference(2, ITERS);
    let job = job_name("mpiio");
    let mut run = case.start(&job, "a:1,b:1", 2, ITERS);
    run.wait_checkpoint_step();
    let preempt = case.cryo().args(["preempt", &job]).output().unwrap();
    assert!(
        preempt.status.success(),
        "cryo preempt failed:\n{}\n{}",
        output_text(&preempt),
        run.describe()
    );
    let status = run.wait_end(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "{}", run.describe());
    // A preemption's ranks stay parked at the safe point of the
    // checkpoint until they are stopped: the last step printed is the one
    // captured.
    let captured = *steps(&run.stdout_text())
        .last()
        .unwrap_or_else(|| panic!("no step printed:\n{}", run.describe()));
    case.assert_restart_matches_reference(&job, "c:2", 1, captured, captured, ITERS);
}
