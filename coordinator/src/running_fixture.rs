//! A coordinator with one agent, "a", and no I/O beyond a store in a
//! temporary directory and loopback sockets: for the unit tests of the
//! coordinator's reactions.
#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use cryo_core::protocol::AgentToCoordinator;
use cryo_core::store::Store;

use crate::agent_links::AgentHandle;
use crate::link_loss::LinkLoss;
use crate::registry::JobCommand;
use crate::running::Coordinator;
use crate::session::{AgentMode, RunOptions};

pub(crate) fn coordinator(dir: &Path, ranks: u32) -> Coordinator {
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
        rejoin_wait: Duration::from_secs(15),
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

/// The coordinator's end of a fresh connection, whose agent end reads and
/// drops what it is sent until the coordinator's end closes.
pub(crate) fn writer() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut agent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    std::thread::spawn(move || std::io::copy(&mut agent, &mut std::io::sink()));
    listener.accept().unwrap().0
}

pub(crate) fn registered(rank: u32) -> AgentToCoordinator {
    AgentToCoordinator::RankRegistered {
        rank,
        pid: 100 + rank,
        restored_epoch: None,
    }
}

/// A link that went silent past the link timeout (a partition).
pub(crate) fn timed_out() -> LinkLoss {
    LinkLoss::Broken("timed out".into())
}
