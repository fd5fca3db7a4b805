//! A rank that parks on its own schedule, as an MPI rank does: hand-driven
//! against one real coordinated `cryo-agent` and a fake coordinator. It may
//! park before its agent heard of the epoch, and an MPI rank goes on looking
//! for messages in flight while parked, so its part must wait for its
//! verdict.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_core::protocol::{AbortReason, AgentToRank, CoordinatorToAgent, ProbeVerdict};
use cryo_tests::coordinated::{
    coordinated_agent, coordinated_agent_with_env, is_copied, is_durable, is_registered, wait_idle,
    wait_logged, FakeCoordinator, FakeRank, Link,
};
use cryo_tests::counter::setup;

const CHUNK: u32 = 1 << 20;

/// The checkpoint before the job stops keeps its rank parked, durable or
/// not: what it would compute (and print) is lost with the job, and its
/// restart prints it again. A plain one resumes it once it is copied. The
/// store is held for 1.5 s before the part is made durable (`CRYO_FAULT`),
/// so a plain checkpoint's resume comes before it.
#[test]
fn a_final_checkpoint_keeps_its_rank_parked_to_the_stop() {
    let setup = setup();
    let hold = Duration::from_millis(1500);
    for last in [false, true] {
        let coord = FakeCoordinator::new(if last { "last" } else { "plain" });
        let (agent, mut link) = coordinated_agent_with_env(
            &setup,
            &coord,
            &["--copy-budget", "16MiB"],
            &[("CRYO_FAULT", "pause-at:drain:1:1500")],
        );
        let rank = FakeRank::register(&agent, &coord.token);
        link.expect("RankRegistered", is_registered(0, None));
        let epoch = 1;
        link.send(&CoordinatorToAgent::checkpoint(epoch, 10_000, last));
        rank.park(epoch);
        if last {
            link.expect("Copied", is_copied(epoch, 0));
            link.expect("Durable", is_durable(epoch, 0));
            assert!(
                !rank.hears_within(Duration::from_millis(500)),
                "a rank of the checkpoint before the stop was sent something once durable"
            );
        } else {
            let (answer, took) = rank.answer();
            assert_eq!(answer, AgentToRank::Resume { epoch });
            assert!(took < hold, "resumed only after {took:?}");
            link.expect("Copied", is_copied(epoch, 0));
            link.expect("Durable", is_durable(epoch, 0));
        }
        wait_idle(&agent);
    }
}

#[test]
fn early_park_waits_for_its_checkpoint_and_is_aborted_without_one() {
    let setup = setup();
    let coord = FakeCoordinator::new("early");
    let (agent, mut link) = coordinated_agent(
        &setup,
        &coord,
        &["--copy-budget", "16MiB", "--park-timeout", "1"],
    );
    let rank = FakeRank::register(&agent, &coord.token);
    link.expect("RankRegistered", is_registered(0, None));

    // Parked for epoch 5 before Checkpoint{5} reached this agent: held,
    // then captured when the request comes.
    rank.park(5);
    wait_logged(&agent, &["rank.parked_early", "epoch=5"]);
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 5,
        park_timeout_ms: 10_000,
    });
    let (answer, _) = rank.answer();
    assert_eq!(answer, AgentToRank::Resume { epoch: 5 });
    link.expect("Copied", is_copied(5, 0));
    link.expect("Durable", is_durable(5, 0));
    wait_idle(&agent);

    // Parked for epoch 7 and no Checkpoint{7} comes: Abort after the park
    // timeout, and a late Checkpoint{7} fails.
    rank.park(7);
    let (answer, took) = rank.answer();
    assert!(
        matches!(&answer, AgentToRank::Abort { epoch: 7, reason } if reason.contains("no checkpoint request")),
        "{answer:?}"
    );
    assert!(
        took >= Duration::from_millis(500),
        "answered after {took:?}"
    );
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 7,
        park_timeout_ms: 10_000,
    });
    let reason = link.expect_failed(7);
    assert!(reason.node().is_some(), "{reason:?}");
    assert!(
        matches!(reason.root(), AbortReason::NotNewer { epoch: 7, .. }),
        "{reason:?}"
    );

    // An epoch that is not new: Abort at once.
    rank.park(6);
    let (answer, took) = rank.answer();
    assert!(
        matches!(answer, AgentToRank::Abort { epoch: 6, .. }),
        "{answer:?}"
    );
    assert!(took < Duration::from_millis(500), "answered after {took:?}");

    // Parked early, then the coordinator aborts that epoch: Abort.
    rank.park(9);
    wait_logged(&agent, &["rank.parked_early", "epoch=9"]);
    link.send(&CoordinatorToAgent::Abort {
        epoch: 9,
        reason: AbortReason::AgentLost {
            node: "another".into(),
        },
    });
    let (answer, _) = rank.answer();
    assert!(
        matches!(answer, AgentToRank::Abort { epoch: 9, .. }),
        "{answer:?}"
    );
    // And a park for an epoch the coordinator already aborted: at once.
    rank.park(9);
    let (answer, took) = rank.answer();
    assert!(
        matches!(answer, AgentToRank::Abort { epoch: 9, .. }),
        "{answer:?}"
    );
    assert!(took < Duration::from_millis(500), "answered after {took:?}");

    // The rank never reaches a safe point: Failed, naming it.
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 10,
        park_timeout_ms: 300,
    });
    let reason = link.expect_failed(10);
    assert!(
        matches!(
            reason.root(),
            AbortReason::ParkTimeout {
                rank: 0,
                waited_ms: 300
            }
        ),
        "{reason:?}"
    );
    wait_idle(&agent);

    // Another agent committed a newer epoch meanwhile: the store refuses
    // to begin an older one, and the agent reports it.
    let job = agent.job_store();
    let record = job.load_part(5, 0).unwrap();
    job.write_part(50, &record).unwrap();
    job.commit_epoch(50, 1, CHUNK).unwrap();
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 20,
        park_timeout_ms: 10_000,
    });
    let reason = link.expect_failed(20);
    assert!(
        matches!(
            reason.root(),
            AbortReason::NotNewer {
                epoch: 20,
                newest: 50
            }
        ),
        "{reason:?}"
    );
    assert_eq!(job.committed_epochs().unwrap(), vec![50]);
}

