//! A fake coordinator and a hand-driven rank for end-to-end tests of one
//! real coordinated `cryo-agent`: a TCP listener that speaks the
//! coordinator's side of the protocol, and a rank that registers with a
//! real control page and parks whenever the test says.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryo_core::auth;
use cryo_core::protocol::{
    read_message, send_message_with_fd, write_message, AbortReason, AgentToCoordinator,
    AgentToRank, ControlPage, ControlRequest, ControlResponse, CoordinatorToAgent, Hello, Peer,
    ProbeVerdict, RankToAgent, CONTROL_PAGE_LEN, CONTROL_PAGE_MAGIC, IN_FLIGHT_BIT,
    PROTOCOL_VERSION,
};
use cryo_core::token::JobToken;

use crate::counter::Setup;
use crate::{wait_until, Agent};

/// How long a test waits for the agent.
pub const WAIT: Duration = Duration::from_secs(60);

/// A fake coordinator: accepts agents on 127.0.0.1 and checks their token.
#[allow(missing_debug_implementations)]
pub struct FakeCoordinator {
    listener: TcpListener,
    /// Where agents connect (`127.0.0.1:port`).
    pub addr: String,
    /// The job's name.
    pub job: String,
    /// The job's token, which agents and ranks must prove.
    pub token: JobToken,
}

impl FakeCoordinator {
    /// Listens on a free port of 127.0.0.1 for `job`.
    pub fn new(job: &str) -> FakeCoordinator {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        FakeCoordinator {
            listener,
            addr,
            job: job.into(),
            token: JobToken::generate().unwrap(),
        }
    }

    /// Writes the job token to a 0600 file.
    pub fn token_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("token");
        self.token.write(&path).unwrap();
        path
    }

    /// Accepts one agent in the background and answers its hello:
    /// `Welcome` if the token matches, else `Refused`.
    pub fn accept(&self) -> JoinHandle<Link> {
        let listener = self.listener.try_clone().unwrap();
        let job = self.job.clone();
        let token = self.token.clone();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let hello: Hello = read_message(&mut &stream).unwrap();
            let (nonce, proof) = auth::challenge(&mut &stream).unwrap();
            let ok = hello.job == job && auth::verify(&token, &nonce, &hello, &proof).is_ok();
            let answer = if ok {
                CoordinatorToAgent::Welcome { job, world_size: 2 }
            } else {
                CoordinatorToAgent::Refused {
                    reason: "wrong job token".into(),
                }
            };
            write_message(&mut &stream, &answer).unwrap();
            stream.set_read_timeout(None).unwrap();
            Link::new(stream, hello)
        })
    }
}

/// The coordinator's end of one agent's connection.
#[allow(missing_debug_implementations)]
pub struct Link {
    stream: TcpStream,
    /// The agent's hello.
    pub hello: Hello,
    rx: Receiver<AgentToCoordinator>,
    /// Received but not yet expected.
    pending: VecDeque<AgentToCoordinator>,
    /// Everything received, in order.
    pub seen: Vec<AgentToCoordinator>,
}

