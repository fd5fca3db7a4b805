//! The parked rank's wait for its agent, with and without the late look for
//! messages in flight, against a hand-driven agent on a socket pair.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cryo_core::format::manifest::RegionKind;
use cryo_core::protocol::{
    read_message, send_message_with_fd, write_message, AgentToRank, ControlPage, CopyOutcome,
    CopyPiece, ProbeVerdict, RankToAgent, RegionInfo, PROTOCOL_VERSION,
};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::os::fd::AsFd;

use super::{await_answer, Ids, LookWhileParked};
use crate::runtime::SafePoint;

const EPOCH: u64 = 7;

fn page() -> ControlPage {
    ControlPage {
        magic: AtomicU64::new(0),
        checkpoint_requested: AtomicU64::new(0),
        parked_epoch: AtomicU64::new(0),
        resumed_epoch: AtomicU64::new(0),
        probing_epoch: AtomicU64::new(0),
        probed: AtomicU64::new(0),
        seen_epoch: AtomicU64::new(0),
        region_bytes: AtomicU64::new(0),
        computing: AtomicU64::new(0),
    }
}

fn ids() -> Ids<'static> {
    Ids {
        job: "job",
        rank: 1,
        epoch: EPOCH,
    }
}

/// Finds a message at its `finds_at`-th look (never, for `None`).
struct Look {
    until: Instant,
    looks: u32,
    finds_at: Option<u32>,
    /// Times `over` was called, and the looks before the first.
    over: Vec<u32>,
}

impl Look {
    fn new(window: Duration, finds_at: Option<u32>) -> Look {
        Look {
            until: Instant::now() + window,
            looks: 0,
            finds_at,
            over: Vec::new(),
        }
    }
}

impl LookWhileParked for Look {
    fn until(&self) -> Instant {
        self.until
    }

    fn look(&mut self) -> Result<Option<String>, String> {
        self.looks += 1;
        assert!(self.over.is_empty(), "looked after the look was over");
        Ok((Some(self.looks) == self.finds_at).then(|| "tag 99 from rank 0".to_string()))
    }

    fn over(&mut self) {
        self.over.push(self.looks);
    }
}

#[test]
fn a_rank_resumed_before_its_window_ends_stays_parked_until_it_ends_and_says_clear() {
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    page.begin_probe(EPOCH);
    write_message(&mut &agent, &AgentToRank::Resume { epoch: EPOCH }).unwrap();
    let mut look = Look::new(Duration::from_millis(50), None);
    let started = Instant::now();
    let answer = await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &[], Some(&mut look)).unwrap();
    assert!(
        matches!(answer, Ok(SafePoint::Checkpointed(EPOCH))),
        "{answer:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(look.looks > 1, "looked {} times", look.looks);
    assert_eq!(look.over, [look.looks]);
    assert!(page.probe_pending(EPOCH));
    assert_eq!(page.probe_verdict(EPOCH), Some(ProbeVerdict::Clear));
    assert_eq!(
        page.resumed_epoch
            .load(std::sync::atomic::Ordering::Acquire),
        EPOCH
    );
}

#[test]
fn a_message_found_while_parked_refuses_the_epoch_after_the_park() {
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    page.begin_probe(EPOCH);
    let mut look = Look::new(Duration::from_secs(10), Some(3));
    let agent_side = std::thread::spawn(move || {
        let refused = read_message::<RankToAgent>(&mut &agent).unwrap();
        write_message(&mut &agent, &AgentToRank::Resume { epoch: EPOCH }).unwrap();
        refused
    });
    let answer = await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &[], Some(&mut look)).unwrap();
    assert!(
        matches!(answer, Ok(SafePoint::Aborted(EPOCH))),
        "{answer:?}"
    );
    assert_eq!(look.looks, 3);
    assert_eq!(look.over, [3]);
    assert_eq!(page.probe_verdict(EPOCH), Some(ProbeVerdict::InFlight));
    assert_eq!(
        agent_side.join().unwrap(),
        RankToAgent::Refused {
            epoch: EPOCH,
            reason: "tag 99 from rank 0".into()
        }
    );
}

