//! End-to-end MPI tests: the heat2d example (Rust and C) under `cryo run`
//! with real MPICH, real agents on emulated nodes, `kill -9` of every
//! process, and restarts on other node sets. The final grid and the residual
//! log must be byte-identical to an uninterrupted run.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use cryo_tests::heat2d::{built, c_heat2d, checkpoint_kill_restart_elsewhere, Case, Mpi, Program};
use cryo_tests::state::wait_child;
use cryo_tests::{lines, output_text, wait_until, Heat2dFiles};

const ITERS: usize = Heat2dFiles::ITERS;

/// MPICH, or `None` after saying why these tests did not run.
fn mpiexec() -> Option<()> {
    match Mpi::Mpich.missing() {
        None => Some(()),
        Some(problem) => {
            eprintln!("SKIPPED: {problem} (install mpich); the MPI end-to-end tests did not run");
            None
        }
    }
}

#[test]
fn rust_heat2d_checkpoint_kill_restart_on_other_nodes() {
    if mpiexec().is_none() {
        return;
    }
    checkpoint_kill_restart_elsewhere(Program::compiled(built().join("heat2d"), Mpi::Mpich));
}

#[test]
fn c_heat2d_checkpoint_kill_restart_on_other_nodes() {
    if mpiexec().is_none() {
        return;
    }
    checkpoint_kill_restart_elsewhere(Program::compiled(c_heat2d(Mpi::Mpich), Mpi::Mpich));
}

#[test]
fn interval_checkpoints_then_restart_from_the_last() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(3);
    let job = case.start(
        "interval",
        "a:2,b:1",
        3,
        &["--interval", "0.4", "--keep", "2"],
        // Slow enough that three interval epochs, each drained and
        // committed before the next, fit well inside the run.
        70,
    );
    wait_until("three committed epochs", Duration::from_secs(60), || {
        case.committed("interval").last().copied().unwrap_or(0) >= 3
    });
    assert!(
        lines(&case.path("run.log")) < ITERS,
        "the job finished too early"
    );
    case.kill_everything();
    drop(job);
    let committed = case.committed("interval");
    let last = *committed.last().unwrap();
    assert!(
        committed.len() <= 3,
        "retention keeps 2 (+1 racing): {committed:?}"
    );
    let out = case.restart("interval", "z:3", &[]);
    assert!(
        out.status.success(),
        "restart failed: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains(&format!("from epoch {last}")),
        "restart should use the newest epoch {last}: {}",
        output_text(&out)
    );
    case.assert_matches_reference();
}

#[test]
fn agent_killed_mid_checkpoint_aborts_and_restart_uses_the_previous_epoch() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(4);
    // Every agent holds epoch 2's parked ranks for 3 s before copying them,
    // so node b's agent is always killed in the middle of the epoch.
    let mut job = case.start_with_env(
        "fault",
        "a:2,b:2",
        4,
        &["--park-timeout", "5"],
        60,
        &[("CRYO_FAULT", "pause-at:quiesce:2:3000")],
    );
    wait_until("iteration 20", Duration::from_secs(60), || {
        lines(&case.path("run.log")) >= 20
    });
    let out = case.checkpoint("fault");
    assert!(
        output_text(&out).contains("epoch 1 committed"),
        "{}",
        output_text(&out)
    );

    // Kill node b's agent while it holds its parked ranks for epoch 2.
    let agent_log = case.path("scratch-fault/b/agent.log");
    let mut checkpoint2 = case
        .cryo()
        .args(["checkpoint", "fault"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("agent b to hold epoch 2", Duration::from_secs(30), || {
        fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("fault.paused") && l.contains("\"epoch\":2"))
    });
    let agent_pid = agent_pid(&case, "fault", "b");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = wait_child(&mut checkpoint2, Duration::from_secs(60));
    let mut answer = String::new();
    use std::io::Read;
    checkpoint2
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut answer)
        .unwrap();
    assert!(!status.success(), "epoch 2 must not commit without node b");
    assert!(answer.contains("epoch 2 aborted"), "{answer}");
    assert_eq!(case.committed("fault"), vec![1]);

    // The job keeps running (or stops cleanly); epoch 1 still verifies.
    let status = job.wait();
    assert!(
        status.success(),
        "the job should finish: {}",
        job.log_text()
    );
    let verify = case
        .cryo()
        .args(["verify"])
        .arg(case.store())
        .arg("fault")
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", output_text(&verify));
    // Restart from epoch 1 reproduces the reference.
    let out = case.restart("fault", "a:2,b:2", &[]);
    assert!(
        out.status.success(),
        "restart failed: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("from epoch 1"),
        "{}",
        output_text(&out)
    );
    case.assert_matches_reference();
}

