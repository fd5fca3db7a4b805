//! Network faults made of real packets, on a cluster of network namespaces
//! (`cryo_tests::netns`): a partition between the coordinator's host and a
//! node during each phase of an epoch, packet loss and delay during
//! checkpoints, a partition longer than the link timeout (after which the
//! agent rejoins, and a preemption or a periodic checkpoint meanwhile
//! waits for it), and a whole node lost mid-epoch.
//!
//! In each case the epoch aborts or commits whole, every committed epoch
//! verifies, the job goes on to a result byte-identical to a run without
//! cryo (or, when it cannot, restarts exactly from the newest committed
//! epoch), and nothing waits past the documented deadlines (the checkpoint
//! timeout, the link timeout).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::process::{Child, Stdio};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryo_tests::heat2d::{c_heat2d, Case, Job, Mpi};
use cryo_tests::netns::{self, Cluster, Site, HEAD};
use cryo_tests::{lines, output_text, state::wait_child, wait_until};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The job's checkpoint timeout in these tests (`--checkpoint-timeout`).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a partition lasts: past the checkpoint timeout, within the
/// link timeout (so TCP delivers what it held once it heals).
const PARTITION: Duration = Duration::from_secs(6);

struct Setup {
    _guard: std::sync::MutexGuard<'static, ()>,
    case: Case,
    cluster: Rc<Cluster>,
}

