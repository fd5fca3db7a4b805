#![allow(clippy::unwrap_used)]

use cryo_core::protocol::{AgentToCoordinator, Departure, PROTOCOL_VERSION};

use crate::link_loss::LinkLoss;
use crate::refusal::Refusal;
use crate::running_fixture::{coordinator, registered, timed_out, writer};

fn finalized(rank: u32) -> AgentToCoordinator {
    AgentToCoordinator::RankLeft {
        rank,
        how: Departure::Finalized,
    }
}

#[test]
fn an_agent_back_after_a_lost_link_states_its_ranks_and_the_job_can_checkpoint_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 3);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
    for rank in 0..3 {
        c.on_agent_message("a", registered(rank));
    }
    c.on_agent_lost("a", &timed_out(), 1);
    assert_eq!(c.first_lost_agent().unwrap().0, "a");
    let refused = c.start_checkpoint("test").unwrap_err().to_string();
    assert!(
        refused.starts_with(
            "the agent on node \"a\" is not connected (lost 0 s ago: protocol error: timed out;"
        ),
        "{refused}"
    );

    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
    for rank in 0..3 {
        c.on_agent_message("a", registered(rank));
    }
    assert!(c.first_lost_agent().is_none());
    assert_eq!(c.registered(), 3);
    assert_eq!(c.start_checkpoint("test"), Ok(1));

    // Lost during that epoch, which aborts. Rank 0 said goodbye before,
    // rank 1 while the link was down (never sent); the agent states
    // everything again, twice (it was lost once more on the way).
    c.on_agent_message("a", finalized(0));
    c.on_agent_lost("a", &timed_out(), 2);
    assert!(c.epoch.is_none(), "the epoch aborts with the lost agent");
    for link in [3, 4] {
        c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, link);
        for msg in [
            registered(0),
            finalized(0),
            registered(1),
            finalized(1),
            registered(2),
        ] {
            c.on_agent_message("a", msg);
        }
    }
    assert_eq!(c.unfinalized(), [2]);
    assert_eq!(c.registered(), 1);
    assert!(c.all_finalized_at.is_none());
    assert!(
        c.first_left.is_none(),
        "a repeated goodbye is no failure: {:?}",
        c.first_left
    );
    c.on_agent_message("a", finalized(2));
    assert!(c.all_finalized_at.is_some(), "every rank said goodbye");
}

#[test]
fn a_rank_that_died_is_named_once_even_when_stated_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 2);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
    c.on_agent_message("a", registered(0));
    c.on_agent_message("a", registered(1));
    let died = AgentToCoordinator::RankLeft {
        rank: 1,
        how: Departure::Vanished,
    };
    c.on_agent_message("a", died.clone());
    let first_at = c.first_left_at.unwrap();
    c.on_agent_lost("a", &timed_out(), 1);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
    for msg in [registered(1), died, registered(0)] {
        c.on_agent_message("a", msg);
    }
    assert_eq!(c.first_left.as_ref().unwrap().0, 1);
    assert_eq!(c.first_left_at, Some(first_at), "not noted a second time");
    assert_eq!(c.registered(), 1);
    let refused = c.start_checkpoint("test").unwrap_err();
    assert_eq!(refused, Refusal::RanksLeft { left: 1, ranks: 2 });
}

#[test]
fn the_loss_of_a_connection_the_agent_already_replaced_is_no_news() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 1);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
    c.on_agent_message("a", registered(0));
    // The agent noticed first and dialed again before this end saw the
    // old connection close.
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
    c.on_agent_lost("a", &LinkLoss::Closed, 1);
    let agent = &c.agents["a"];
    assert!(agent.writer.is_some() && agent.lost.is_none());
    assert!(c.first_lost_agent().is_none());
    c.on_agent_lost("a", &LinkLoss::Closed, 2);
    assert!(c.agents["a"].writer.is_none());
    assert_eq!(c.first_lost_agent().unwrap().1, "connection closed");
}
