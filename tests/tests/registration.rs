//! Registration failures are clear and leave nothing behind.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use cryo_core::protocol::{ControlRequest, ControlResponse};
use cryo_tests::{bin, write_input, Agent};

fn counter(dir: &std::path::Path) -> Command {
    counter_steps(dir, 3)
}

fn counter_steps(dir: &std::path::Path, steps: u32) -> Command {
    let input = dir.join("input.dat");
    write_input(&input, 4096);
    let mut cmd = Command::new(bin("cryo-counter"));
    cmd.args(["--state-mb", "1"])
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--log")
        .arg(dir.join("log"))
        .arg("--input")
        .arg(&input)
        .arg("--final")
        .arg(dir.join("final"))
        .env("CRYO_RANK", "0")
        .env_remove("CRYO_REGION_BASE");
    cmd
}

#[test]
fn a_rank_of_another_job_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "mine", &["--copy-budget", "8MiB"]);
    let out = counter(dir.path())
        .env("CRYO_AGENT_SOCKET", &agent.socket)
        .env("CRYO_JOB", "theirs")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("\"mine\"") && err.contains("\"theirs\""),
        "{err}"
    );
    match agent.request(&ControlRequest::Status) {
        ControlResponse::Status(status) => assert!(status.ranks.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = counter(dir.path())
        .env("CRYO_AGENT_SOCKET", &socket)
        .env("CRYO_JOB", "j")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the cryo agent")
            && err.contains("nobody.sock")
            && err.contains("rank 0"),
        "{err}"
    );
}

#[test]
fn without_an_agent_the_runtime_runs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = counter(dir.path())
        .env_remove("CRYO_AGENT_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("final "));
}

#[test]
fn a_bad_region_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = counter(dir.path())
        .env_remove("CRYO_AGENT_SOCKET")
        .env("CRYO_REGION_BASE", "0x1234")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CRYO_REGION_BASE") && err.contains("4096"),
        "{err}"
    );
}

#[test]
fn lifecycle_events_are_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "events",
        &["--copy-budget", "8MiB", "--log-format", "json"],
    );
    let mut rank = counter_steps(dir.path(), 1000)
        .args(["--step-ms", "20"])
        .env("CRYO_AGENT_SOCKET", &agent.socket)
        .env("CRYO_JOB", "events")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    agent.wait_ranks(1);
    let report = agent.checkpoint();
    let _ = rank.kill();
    let _ = rank.wait();
    let log = agent.log_text();
    for event in [
        "agent.ready",
        "rank.registered",
        "checkpoint.requested",
        "rank.quiesced",
        "rank.resumed",
        "epoch.committed",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("\"message\":\"{event}\"")))
            .unwrap_or_else(|| panic!("no {event} JSON line in:\n{log}"));
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        if event == "epoch.committed" {
            assert!(
                line.contains(&format!("\"epoch\":{}", report.epoch))
                    && line.contains("\"job\":\"events\""),
                "{line}"
            );
        }
    }
}

/// A control client of protocol version 4 (before typed reasons) is
/// accepted, and answered in version 4's frames and layouts: its failure
/// reason arrives as text it can read.
#[test]
fn a_version_4_client_is_answered_in_version_4() {
    use cryo_core::protocol::{
        read_frame, write_message_as, AbortReason, BusyPolicy, Challenge, Completion, Hello, Peer,
        Proof,
    };
    const OLD: u16 = 4;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "old", &["--copy-budget", "8MiB"]);
    let mut sock = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    let hello = Hello {
        version: OLD,
        job: "old".into(),
        peer: Peer::Control {
            client: "a version 4 client".into(),
        },
    };
    write_message_as(&mut sock, &hello, OLD).unwrap();
    let challenge = read_frame(&mut sock).unwrap();
    assert_eq!(challenge.header.version, OLD, "the challenge");
    challenge.decode::<Challenge>().unwrap();
    write_message_as(&mut sock, &Proof { mac: None }, OLD).unwrap();
    let welcome = read_frame(&mut sock).unwrap();
    assert_eq!(welcome.header.version, OLD, "the welcome");
    assert!(matches!(
        welcome.decode::<ControlResponse>().unwrap(),
        ControlResponse::Welcome { .. }
    ));
    // No rank is registered, so the checkpoint fails: in version 4's
    // layout, with text.
    let request = ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Wait,
        until: Completion::Committed,
    };
    write_message_as(&mut sock, &request, OLD).unwrap();
    let answer = read_frame(&mut sock).unwrap();
    assert_eq!(answer.header.version, OLD, "the answer");
    match answer.decode::<ControlResponse>().unwrap() {
        ControlResponse::Failed {
            reason: AbortReason::Text(text),
            ..
        } => assert_eq!(text, "no rank is registered with this agent"),
        other => panic!("expected a version 4 failure, got {other:?}"),
    }
    // This build's own client gets the typed reason.
    match agent.request(&request) {
        ControlResponse::Failed {
            reason: AbortReason::NoRanks,
            ..
        } => {}
        other => panic!("expected a typed failure, got {other:?}"),
    }
}
