#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use cryo_core::protocol::{
    AbortReason, AgentToCoordinator, JobRequest, JobResponse, PROTOCOL_VERSION,
};

use crate::link_loss::LinkLoss;
use crate::running::Coordinator;
use crate::running_fixture::{coordinator, registered, timed_out, writer};

/// A job of `ranks` ranks, all on agent "a", which then lost its link.
fn with_agent_lost(dir: &std::path::Path, ranks: u32) -> Coordinator {
    let mut c = coordinator(dir, ranks);
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
    for rank in 0..ranks {
        c.on_agent_message("a", registered(rank));
    }
    c.on_agent_lost("a", &timed_out(), 1);
    c
}

/// The agent dials in again on connection `link` and states its ranks.
fn rejoin(c: &mut Coordinator, ranks: u32, link: u64) {
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, link);
    for rank in 0..ranks {
        c.on_agent_message("a", registered(rank));
    }
}

/// The agent's word that `epoch` failed: rank 0 never parked.
fn never_parked(epoch: u64) -> AgentToCoordinator {
    AgentToCoordinator::Failed {
        epoch,
        reason: AbortReason::NeverParked { rank: 0 },
    }
}

#[test]
fn a_preemption_that_finds_an_agent_away_checkpoints_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_agent_lost(dir.path(), 2);
    let (reply, answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    assert!(c.is_awaiting_agent());
    c.retry_stop_checkpoint();
    assert!(c.epoch.is_none() && c.preempt_result.is_none());
    assert!(answer.try_recv().is_err(), "`cryo preempt` waits on");

    rejoin(&mut c, 2, 2);
    c.retry_stop_checkpoint();
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));
    assert!(!c.is_awaiting_agent());
    assert!(c.preempt_result.is_none());
    assert!(
        answer.try_recv().is_err(),
        "answered by the epoch's outcome"
    );
}

#[test]
fn past_the_rejoin_wait_the_stop_goes_ahead_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_agent_lost(dir.path(), 1);
    c.opts.rejoin_wait = Duration::from_millis(50);
    let (reply, answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    c.retry_stop_checkpoint();
    assert!(c.preempt_result.is_none());
    std::thread::sleep(Duration::from_millis(60));
    c.retry_stop_checkpoint();
    assert_eq!(c.preempt_result, Some(false));
    assert!(c.epoch.is_none() && !c.is_awaiting_agent());
    match answer.try_recv().unwrap() {
        JobResponse::Refused { reason } => assert!(
            reason.contains("node \"a\" is not connected")
                && reason.ends_with("the job is stopped without a new checkpoint"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // An agent back later starts nothing: the stop is decided.
    rejoin(&mut c, 1, 2);
    c.retry_stop_checkpoint();
    assert!(c.epoch.is_none());
}

#[test]
fn a_sigterm_ends_the_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_agent_lost(dir.path(), 1);
    c.preempting = true;
    assert_eq!(c.start_stop_checkpoint("SIGUSR1"), Ok(None));
    c.give_up_waiting("SIGTERM");
    assert_eq!(c.preempt_result, Some(false));
    assert!(!c.is_awaiting_agent());
}

#[test]
fn without_a_rejoin_wait_the_stop_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_agent_lost(dir.path(), 1);
    c.opts.rejoin_wait = Duration::ZERO;
    c.preempting = true;
    let refused = c.start_stop_checkpoint("SIGTERM").unwrap_err();
    assert!(refused.awaits_an_agent(), "{refused}");
    assert!(!c.is_awaiting_agent());
}

#[test]
fn the_stop_epoch_aborted_by_a_lost_agent_is_taken_again_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 2);
    rejoin(&mut c, 2, 1);
    let (reply, answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));

    c.on_agent_lost("a", &timed_out(), 1);
    assert!(c.epoch.is_none(), "the epoch aborts with the lost agent");
    assert!(c.is_awaiting_agent(), "the stop waits for the agent");
    assert!(c.preempt_result.is_none());
    assert!(answer.try_recv().is_err(), "`cryo preempt` waits on");

    rejoin(&mut c, 2, 2);
    c.retry_stop_checkpoint();
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(2));
}

#[test]
fn a_stop_epoch_aborted_with_every_agent_there_is_not_taken_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 1);
    rejoin(&mut c, 1, 1);
    c.preempting = true;
    assert_eq!(c.start_stop_checkpoint("SIGTERM"), Ok(Some(1)));
    c.on_agent_message("a", never_parked(1));
    assert!(c.epoch.is_none());
    assert_eq!(c.preempt_result, Some(false));
}

#[test]
fn a_rejoined_agent_that_has_not_restated_its_ranks_yet_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 2);
    // External agents: one that connects again may be a restarted agent,
    // whose ranks register with it afresh, so its ranks are cleared.
    c.opts.agents = crate::session::AgentMode::External {
        socket: dir.path().join("agent.sock"),
        advertise: None,
        starter: crate::session::AgentStarter::LauncherStep,
    };
    rejoin(&mut c, 2, 1);
    c.on_agent_lost("a", &timed_out(), 1);
    let (reply, _answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    assert!(c.is_awaiting_agent());

    // Back, but its ranks not stated yet: no departure, still waiting.
    c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
    assert_eq!(
        c.start_checkpoint("test"),
        Err(crate::refusal::Refusal::Restating { ranks: 2 })
    );
    c.retry_stop_checkpoint();
    assert!(c.is_awaiting_agent() && c.preempt_result.is_none());
    for rank in 0..2 {
        c.on_agent_message("a", registered(rank));
    }
    c.retry_stop_checkpoint();
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));
}

#[test]
fn a_checkpoint_asked_for_once_the_agent_is_back_is_the_stop_s_and_answers_the_preemption() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_agent_lost(dir.path(), 1);
    let (reply, answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    rejoin(&mut c, 1, 2);
    // `cryo checkpoint` before the next tick's retry.
    let (reply, _checkpoint) = mpsc::channel();
    c.on_request(JobRequest::Checkpoint, reply);
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));
    assert!(!c.is_awaiting_agent(), "the stop's checkpoint is under way");
    c.retry_stop_checkpoint();
    assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));
    // It aborts: the preemption hears it once the stop is decided.
    c.on_agent_message("a", never_parked(1));
    assert_eq!(c.preempt_result, Some(false));
    assert!(matches!(answer.try_recv(), Ok(JobResponse::Aborted { .. })));
}

#[test]
fn a_stop_does_not_wait_for_an_agent_that_closed_its_connection() {
    // Closed, not silent: the agent exited or was killed, and will not
    // dial in again.
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator(dir.path(), 1);
    rejoin(&mut c, 1, 1);
    c.on_agent_lost("a", &LinkLoss::Closed, 1);
    let (reply, answer) = mpsc::channel();
    c.on_request(JobRequest::Preempt, reply);
    assert!(!c.is_awaiting_agent());
    assert_eq!(c.preempt_result, Some(false));
    match answer.try_recv().unwrap() {
        JobResponse::Refused { reason } => {
            assert!(reason.contains("connection closed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