/// A stopped agent (SIGSTOP: its kernel still acknowledges what it is
/// sent, so TCP sees a healthy link) stops its heartbeats: the coordinator
/// counts it lost within the silence limit, not the checkpoint timeout,
/// and the epoch it held aborts at once. Let go on, it finds its link
/// closed, dials in again, and the next checkpoint commits.
#[test]
fn a_stopped_agent_is_counted_lost_and_rejoins_when_it_goes_on() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(4);
    // Only the heartbeat can end epoch 2 before five minutes.
    let mut job = case.start_with_env(
        "frozen",
        "a:2,b:2",
        4,
        &["--checkpoint-timeout", "300", "--park-timeout", "300"],
        120,
        &[("CRYO_LINK_TIMEOUT", "3")],
    );
    wait_until("iteration 10", Duration::from_secs(60), || {
        lines(&case.path("run.log")) >= 10
    });
    let out = case.checkpoint("frozen");
    assert!(
        output_text(&out).contains("epoch 1 committed"),
        "{}",
        output_text(&out)
    );
    let agent = nix::unistd::Pid::from_raw(agent_pid(&case, "frozen", "b"));
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Without the heartbeat this would wait out the checkpoint timeout.
    let out = cryo_within(&case, &["checkpoint", "frozen"], Duration::from_secs(30));
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("epoch 2 aborted: lost the agent on node \"b\""),
        "{}",
        output_text(&out)
    );
    assert!(
        job.log_text()
            .contains("lost the agent on node b (silent for"),
        "{}",
        job.log_text()
    );

    // Back in the job: the next checkpoint commits.
    wait_until(
        "a checkpoint with node b back",
        Duration::from_secs(60),
        || {
            // Refused while it dials in and states its ranks again.
            std::thread::sleep(Duration::from_millis(200));
            output_text(&case.checkpoint("frozen")).contains("committed")
        },
    );
    let status = job.wait();
    assert!(
        status.success(),
        "the job should finish: {}",
        job.log_text()
    );
    case.assert_matches_reference();
}

/// `cryo status` of a job whose `cryo run` is stopped (Ctrl-Z, SIGSTOP:
/// its kernel still accepts the connection) says so within its bounds
/// instead of waiting forever; let go on, the job answers and finishes.
#[test]
fn status_of_a_stopped_coordinator_gives_up_and_names_it() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(2);
    // Slow enough to outlast the 10 s the first status waits and the 10 s
    // the listing waits for the job that never answers.
    let mut job = case.start("stopped", "a:1,b:1", 2, &[], 400);
    wait_until("iteration 5", Duration::from_secs(60), || {
        lines(&case.path("run.log")) >= 5
    });
    let coordinator =
        nix::unistd::Pid::from_raw(i32::try_from(job.child.as_ref().unwrap().id()).unwrap());
    nix::sys::signal::kill(coordinator, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let out = cryo_within(&case, &["status", "stopped"], Duration::from_secs(40));
    nix::sys::signal::kill(coordinator, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("did not answer the handshake within 10 s: it is stopped"),
        "{}",
        output_text(&out)
    );
    let out = case.cryo().args(["status", "stopped"]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    // Listing every job: one that does not answer (a listener that never
    // accepts, as a stopped coordinator's kernel keeps) is named, and the
    // job after it is still asked.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ghost = case.store().join("ghost");
    fs::create_dir_all(ghost.join("epochs")).unwrap();
    fs::create_dir_all(ghost.join("run")).unwrap();
    fs::copy(
        case.store().join("stopped/run/token"),
        ghost.join("run/token"),
    )
    .unwrap();
    let entry = format!(
        r#"{{"addr": "{}", "pid": {}, "host": "{}"}}"#,
        silent.local_addr().unwrap(),
        std::process::id(),
        nix::unistd::gethostname().unwrap().to_string_lossy(),
    );
    fs::write(ghost.join("run/coordinator"), entry).unwrap();
    let out = cryo_within(&case, &["status"], Duration::from_secs(40));
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("job \"ghost\" did not answer")
            && text.contains("job stopped: 2 ranks")
            && text.contains("1 job(s)"),
        "{text}"
    );
    let status = job.wait();
    assert!(
        status.success(),
        "the job should finish: {}",
        job.log_text()
    );
    case.assert_matches_reference();
}

/// `cryo ARGS`'s output; fails the test if it takes longer than `timeout`.
fn cryo_within(case: &Case, args: &[&str], timeout: Duration) -> std::process::Output {
    let mut child = case
        .cryo()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_child(&mut child, timeout);
    child.wait_with_output().unwrap()
}

