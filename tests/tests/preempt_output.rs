//! A preempted job's own output: `cryo run` stops the launcher once the
//! checkpoint is durable without the launcher writing about its ranks'
//! deaths into the job's stdout (MPICH Hydra's "BAD TERMINATION" banner),
//! and the restart's lines carry on from the checkpoint: together they
//! hold every line of an uninterrupted run, each once, and nothing else.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cryo_tests::heat2d::{compile_mpich_program, cryo_in};
use cryo_tests::state::{have_mpi, wait_child};
use cryo_tests::{lines, output_text, wait_until};

const RANKS: u32 = 4;
/// Steps of 20 ms: the job must still be computing when a stop held
/// behind epoch 1's 3 s drain comes (after 50 steps), even where a step
/// takes no longer than its sleep.
const STEPS: u64 = 400;

/// Every line an uninterrupted run prints: each rank's running sum of the
/// allreduce of `step + rank` over the steps so far.
fn expected() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for rank in 0..RANKS {
        for step in 0..STEPS {
            let acc = (step + 1) * (2 * step + 6);
            all.insert(format!("rank {rank} step {step} acc {acc}.0"));
        }
    }
    all
}

fn cryo(dir: &Path, out: &Path, args: &[&str]) -> Command {
    let mut cmd = cryo_in(dir);
    cmd.args(args).stdout(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap(),
    );
    cmd
}

#[test]
fn a_preempted_job_leaves_only_its_own_lines_and_the_restart_continues_them() {
    preempt_and_restart(Stop::TermToCryoRun);
}

/// A stop asked for while an ordinary checkpoint drains, its ranks
/// computing on: the job takes one more epoch, parked until it stops, so
/// the steps computed during the drain are neither lost nor printed twice.
#[test]
fn a_preemption_during_a_checkpoint_keeps_the_steps_computed_meanwhile() {
    preempt_and_restart(Stop::DuringACheckpoint);
}

/// A SIGTERM to one rank (what `scancel`, or a preemption Slurm gives no
/// warning of, sends to every task): the rank computes on to its next
/// safe point instead of dying, and the job is checkpointed and stopped
/// as for a SIGTERM to `cryo run`. Left to its default action the rank
/// died, and the job with it, without a checkpoint.
#[test]
fn a_sigterm_to_a_rank_checkpoints_and_stops_the_job() {
    preempt_and_restart(Stop::TermToARank);
}

/// What stops the job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `SIGTERM` to `cryo run`.
    TermToCryoRun,
    /// `SIGTERM` to `cryo run` while an ordinary checkpoint drains.
    DuringACheckpoint,
    /// `SIGTERM` to one rank.
    TermToARank,
}