#[test]
fn a_parked_rank_is_durable_only_once_it_found_no_message_in_flight() {
    let setup = setup();
    let coord = FakeCoordinator::new("verdict");
    let (agent, mut link) = coordinated_agent(&setup, &coord, &["--copy-budget", "16MiB"]);
    let rank = FakeRank::register(&agent, &coord.token);
    link.expect("RankRegistered", is_registered(0, None));

    // Copied and resumed at once, but not durable before the verdict.
    park_and_resume(&link, &rank, 3, true);
    link.expect("Copied", is_copied(3, 0));
    assert!(
        link.receive(Duration::from_millis(500)).is_none(),
        "the agent went on before the verdict: {:?}",
        link.seen
    );
    rank.end_probe(3, ProbeVerdict::Clear);
    link.expect("Durable", is_durable(3, 0));
    wait_idle(&agent);

    // A message found while parked: the refusal's text reaches the
    // coordinator, and the part is never durable.
    park_and_resume(&link, &rank, 4, true);
    rank.refuse(
        4,
        "rank 0: a message from rank 1 (tag 99) was still in flight",
    );
    rank.end_probe(4, ProbeVerdict::InFlight);
    let reason = link.expect_failed(4);
    assert!(
        matches!(
            reason.root(),
            AbortReason::RankRefused { rank: 0, detail } if detail.contains("tag 99")
        ),
        "{reason:?}"
    );
    assert!(link.position(is_durable(4, 0)).is_none(), "{:?}", link.seen);
    wait_idle(&agent);

    // The verdict alone, its text lost: still a refusal.
    park_and_resume(&link, &rank, 5, true);
    rank.end_probe(5, ProbeVerdict::InFlight);
    let reason = link.expect_failed(5);
    assert!(
        matches!(
            reason.root(),
            AbortReason::RankRefused { rank: 0, detail } if detail.contains("in flight")
        ),
        "{reason:?}"
    );
    wait_idle(&agent);

    // A rank that gives no verdict for an older epoch's look is not
    // waited for: a park without `begin_probe` is durable at once.
    park_and_resume(&link, &rank, 6, false);
    link.expect("Durable", is_durable(6, 0));
}

/// Asks `link`'s agent for `epoch`, parks `rank` for it (saying a verdict
/// follows if `probe`) and checks that it is resumed.
fn park_and_resume(link: &Link, rank: &FakeRank, epoch: u64, probe: bool) {
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch,
        park_timeout_ms: 10_000,
    });
    if probe {
        rank.begin_probe(epoch);
    }
    rank.park(epoch);
    let (answer, _) = rank.answer();
    assert_eq!(answer, AgentToRank::Resume { epoch });
}
