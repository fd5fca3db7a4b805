#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use cryo_core::protocol::{AgentToCoordinator, Departure, PROTOCOL_VERSION};
use cryo_core::store::Store;

use super::*;
use crate::registry::JobCommand;
use crate::session::RunOptions;

fn coordinator(dir: &Path, ranks: u32) -> Coordinator {
    let store = Store::create(dir.join("store")).unwrap();
    let job = store.prepared_job("j").unwrap();
    let opts = RunOptions {
        store: dir.join("store"),
        job: "j".into(),
        ranks,
        placement: Vec::new(),
        hosts: Vec::new(),
        interval: None,
        keep: 1,
        launcher: None,
        agents: AgentMode::Spawn,
        requeue: false,
        agent_bin: None,
        chunk_size: 1 << 20,
        copy_budget: None,
        checkpoint_timeout: Duration::from_secs(60),
        park_timeout: Duration::from_secs(5),
        listen: "127.0.0.1:0".into(),
        restart_from: None,
        command: JobCommand::new(&OsString::from("app"), &[], dir, ranks),
        scratch: dir.join("scratch"),
        finalize_timeout: None,
    };
    let (tx, _rx) = mpsc::channel();
    let mut c = Coordinator::new(opts, job, tx);
    c.agents
        .insert("a".into(), AgentHandle::unconnected(None, PathBuf::new()));
    c
}

/// The coordinator's end of a fresh connection.
fn writer() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _agent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    listener.accept().unwrap().0
}

fn registered(rank: u32) -> AgentToCoordinator {
    AgentToCoordinator::RankRegistered {
        rank,
        pid: 100 + rank,
        restored_epoch: None,
    }
}

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
    c.on_agent_lost("a", "timed out", 1);
    assert_eq!(c.first_lost_agent().unwrap().0, "a");
    let refused = c.start_checkpoint("test").unwrap_err();
    assert!(
        refused.starts_with("the agent on node \"a\" is not connected (lost 0 s ago: timed out;"),
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
    c.on_agent_lost("a", "timed out", 2);
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
    c.on_agent_lost("a", "timed out", 1);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
    for msg in [registered(1), died, registered(0)] {
        c.on_agent_message("a", msg);
    }
    assert_eq!(c.first_left.as_ref().unwrap().0, 1);
    assert_eq!(c.first_left_at, Some(first_at), "not noted a second time");
    assert_eq!(c.registered(), 1);
    let refused = c.start_checkpoint("test").unwrap_err();
    assert!(refused.contains("1 of 2 ranks have left"), "{refused}");
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
    c.on_agent_lost("a", "connection closed", 1);
    let agent = &c.agents["a"];
    assert!(agent.writer.is_some() && agent.lost.is_none());
    assert!(c.first_lost_agent().is_none());
    c.on_agent_lost("a", "connection closed", 2);
    assert!(c.agents["a"].writer.is_none());
    assert_eq!(c.first_lost_agent().unwrap().1, "connection closed");
}