#[test]
fn an_abort_while_looking_ends_the_look_at_once() {
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    page.begin_probe(EPOCH);
    write_message(
        &mut &agent,
        &AgentToRank::Abort {
            epoch: EPOCH,
            reason: "another rank refused".into(),
        },
    )
    .unwrap();
    let mut look = Look::new(Duration::from_secs(10), None);
    let started = Instant::now();
    let answer = await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &[], Some(&mut look)).unwrap();
    assert!(
        matches!(answer, Ok(SafePoint::Aborted(EPOCH))),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(page.probe_verdict(EPOCH), Some(ProbeVerdict::Clear));
    assert_eq!(look.over.len(), 1);
}

#[test]
fn without_a_look_the_rank_waits_for_the_answer_alone_and_gives_no_verdict() {
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    write_message(&mut &agent, &AgentToRank::Resume { epoch: EPOCH - 1 }).unwrap();
    write_message(&mut &agent, &AgentToRank::Resume { epoch: EPOCH }).unwrap();
    let answer = await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &[], None).unwrap();
    assert!(
        matches!(answer, Ok(SafePoint::Checkpointed(EPOCH))),
        "{answer:?}"
    );
    assert!(!page.probe_pending(EPOCH));
    assert_eq!(page.probe_verdict(EPOCH), None);
}

#[test]
fn a_lost_agent_while_looking_is_an_error_not_a_hang() {
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    page.begin_probe(EPOCH);
    drop(agent);
    let mut look = Look::new(Duration::from_secs(10), None);
    assert!(await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &[], Some(&mut look)).is_err());
}

#[test]
fn a_parked_rank_copies_what_its_agent_asks_into_the_budget_then_waits_for_its_resume() {
    let _turn = crate::self_copy::TEST_TURN
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let (rank, agent) = UnixStream::pair().unwrap();
    let page = page();
    let state: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let regions = [RegionInfo {
        name: "state".into(),
        addr: state.as_ptr() as u64,
        len: state.len() as u64,
        kind: RegionKind::Anonymous,
    }];
    let budget = memfd_create(c"cryo-pool", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&budget, 1 << 20).unwrap();
    let ask = AgentToRank::CopyInto {
        epoch: EPOCH,
        pieces: vec![CopyPiece {
            addr: state.as_ptr() as u64 + 10,
            len: 50_000,
            offset: 4096,
        }],
        threads: 1,
    };
    send_message_with_fd(&agent, &ask, budget.as_fd()).unwrap();
    // The slots of the next copy, to fill while the rank runs: no answer.
    let fill = AgentToRank::FillView {
        epoch: EPOCH,
        ranges: vec![(512 << 10, 256 << 10)],
    };
    send_message_with_fd(&agent, &fill, budget.as_fd()).unwrap();
    write_message(&mut &agent, &AgentToRank::Resume { epoch: EPOCH }).unwrap();
    let answer = await_answer(&rank, PROTOCOL_VERSION, &page, ids(), &regions, None).unwrap();
    assert!(matches!(answer, Ok(SafePoint::Checkpointed(EPOCH))));
    assert!(crate::self_copy::wait_filled(1 << 20, 512 << 10));
    assert!(crate::self_copy::wait_filled(1 << 20, (768 << 10) - 1));
    match read_message::<RankToAgent>(&mut &agent).unwrap() {
        RankToAgent::Copied { epoch, outcome } => {
            assert_eq!(epoch, EPOCH);
            assert_eq!(outcome, CopyOutcome::Copied);
        }
        other => panic!("expected Copied, got {other:?}"),
    }
    let mut copied = vec![0u8; 50_000];
    nix::sys::uio::pread(budget.as_fd(), &mut copied, 4096).unwrap();
    assert_eq!(copied, state[10..50_010]);
}