fn preempt_and_restart(stop: Stop) {
    let during_a_checkpoint = stop == Stop::DuringACheckpoint;
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-preempt-output-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("prints_each_step");
    compile_mpich_program("tests/programs/prints_each_step.c", &program);
    let out = dir.path().join("job.stdout");
    let log = dir.path().join("run.log");

    let mut run = cryo(dir.path(), &out, &["run", "--job", "steps"]);
    run.args(["--nodes", "a:2,b:2", "-n", &RANKS.to_string()])
        .arg("--")
        .arg(&program)
        .args([&STEPS.to_string(), "20"])
        .stderr(fs::File::create(&log).unwrap());
    if during_a_checkpoint {
        // Epoch 1's drain is held 3 s while its ranks compute on.
        run.env("CRYO_FAULT", "pause-at:drain:1:3000");
    }
    let mut child = run.spawn().unwrap();
    wait_until("40 steps printed", Duration::from_secs(60), || {
        lines(&out) >= 40 * RANKS as usize
    });
    let mut checkpoint = during_a_checkpoint.then(|| {
        let checkpoint = cryo(
            dir.path(),
            &dir.path().join("checkpoint.out"),
            &["checkpoint", "steps"],
        )
        .spawn()
        .unwrap();
        wait_until("epoch 1's drain held", Duration::from_secs(30), || {
            fs::read_to_string(&log)
                .is_ok_and(|said| said.contains("checkpoint of epoch 1 requested"))
                && lines(&out) >= 50 * RANKS as usize
        });
        checkpoint
    });
    let pid = if stop == Stop::TermToARank {
        // The ranks run the program itself; mpiexec only names it.
        let program = program.as_os_str().as_encoded_bytes().to_vec();
        let mut ranks = cryo_tests::pids_where(|cmdline| cmdline.starts_with(&program));
        ranks.sort_unstable();
        assert_eq!(ranks.len(), RANKS as usize, "ranks: {ranks:?}");
        ranks[0]
    } else {
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap())
    };
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(75), "{said}");
    if stop == Stop::TermToARank {
        assert!(
            said.contains("SIGTERM to rank") && said.contains("taken as a SIGTERM to cryo run"),
            "{said}"
        );
    }
    // A preemption whose checkpoint committed went well: the agents'
    // sockets and logs go, as after a run that finished.
    let scratch = std::env::temp_dir()
        .join(format!("cryo-{}", nix::unistd::geteuid()))
        .join(format!("run-steps-{}", child.id()));
    assert!(
        !scratch.exists(),
        "{} was left behind by a clean preemption",
        scratch.display()
    );
    if let Some(checkpoint) = checkpoint.as_mut() {
        wait_child(checkpoint, Duration::from_secs(60));
        assert!(
            said.contains("epoch 1 committed")
                && said.contains("preempted after committing epoch 2"),
            "{said}"
        );
    }

    let expected = expected();
    let printed = fs::read_to_string(&out).unwrap();
    let foreign: Vec<&str> = printed
        .lines()
        .filter(|line| !expected.contains(*line))
        .collect();
    assert!(
        foreign.is_empty(),
        "the preempted run's stdout holds lines the program never prints: {foreign:?}\n{said}"
    );
    assert!(printed.lines().count() < expected.len(), "{said}");

    let restart = cryo(dir.path(), &out, &["restart", "steps"])
        .args(["--nodes", "c:4"])
        .output()
        .unwrap();
    assert!(restart.status.success(), "{}", output_text(&restart));
    let printed = fs::read_to_string(&out).unwrap();
    let seen: BTreeSet<String> = printed.lines().map(str::to_owned).collect();
    let missing: Vec<&String> = expected.difference(&seen).take(5).collect();
    let foreign: Vec<&String> = seen.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && foreign.is_empty(),
        "after the restart: missing {missing:?}, foreign {foreign:?}\n{}",
        output_text(&restart)
    );
    // And each once: the preempted ranks stayed parked from their
    // checkpoint to the stop, so no step after it was printed twice.
    let mut twice: Vec<&str> = printed.lines().collect();
    twice.sort_unstable();
    let twice: Vec<&str> = twice
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .take(5)
        .collect();
    assert!(
        twice.is_empty(),
        "lines printed twice: {twice:?}\n{said}\n{}",
        output_text(&restart)
    );
}

/// `cryo preempt` of a job that cannot be checkpointed (its program never
/// calls `cryo_init`) says that the job is stopped all the same, without
/// a new checkpoint, rather than only that the checkpoint was refused.
#[test]
fn a_preemption_without_a_checkpoint_says_the_job_is_stopped() {
    if !have_mpi() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-preempt-plain-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("plain_mpi");
    compile_mpich_program("tests/programs/plain_mpi.c", &program);
    let log = dir.path().join("run.log");
    let mut run = cryo(
        dir.path(),
        &dir.path().join("run.out"),
        &["run", "--job", "plain"],
    );
    run.args(["-n", "2", "--"])
        .arg(&program)
        .arg("60")
        .stderr(fs::File::create(&log).unwrap());
    let mut child = run.spawn().unwrap();
    let cryo_here = |args: &[&str]| cryo_in(dir.path()).args(args).output().unwrap();
    wait_until("cryo status answers", Duration::from_secs(60), || {
        cryo_here(&["status", "plain"]).status.success()
    });
    let preempt = cryo_here(&["preempt", "plain"]);
    let said = output_text(&preempt);
    assert!(!preempt.status.success(), "{said}");
    assert!(
        said.contains("have registered")
            && said.contains("the job is stopped without a new checkpoint"),
        "{said}"
    );
    let status = wait_child(&mut child, Duration::from_secs(60));
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{log_text}");
    // Hydra's proxy and its ranks run in sessions of their own: stopping
    // the launcher's process group alone left them blocked in MPI, for
    // good, reparented to init.
    let program_bytes = program.as_os_str().as_encoded_bytes().to_vec();
    let left = cryo_tests::pids_where(|cmdline| {
        cmdline
            .windows(program_bytes.len())
            .any(|w| w == program_bytes.as_slice())
    });
    cryo_tests::kill_every_process_mentioning(&dir.path().display().to_string());
    assert!(
        left.is_empty(),
        "ranks {left:?} outlived the cryo run that stopped their job:\n{log_text}"
    );
}
