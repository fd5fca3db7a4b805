//! The runtime's threads inside the application's process, against a
//! scripted agent: a rank told while it runs where its first parked copy
//! goes fills its view of those slots before any checkpoint, and none of
//! the runtime's threads takes a signal the application blocked to wait
//! for it; the thread that reads such offers ends at `finalize`. Runs on
//! the main thread (no test harness): a signal sent to the process goes
//! first to the main thread, unless it blocks it.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use cryo_core::protocol::{
    read_message, recv_message_with_fd, send_message_with_fd, write_message, AgentToRank, Hello,
    RankToAgent, StartMode,
};
use cryo_rank::Config;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

/// Bytes of this process's mappings of the memfd `name` in its page tables.
fn mapped_bytes(name: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut inside, mut kib) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            inside = line.contains(&format!("/memfd:{name}"));
        } else if inside && first == "Rss:" {
            let value = line[first.len()..].trim().trim_end_matches("kB").trim();
            kib += value.parse::<u64>().unwrap();
        }
    }
    kib * 1024
}

/// How many of this process's threads are called `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut usr1 = SigSet::empty();
    usr1.add(Signal::SIGUSR1);
    // The scripted agent's thread is the test's, not the runtime's: it
    // blocks the signal from its start. The runtime starts its own threads
    // below, with the signal unblocked here.
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&usr1), None).unwrap();
    let agent = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let (_hello, _page) = recv_message_with_fd::<Hello>(&sock).unwrap();
        cryo_core::auth::challenge(&mut &sock).unwrap();
        let welcome = AgentToRank::Welcome {
            start: StartMode::Fresh,
            node: "n".into(),
        };
        write_message(&mut &sock, &welcome).unwrap();
        // The budget, and the slots of the rank's first copy, sent while
        // it runs.
        let budget = memfd_create(c"cryo-pool-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&budget, 4 << 20).unwrap();
        let offer = AgentToRank::FillView {
            epoch: 0,
            ranges: vec![(1 << 20, 1 << 20)],
        };
        send_message_with_fd(&sock, &offer, budget.as_fd()).unwrap();
        done_rx.recv().unwrap();
        assert_eq!(
            read_message::<RankToAgent>(&mut &sock).unwrap(),
            RankToAgent::Goodbye
        );
    });
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&usr1), None).unwrap();

    cryo_rank::init_with(Config {
        socket: Some(socket),
        job: "j".into(),
        rank: 3,
        ..Config::alone(0x5c00_0000_0000, 1 << 30)
    })
    .unwrap();

    // The offer is read while the rank runs, and its slots filled: those,
    // not the whole budget.
    let deadline = Instant::now() + Duration::from_secs(20);
    while mapped_bytes("cryo-pool-test") < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the slots offered were not filled while the rank ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mapped_bytes("cryo-pool-test"), 1 << 20);

    // The application blocks SIGUSR1 to wait for it. Sent to the process,
    // it must stay pending for that wait, not be taken by a thread of the
    // runtime (whose default action would end the process).
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&usr1), None).unwrap();
    nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGUSR1).unwrap();
    let timeout = libc::timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    // SAFETY: a valid signal set and timeout, no info wanted.
    let taken = unsafe { libc::sigtimedwait(usr1.as_ref(), std::ptr::null_mut(), &timeout) };
    assert_eq!(
        taken,
        libc::SIGUSR1,
        "the application's signal was not left to it"
    );

    assert_eq!(threads_named("cryo-offers"), 1);
    cryo_rank::finalize();
    done_tx.send(()).unwrap();
    agent.join().unwrap();
    // The thread that read the agent's offers ends with the runtime.
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named("cryo-offers") > 0 {
        assert!(Instant::now() < deadline, "cryo-offers outlived finalize");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("signals: ok");
}