fn setup() -> Option<Setup> {
    if !netns::available() {
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cluster = Rc::new(Cluster::up(&["n0", "n1", "n2"]));
    let mut case = Case::mpich(c_heat2d(Mpi::Mpich));
    case.site = Site::Cluster(Rc::clone(&cluster));
    case.reference(4);
    Some(Setup {
        _guard: guard,
        case,
        cluster,
    })
}

impl Setup {
    /// heat2d on n0 and n1 under `cryo run` with `env`, checkpointed once
    /// (epoch 1 committed) at about iteration 20.
    fn start(&self, env: &[(&str, &str)]) -> Job {
        self.start_stepping(60, env)
    }

    /// [`Setup::start`] with steps of `step_ms`.
    fn start_stepping(&self, step_ms: u32, env: &[(&str, &str)]) -> Job {
        let timeout = CHECKPOINT_TIMEOUT.as_secs().to_string();
        let job = self.case.start_with_env(
            "heat",
            "n0:2,n1:2",
            4,
            &["--checkpoint-timeout", &timeout],
            step_ms,
            env,
        );
        wait_until("iteration 20", Duration::from_secs(90), || {
            lines(&self.case.path("run.log")) >= 20
        });
        let out = self.case.checkpoint("heat");
        assert!(
            out.status.success() && output_text(&out).contains("epoch 1 committed"),
            "the first checkpoint failed: {}\n{}",
            output_text(&out),
            job.log_text()
        );
        job
    }

    /// `cryo checkpoint` in the background.
    fn checkpoint_in_background(&self) -> Child {
        self.case
            .cryo()
            .args(["checkpoint", "heat"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// What `cryo run` and its agents logged so far.
    fn logs(&self, job: &Job) -> String {
        let agents =
            fs::read_to_string(self.case.path("scratch-heat/agents-step.log")).unwrap_or_default();
        format!("{}\n--- agents ---\n{agents}", job.log_text())
    }

    /// Every committed epoch verifies, and epoch 1 is among them; returns
    /// them.
    fn assert_committed_verify(&self) -> Vec<u64> {
        let committed = self.case.committed("heat");
        assert!(committed.contains(&1), "epoch 1 is gone: {committed:?}");
        let out = self
            .case
            .cryo()
            .arg("verify")
            .arg(self.case.store())
            .arg("heat")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "a committed epoch does not verify: {}",
            output_text(&out)
        );
        committed
    }

    /// `cryo restart` from the newest committed epoch, on n2 alone, ends
    /// byte-identical to the reference.
    fn assert_restarts_exactly(&self, committed: &[u64]) {
        let newest = committed.iter().max().unwrap();
        let out = self.case.restart("heat", "n2", &[]);
        let said = output_text(&out);
        assert!(out.status.success(), "restart failed: {said}");
        assert!(said.contains(&format!("from epoch {newest}")), "{said}");
        self.case.assert_matches_reference();
    }
}

/// Waits (up to 2 min) for `cryo run` to end; panics with the logs and the
/// processes left on each node if it does not.
fn wait_job(setup: &Setup, job: &mut Job) -> std::process::ExitStatus {
    let child = job.child.as_mut().unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut left = String::new();
    for node in setup.cluster.nodes() {
        for pid in setup.cluster.pids(&node.name) {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            left.push_str(&format!(
                "{}: {pid} {}\n",
                node.name,
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    panic!(
        "cryo run did not end within 2 min; processes:\n{left}\nlogs:\n{}",
        setup.logs(job)
    );
}

/// Waits until `cryo run` or an agent holds at the injected fault.
fn wait_paused(setup: &Setup, job: &Job) {
    wait_until("fault.paused in the logs", Duration::from_secs(60), || {
        setup.logs(job).contains("fault.paused")
    });
}

/// Epoch 2 is held at `phase` (by the agents, or by the coordinator for
/// `commit`); meanwhile every packet between the head and n1 is dropped for
/// [`PARTITION`]. The epoch aborts within the checkpoint timeout (or
/// commits whole, for `commit`), the job finishes byte-identical, and a
/// restart from the newest committed epoch is exact.
fn partition_during(phase: &str) {
    let Some(setup) = setup() else {
        return;
    };
    let fault = format!("pause-at:{phase}:2:2500");
    let mut job = setup.start(&[("CRYO_FAULT", &fault)]);
    let mut checkpoint = setup.checkpoint_in_background();
    wait_paused(&setup, &job);
    let cut = Instant::now();
    setup.cluster.partition("n1", HEAD);
    let out = {
        let status = wait_child(&mut checkpoint, Duration::from_secs(60));
        let out = checkpoint.wait_with_output().unwrap();
        (status, output_text(&out))
    };
    let answered = cut.elapsed();
    let remaining = PARTITION.saturating_sub(cut.elapsed());
    std::thread::sleep(remaining);
    setup.cluster.heal("n1");
    // The checkpoint timeout, plus the 2.5 s hold and the time to say so.
    assert!(
        answered < CHECKPOINT_TIMEOUT + Duration::from_secs(8),
        "cryo checkpoint answered only after {answered:?}: {}",
        out.1
    );
    let status = wait_job(&setup, &mut job);
    let logs = setup.logs(&job);
    assert!(status.success(), "cryo run failed ({status}):\n{logs}");
    setup.case.assert_matches_reference();
    let committed = setup.assert_committed_verify();
    if committed.contains(&2) {
        assert!(out.0.success(), "epoch 2 committed, but: {}", out.1);
    } else {
        assert!(
            !out.0.success() && out.1.contains("abort"),
            "epoch 2 not committed, but cryo checkpoint said: {}\n{logs}",
            out.1
        );
    }
    if phase != "commit" {
        assert!(
            !committed.contains(&2),
            "epoch 2 committed although n1 could not report during {phase}: {committed:?}"
        );
    }
    setup.assert_restarts_exactly(&committed);
}

#[test]
fn a_partition_during_quiesce_aborts_the_epoch_and_the_job_goes_on() {
    partition_during("quiesce");
}

#[test]
fn a_partition_during_copy_aborts_the_epoch_and_the_job_goes_on() {
    partition_during("copy");
}

#[test]
fn a_partition_during_drain_aborts_the_epoch_and_the_job_goes_on() {
    partition_during("drain");
}

#[test]
fn a_partition_during_commit_leaves_the_epoch_whole_and_the_job_goes_on() {
    partition_during("commit");
}

/// 5% of the packets n0 and n1 send are lost and the rest delayed (tc netem,
/// or nftables and tbf where the kernel has no netem): both checkpoints
/// commit anyway, the job finishes byte-identical, and restarts exactly.
#[test]
fn checkpoints_commit_through_packet_loss_and_delay() {
    let Some(setup) = setup() else {
        return;
    };
    let mut how = Vec::new();
    for node in ["n0", "n1"] {
        how.push(setup.cluster.impair(node, 5, Duration::from_millis(40)));
    }
    eprintln!("impaired with {how:?}");
    let timeout = "60";
    let mut job = setup.case.start_with_env(
        "heat",
        "n0:2,n1:2",
        4,
        &["--checkpoint-timeout", timeout],
        60,
        &[],
    );
    for (at, epoch) in [(20, 1), (50, 2)] {
        wait_until("the next iteration", Duration::from_secs(120), || {
            lines(&setup.case.path("run.log")) >= at
        });
        let out = setup.case.checkpoint("heat");
        assert!(
            out.status.success() && output_text(&out).contains(&format!("epoch {epoch} committed")),
            "checkpoint {epoch} through a lossy network failed: {}\n{}",
            output_text(&out),
            setup.logs(&job)
        );
    }
    for node in ["n0", "n1"] {
        setup.cluster.unimpair(node);
    }
    let status = wait_job(&setup, &mut job);
    assert!(status.success(), "cryo run failed: {}", setup.logs(&job));
    setup.case.assert_matches_reference();
    let committed = setup.assert_committed_verify();
    assert_eq!(committed, [1, 2]);
    assert!(how.iter().all(|h| *h == how[0]));
    setup.assert_restarts_exactly(&committed);
}

/// A partition longer than the link timeout (`CRYO_LINK_TIMEOUT=4`) between
/// checkpoints: the coordinator counts n1's agent lost, and n1's agent its
/// coordinator, within the timeout (not TCP's quarter of an hour); a
/// checkpoint during it is refused with the reason instead of hanging.
/// Once the network heals, n1's agent dials in again and states its ranks:
/// the next checkpoint commits, and the job finishes byte-identical with
/// every rank's end seen. (The job steps 400 ms, 40 s in all, so that it is
/// still running when the agent is back.)
#[test]
fn after_a_partition_longer_than_the_link_timeout_the_agent_rejoins() {
    let Some(setup) = setup() else {
        return;
    };
    let mut job = setup.start_stepping(400, &[("CRYO_LINK_TIMEOUT", "4")]);
    let cut = cut_until_lost(&setup, &job);
    let out = setup.case.checkpoint("heat");
    assert!(
        !out.status.success() && output_text(&out).contains("not connected"),
        "a checkpoint without n1's agent cannot commit: {}",
        output_text(&out)
    );
    heal_after_lost(&setup, &job, cut);
    let out = setup.case.checkpoint("heat");
    assert!(
        out.status.success() && output_text(&out).contains("epoch 2 committed"),
        "the checkpoint after the agent rejoined failed: {}\n{}",
        output_text(&out),
        setup.logs(&job)
    );
    let status = wait_job(&setup, &mut job);
    let logs = setup.logs(&job);
    assert!(status.success(), "cryo run failed ({status}):\n{logs}");
    assert!(logs.contains("cryo: job heat finished"), "{logs}");
    assert!(
        logs.contains("coordinator.lost") && logs.contains("coordinator.rejoined"),
        "{logs}"
    );
    setup.case.assert_matches_reference();
    let committed = setup.assert_committed_verify();
    assert_eq!(committed, [1, 2]);
    setup.assert_restarts_exactly(&committed);
}

/// Cuts n1 off the head until `cryo run` counts its agent lost, within
/// the link timeout (4 s, `CRYO_LINK_TIMEOUT`) and not TCP's quarter of an
/// hour; returns when the cut was made.
fn cut_until_lost(setup: &Setup, job: &Job) -> Instant {
    let cut = Instant::now();
    setup.cluster.partition("n1", HEAD);
    wait_until("agent.lost for n1", Duration::from_secs(20), || {
        setup.logs(job).contains("agent.lost")
    });
    let noticed = cut.elapsed();
    assert!(
        noticed < Duration::from_secs(4 + 4),
        "the lost agent was noticed after {noticed:?}"
    );
    cut
}

/// Heals the cut made at `cut` once n1's agent has noticed it too (9 s
/// on; its log reaches the head only through the launcher, once the
/// network is back), and waits until the agent has dialed in again.
fn heal_after_lost(setup: &Setup, job: &Job, cut: Instant) {
    std::thread::sleep(Duration::from_secs(9).saturating_sub(cut.elapsed()));
    setup.cluster.heal("n1");
    wait_until("n1's agent back", Duration::from_secs(20), || {
        setup.logs(job).contains("the agent on node n1 is back")
    });
}

/// A preemption (`cryo preempt`) while n1's agent is away after a long
/// partition: the stop's checkpoint waits for the agent (`--rejoin-wait`)
/// instead of stopping the job with nothing saved since epoch 1. Once the
/// network heals and the agent is back, epoch 2 commits, the job stops as
/// preempted, and a restart from epoch 2 ends byte-identical.
#[test]
fn a_preemption_while_an_agent_is_away_waits_for_it_and_checkpoints() {
    let Some(setup) = setup() else {
        return;
    };
    let mut job = setup.start_stepping(400, &[("CRYO_LINK_TIMEOUT", "4")]);
    let cut = cut_until_lost(&setup, &job);
    let preempt = setup
        .case
        .cryo()
        .args(["preempt", "heat"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the stop waiting for n1", Duration::from_secs(20), || {
        setup.logs(&job).contains("stop.awaiting_agent")
    });
    heal_after_lost(&setup, &job, cut);
    let said = output_text(&preempt.wait_with_output().unwrap());
    let status = wait_job(&setup, &mut job);
    let logs = setup.logs(&job);
    assert!(
        said.contains("epoch 2 committed"),
        "the preemption's checkpoint: {said}\n{logs}"
    );
    assert_eq!(
        status.code(),
        Some(75),
        "preempted after a checkpoint:\n{logs}"
    );
    assert!(
        logs.contains("cryo: job heat preempted after committing epoch 2"),
        "{logs}"
    );
    let committed = setup.assert_committed_verify();
    assert_eq!(committed, [1, 2]);
    setup.assert_restarts_exactly(&committed);
}

/// A periodic checkpoint (`--interval 20`) that falls while n1's agent is
/// away after a long partition is tried again until the agent is back, and
/// taken then, not at the next interval: the job would otherwise compute
/// a whole interval more unsaved.
#[test]
fn a_periodic_checkpoint_during_a_long_partition_is_taken_once_the_agent_is_back() {
    let Some(setup) = setup() else {
        return;
    };
    let timeout = CHECKPOINT_TIMEOUT.as_secs().to_string();
    let mut job = setup.case.start_with_env(
        "heat",
        "n0:2,n1:2",
        4,
        &["--checkpoint-timeout", &timeout, "--interval", "20"],
        600,
        &[("CRYO_LINK_TIMEOUT", "4")],
    );
    wait_until("epoch 1 committed", Duration::from_secs(60), || {
        setup.logs(&job).contains("epoch 1 committed")
    });
    cut_until_lost(&setup, &job);
    wait_until(
        "the periodic checkpoint waiting",
        Duration::from_secs(30),
        || setup.logs(&job).contains("interval.deferred"),
    );
    setup.cluster.heal("n1");
    wait_until("n1's agent back", Duration::from_secs(20), || {
        setup.logs(&job).contains("the agent on node n1 is back")
    });
    // The next interval is 20 s after the one that waited.
    wait_until("epoch 2 committed", Duration::from_secs(8), || {
        setup.logs(&job).contains("epoch 2 committed")
    });
    let status = wait_job(&setup, &mut job);
    let logs = setup.logs(&job);
    assert!(status.success(), "cryo run failed ({status}):\n{logs}");
    assert!(
        logs.contains("checkpoint of epoch 2 requested (interval)"),
        "{logs}"
    );
    setup.case.assert_matches_reference();
    let committed = setup.assert_committed_verify();
    assert!(committed.contains(&2), "{committed:?}");
    setup.assert_restarts_exactly(&committed);
}

/// Every process on n1 is killed while epoch 2 drains, as when a node loses
/// power: epoch 2 aborts, `cryo run` ends (the MPI job lost ranks) within
/// the checkpoint timeout, epoch 1 verifies, and a restart on n2 finishes
/// byte-identical.
#[test]
fn a_node_lost_mid_epoch_leaves_the_previous_checkpoint_restorable() {
    let Some(setup) = setup() else {
        return;
    };
    let mut job = setup.start(&[("CRYO_FAULT", "pause-at:drain:2:5000")]);
    let mut checkpoint = setup.checkpoint_in_background();
    wait_paused(&setup, &job);
    let lost = Instant::now();
    setup.cluster.kill_node("n1");
    let status = wait_child(&mut checkpoint, Duration::from_secs(60));
    let said = output_text(&checkpoint.wait_with_output().unwrap());
    let run_status = wait_job(&setup, &mut job);
    let ended = lost.elapsed();
    let logs = setup.logs(&job);
    assert!(
        !status.success(),
        "epoch 2 cannot commit without n1: {said}"
    );
    assert!(!run_status.success(), "the job lost ranks: {logs}");
    assert!(
        ended < CHECKPOINT_TIMEOUT + Duration::from_secs(10),
        "cryo run ended {ended:?} after the node was lost:\n{logs}"
    );
    assert!(setup.cluster.pids("n1").is_empty());
    let committed = setup.assert_committed_verify();
    assert_eq!(committed, [1]);
    setup.assert_restarts_exactly(&committed);
}
