//! Slurm across namespace nodes (`cryo_tests::netns::slurm`): slurmctld in
//! the head, one slurmd per node with its own name and address, cryo's
//! SPANK plugin in every step. `sbatch -N 2` runs heat2d under `cryo run`
//! on two nodes; an administrator drains them and preempts the job
//! (`scancel --signal=USR1 --batch`, what Slurm sends before a preemption
//! or the time limit): it checkpoints, requeues itself, resumes on the two
//! other nodes, and finishes byte-identical to a run without cryo.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::rc::Rc;
use std::time::{Duration, Instant};

use cryo_tests::heat2d::{built, spank_plugin, Heat2dFiles};
use cryo_tests::lines;
use cryo_tests::netns::slurm::SlurmCluster;
use cryo_tests::netns::{self, Cluster};
use cryo_tests::slurm_jobs::{submit_heat2d, wait_done};

#[test]
fn a_preempted_two_node_job_resumes_on_two_other_nodes() {
    if !netns::available() {
        return;
    }
    let cluster = Rc::new(Cluster::up(&["n0", "n1", "n2", "n3"]));
    let slurm = SlurmCluster::up(&cluster, &["n0", "n1", "n2", "n3"], Some(&spank_plugin()));
    let heat2d = built().join("heat2d");
    let files = Heat2dFiles::new("cryo-nslurm-job-", &heat2d);
    files.reference(&heat2d, 4);
    let job_out = files.path("job.out");
    let mut sbatch = slurm.cmd("sbatch");
    // See cryo_tests::netns::Site: MPICH over UCX's TCP transport can hang
    // in MPI_Finalize.
    sbatch.env("CRYO_FINALIZE_TIMEOUT", "10");
    let id = submit_heat2d(
        sbatch,
        &files,
        &["--nodes=2", "--ntasks=4", "--overcommit"],
        300,
    );
    let start = Instant::now();
    while lines(&files.path("run.log")) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the job did not reach iteration 20; its output:\n{}\n{}",
            fs::read_to_string(&job_out).unwrap_or_default(),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = slurm.job_field(&id, "NodeList");
    assert_eq!(first, "n[0-1]", "Slurm placed the job on {first}");
    // The administrator drains the job's nodes and preempts it.
    slurm.run(
        "scontrol",
        &[
            "update",
            "NodeName=n[0-1]",
            "State=DRAIN",
            "Reason=cryo-test",
        ],
    );
    slurm.run("scancel", &["--signal=USR1", "--batch", &id]);
    let restarts = wait_done(&slurm, &id, Duration::from_secs(240), &job_out);
    let said = fs::read_to_string(&job_out).unwrap_or_default();
    assert!(restarts >= 1, "the job was not requeued:\n{said}");
    let second = slurm.job_field(&id, "NodeList");
    assert_eq!(second, "n[2-3]", "the resumed job ran on {second}:\n{said}");
    assert!(
        said.contains("start 2 on n[2-3]") && said.contains("resuming"),
        "{said}"
    );
    files.assert_matches_reference("run");
}