fn agent_pid(case: &Case, job: &str, node: &str) -> i32 {
    let socket = case
        .path(&format!("scratch-{job}/{node}/agent.sock"))
        .display()
        .to_string();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("cryo-agent") && cmdline.contains(&socket) {
            return pid;
        }
    }
    panic!("no agent for node {node}");
}

#[test]
fn signals_status_and_preempt_then_restart() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(2);
    let mut job = case.start("signals", "a:1,b:1", 2, &[], 50);
    wait_until("iteration 15", Duration::from_secs(60), || {
        lines(&case.path("run.log")) >= 15
    });
    // SIGUSR1 to `cryo run`: checkpoint and continue.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(job.child.as_ref().unwrap().id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    wait_until("epoch 1 from SIGUSR1", Duration::from_secs(60), || {
        case.committed("signals") == vec![1]
    });
    // Its manifest is on disk before the coordinator hears that the commit
    // (the chunk index after it too) is over: a `cryo preempt` before then
    // stops after epoch 1 instead of taking another.
    wait_until("epoch 1 over", Duration::from_secs(60), || {
        let status = case.cryo().args(["status", "signals"]).output().unwrap();
        output_text(&status).contains("no checkpoint in progress")
    });
    let status = case.cryo().args(["status", "signals"]).output().unwrap();
    let shown = output_text(&status);
    assert!(status.status.success(), "{shown}");
    assert!(shown.contains("job signals: 2 ranks"), "{shown}");
    assert!(shown.contains("last committed epoch: 1"), "{shown}");
    assert!(
        shown.contains("node a") && shown.contains("agent connected"),
        "{shown}"
    );

    // A wrong token is refused.
    let token_file = case.store().join("signals/run/token");
    let good = fs::read(&token_file).unwrap();
    fs::write(&token_file, "0".repeat(64)).unwrap();
    let refused = case
        .cryo()
        .args(["checkpoint", "signals"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("wrong or missing job token"),
        "{}",
        output_text(&refused)
    );
    fs::write(&token_file, good).unwrap();

    // cryo preempt: checkpoint, then stop with exit code 75.
    let out = case.cryo().args(["preempt", "signals"]).output().unwrap();
    assert!(
        output_text(&out).contains("epoch 2 committed")
            && output_text(&out).contains(
                "stopped; it is not requeued (its cryo run has no --requeue): \
                 `cryo restart signals` resumes it"
            ),
        "{}",
        output_text(&out)
    );
    let status = job.wait();
    assert_eq!(status.code(), Some(75), "{}", job.log_text());
    assert!(lines(&case.path("run.log")) < ITERS);

    let out = case.restart("signals", "c:2", &[]);
    assert!(
        out.status.success(),
        "restart failed: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("from epoch 2"),
        "{}",
        output_text(&out)
    );
    case.assert_matches_reference();

    // The world size is fixed.
    let out = case.restart("signals", "c:2", &["-n", "3"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("keeps the world size"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn sigterm_preempts_and_a_corrupt_newest_epoch_falls_back() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("heat2d"));
    case.reference(2);
    let mut job = case.start("term", "a:2", 2, &["--interval", "0.3"], 50);
    wait_until("two committed epochs", Duration::from_secs(60), || {
        case.committed("term").len() >= 2
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(job.child.as_ref().unwrap().id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = job.wait();
    assert!(
        matches!(status.code(), Some(75 | 76)),
        "{status:?}: {}",
        job.log_text()
    );
    let committed = case.committed("term");
    let newest = *committed.last().unwrap();
    // Corrupt a chunk used only by the newest epoch's grid.
    let store = cryo_core::Store::open(case.store()).unwrap();
    let job_store = store.job("term").unwrap();
    let newest_manifest = job_store.load_manifest(newest).unwrap();
    let older = job_store
        .load_manifest(committed[committed.len() - 2])
        .unwrap();
    let older_hashes: std::collections::HashSet<_> =
        older.chunk_refs().map(|(_, _, c)| c.hash).collect();
    let victim = newest_manifest
        .chunk_refs()
        .map(|(_, _, c)| *c)
        .find(|c| !older_hashes.contains(&c.hash))
        .expect("the newest epoch has a chunk of its own");
    cryo_tests::damage_stored_chunk(&job_store, &victim, |len| vec![len - 1], 0xff);

    let out = case.restart("term", "b:2", &[]);
    let said = output_text(&out);
    assert!(out.status.success(), "restart failed: {said}");
    assert!(
        said.contains(&format!("epoch {newest} fails verification")),
        "{said}"
    );
    assert!(said.contains("falling back"), "{said}");
    case.assert_matches_reference();
}

/// `quiesce-bench` (1 ms iterations, an allreduce after each safe point)
/// under `cryo run` on two nodes of one rank each, with `env` for the ranks;
/// returns once its short measurement is done and it iterates for 20 s.
fn start_quiesce_bench(
    case: &Case,
    job: &str,
    cryo: &[&str],
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Child, PathBuf) {
    let mut args: Vec<String> = [
        "--iters",
        "10",
        "--run-secs",
        "20",
        "--state-bytes",
        "1048576",
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut running = case.spawn(job, "a:1,b:1", 2, cryo, &args, env);
    let out = case.path(&format!("{job}.stdout"));
    // Rank 0 prints its figures when the measurement ends and the long run
    // (where `--in-flight` applies) begins.
    wait_until("the measurement to end", Duration::from_secs(60), || {
        fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("safe point")
    });
    // Let the ranks measure their pace before asking.
    std::thread::sleep(Duration::from_millis(300));
    (running.child.take().unwrap(), running.log.clone())
}

/// Short iterations (1 ms) give the ranks twenty safe points of slack in an
/// agreement: every rank must still derive the same target, or the ranks
/// would park at different safe points and the checkpoint would hang or
/// fail. Two checkpoints of a job on two nodes must both commit.
#[test]
fn short_iterations_keep_every_rank_on_the_same_safe_point() {
    if mpiexec().is_none() {
        return;
    }
    let case = Case::mpich(built().join("quiesce-bench"));
    let (mut child, log) = start_quiesce_bench(&case, "short", &[], &[], &[]);
    for epoch in 1..=2 {
        let out = case.checkpoint("short");
        assert!(
            out.status.success() && output_text(&out).contains(&format!("epoch {epoch} committed")),
            "checkpoint {epoch}: {}\n{}",
            output_text(&out),
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `quiesce-bench` with `env` and `extra`, asks for a checkpoint, and
/// asserts that epoch 1 is refused with `why` in the answer, nothing is
/// committed, and the job computes on.
fn assert_refused(job: &str, env: &[(&str, &str)], extra: &[&str], why: &str) {
    assert_aborted(job, &[], env, extra, why);
}

/// [`assert_refused`] with `cryo` arguments for `cryo run`.
fn assert_aborted(job: &str, cryo: &[&str], env: &[(&str, &str)], extra: &[&str], why: &str) {
    let case = Case::mpich(built().join("quiesce-bench"));
    let (mut child, log) = start_quiesce_bench(&case, job, cryo, env, extra);
    let out = case.checkpoint(job);
    let said = output_text(&out);
    assert!(!out.status.success(), "must not commit: {said}");
    assert!(
        said.contains("epoch 1 aborted") && said.contains(why),
        "{said}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(case.committed(job).is_empty());
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job must compute on"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A message left in flight across the safe point (rank 0 sends before it,
/// rank 1 receives after it) would be lost in a checkpoint: the epoch must
/// be refused, naming the sender and tag, and the job computes on.
#[test]
fn a_message_in_flight_at_the_safe_point_refuses_the_checkpoint() {
    if mpiexec().is_none() {
        return;
    }
    assert_refused(
        "inflight",
        &[],
        &["--in-flight"],
        "a message from rank 0 (tag 99) was still in flight",
    );
}

/// A rank that never reaches a safe point (rank 1 here) holds the other at
/// its own, waiting for an agreement that cannot complete: after the park
/// timeout the epoch is aborted naming rank 1, not the rank it held, and
/// the job computes on.
#[test]
fn a_rank_that_never_reaches_a_safe_point_is_named_not_the_rank_it_holds() {
    if mpiexec().is_none() {
        return;
    }
    assert_aborted(
        "skipper",
        &["--park-timeout", "3"],
        &[],
        &["--skip-safe-points-on", "1"],
        "node b: rank 1 did not reach a safe point within 3000 ms",
    );
}

/// With no slack (`CRYO_QUIESCE_SLACK=0`) a rank's cap is the safe point
/// where it joins, and the agreement completes only safe points later: some
/// rank always passes the target. The ranks must notice, retry, and after
/// the last attempt refuse the epoch with a clear reason, not hang or park
/// at different safe points; the job computes on.
#[test]
fn ranks_that_pass_the_target_retry_then_refuse() {
    if mpiexec().is_none() {
        return;
    }
    assert_refused(
        "noslack",
        &[("CRYO_QUIESCE_SLACK", "0")],
        &[],
        "did not all stop at the agreed safe point in 3 attempts",
    );
}