impl Link {
    fn new(stream: TcpStream, hello: Hello) -> Link {
        let (tx, rx) = mpsc::channel();
        let reader = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            while let Ok(msg) = read_message::<AgentToCoordinator>(&mut &reader) {
                // As the coordinator does, hear the heartbeat and drop it.
                if msg == AgentToCoordinator::Alive {
                    continue;
                }
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        Link {
            stream,
            hello,
            rx,
            pending: VecDeque::new(),
            seen: Vec::new(),
        }
    }

    /// Sends `msg` to the agent.
    pub fn send(&self, msg: &CoordinatorToAgent) {
        write_message(&mut &self.stream, msg).unwrap();
    }

    /// The agent's next message, within `timeout`.
    pub fn receive(&mut self, timeout: Duration) -> Option<AgentToCoordinator> {
        match self.rx.recv_timeout(timeout) {
            Ok(msg) => {
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Waits for a message matching `pred`; others stay pending.
    pub fn expect(
        &mut self,
        what: &str,
        pred: impl Fn(&AgentToCoordinator) -> bool,
    ) -> AgentToCoordinator {
        if let Some(at) = self.pending.iter().position(&pred) {
            return self.pending.remove(at).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.receive(left) else {
                panic!(
                    "no {what} from the agent within {WAIT:?}; got {:?}",
                    self.seen
                );
            };
            if pred(&msg) {
                return msg;
            }
            self.pending.push_back(msg);
        }
    }

    /// Waits for the agent's `Failed` for `epoch`: its reason.
    pub fn expect_failed(&mut self, epoch: u64) -> AbortReason {
        match self.expect(
            "Failed",
            |m| matches!(m, AgentToCoordinator::Failed { epoch: e, .. } if *e == epoch),
        ) {
            AgentToCoordinator::Failed { reason, .. } => reason,
            other => unreachable!("{other:?}"),
        }
    }

    /// Takes whatever has arrived by now.
    pub fn drain(&mut self) {
        while let Some(msg) = self.receive(Duration::from_millis(1)) {
            self.pending.push_back(msg);
        }
    }

    /// Where the first message matching `pred` was received.
    pub fn position(&self, pred: impl Fn(&AgentToCoordinator) -> bool) -> Option<usize> {
        self.seen.iter().position(pred)
    }

    /// Drops the connection as a crashed coordinator would.
    pub fn cut(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Starts a coordinated agent for `coord`'s job.
pub fn coordinated_agent(setup: &Setup, coord: &FakeCoordinator, extra: &[&str]) -> (Agent, Link) {
    coordinated_agent_with_env(setup, coord, extra, &[])
}

/// [`coordinated_agent`] with more environment for the agent.
pub fn coordinated_agent_with_env(
    setup: &Setup,
    coord: &FakeCoordinator,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Agent, Link) {
    let token_file = coord.token_file(setup.dir.path());
    let pending = coord.accept();
    let mut args = vec![
        "--coordinator",
        coord.addr.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start_with_env(setup.dir.path(), &coord.job, &args, env);
    let link = pending.join().unwrap();
    assert_eq!(
        link.hello.peer,
        Peer::Agent {
            node: "test-node".into()
        }
    );
    assert_eq!(link.hello.version, PROTOCOL_VERSION);
    (agent, link)
}

/// Matches the agent's report that `rank` registered (restored from
/// `restored`).
pub fn is_registered(rank: u32, restored: Option<u64>) -> impl Fn(&AgentToCoordinator) -> bool {
    move |m| {
        matches!(m, AgentToCoordinator::RankRegistered { rank: r, restored_epoch, .. }
            if *r == rank && *restored_epoch == restored)
    }
}

/// Matches the agent's report that `rank` was copied for `epoch`.
pub fn is_copied(epoch: u64, rank: u32) -> impl Fn(&AgentToCoordinator) -> bool {
    move |m| matches!(m, AgentToCoordinator::Copied { epoch: e, rank: r, .. } if *e == epoch && *r == rank)
}

/// Matches the agent's report that `rank`'s part of `epoch` is durable.
pub fn is_durable(epoch: u64, rank: u32) -> impl Fn(&AgentToCoordinator) -> bool {
    move |m| matches!(m, AgentToCoordinator::Durable { epoch: e, rank: r, .. } if *e == epoch && *r == rank)
}

/// Whether the agent's log has a line with all of `parts`.
pub fn logged(agent: &Agent, parts: &[&str]) -> bool {
    agent
        .log_text()
        .lines()
        .any(|line| parts.iter().all(|p| line.contains(p)))
}

/// Waits for a line of the agent's log with all of `parts`.
pub fn wait_logged(agent: &Agent, parts: &[&str]) {
    wait_until(&format!("{parts:?} in the agent log"), WAIT, || {
        logged(agent, parts)
    });
}

/// Waits until the agent has no epoch under way.
pub fn wait_idle(agent: &Agent) {
    wait_until("the agent to be idle", WAIT, || {
        matches!(agent.request(&ControlRequest::Status),
            ControlResponse::Status(s) if s.busy.is_none())
    });
}

/// A hand-driven rank: registers over the agent's socket with a real
/// control page and parks whenever the test says, as an MPI rank does when
/// its peers agreed on an epoch before this node's agent heard of it.
#[allow(missing_debug_implementations)]
pub struct FakeRank {
    sock: UnixStream,
    /// The control page's memfd, shared with the agent.
    page: fs::File,
}

impl FakeRank {
    /// Registers as rank 0 of `agent`'s job, proving `token`.
    pub fn register(agent: &Agent, token: &JobToken) -> FakeRank {
        let memfd = nix::sys::memfd::memfd_create(
            c"fake-rank-page",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
                | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut page = fs::File::from(memfd);
        page.set_len(CONTROL_PAGE_LEN as u64).unwrap();
        page.write_all(&CONTROL_PAGE_MAGIC.to_ne_bytes()).unwrap();
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&page),
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_SEAL,
            ),
        )
        .unwrap();
        let sock = UnixStream::connect(&agent.socket).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            job: agent.job.clone(),
            peer: Peer::Rank {
                rank: 0,
                pid: std::process::id(),
            },
        };
        send_message_with_fd(&sock, &hello, page.as_fd()).unwrap();
        auth::answer(&mut &sock, &hello, Some(token)).unwrap();
        match read_message::<AgentToRank>(&mut &sock).unwrap() {
            AgentToRank::Welcome { .. } => {}
            other => panic!("{other:?}"),
        }
        FakeRank { sock, page }
    }

    /// Says in the control page that a verdict on messages in flight
    /// follows the park for `epoch`, as an MPI rank does.
    pub fn begin_probe(&self, epoch: u64) {
        self.write_page(std::mem::offset_of!(ControlPage, probing_epoch), epoch);
    }

    /// Gives the verdict for `epoch` in the control page.
    pub fn end_probe(&self, epoch: u64, verdict: ProbeVerdict) {
        let word = match verdict {
            ProbeVerdict::Clear => epoch,
            ProbeVerdict::InFlight => epoch | IN_FLIGHT_BIT,
        };
        self.write_page(std::mem::offset_of!(ControlPage, probed), word);
    }

    /// Refuses `epoch`, saying why.
    pub fn refuse(&self, epoch: u64, reason: &str) {
        write_message(
            &mut &self.sock,
            &RankToAgent::Refused {
                epoch,
                reason: reason.into(),
            },
        )
        .unwrap();
    }

    fn write_page(&self, offset: usize, word: u64) {
        self.page
            .write_all_at(&word.to_ne_bytes(), offset as u64)
            .unwrap();
    }

    /// Parks for `epoch`, with no regions.
    pub fn park(&self, epoch: u64) {
        write_message(
            &mut &self.sock,
            &RankToAgent::Parked {
                epoch,
                regions: Vec::new(),
                runtime_fds: Vec::new(),
                library_fds: Vec::new(),
                warnings: Vec::new(),
            },
        )
        .unwrap();
    }

    /// The agent's answer to a park, and how long it took.
    pub fn answer(&self) -> (AgentToRank, Duration) {
        let t = Instant::now();
        let msg = read_message::<AgentToRank>(&mut &self.sock).unwrap();
        (msg, t.elapsed())
    }

    /// Whether the agent sent anything within `wait`.
    pub fn hears_within(&self, wait: Duration) -> bool {
        let mut poll = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&self.sock),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)).unwrap() > 0
    }
}
