//! Coordinated mode end to end: the real `cryo-agent` with `--coordinator`,
//! real example ranks, and a small fake coordinator in the test (a TCP
//! listener speaking the protocol) standing in for `cryo run`. The test
//! itself commits epochs with `JobStore::commit_epoch`, as the coordinator
//! would once every rank is durable.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_core::protocol::{AbortReason, AgentToCoordinator, CoordinatorToAgent};
use cryo_core::token::JobToken;
use cryo_tests::coordinated::{
    coordinated_agent, coordinated_agent_with_env, is_copied, is_durable, is_registered, wait_idle,
    wait_logged, FakeCoordinator, FakeRank, Link, WAIT,
};
use cryo_tests::counter::{reference_of, setup};
use cryo_tests::{
    assert_same_file, checkpoint_frozen, lines, wait_until, Agent, Program, Rank, RankFiles,
    RankSpec,
};

const CHUNK: u32 = 1 << 20;

/// Captures every rank for `epoch` and waits for each rank's `Copied`, then
/// `Durable` (in that order per rank).
fn checkpoint(link: &mut Link, epoch: u64, ranks: &[u32]) {
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch,
        park_timeout_ms: 30_000,
    });
    for &rank in ranks {
        match link.expect("Copied", is_copied(epoch, rank)) {
            AgentToCoordinator::Copied {
                bytes, pause_us, ..
            } => {
                assert!(bytes > 0);
                assert!(pause_us > 0);
            }
            other => unreachable!("{other:?}"),
        }
    }
    let mut written_total = 0;
    for &rank in ranks {
        match link.expect("Durable", is_durable(epoch, rank)) {
            // Ranks share chunks (deduplication): one may write nothing new.
            AgentToCoordinator::Durable { written, .. } => written_total += written,
            other => unreachable!("{other:?}"),
        }
        let copied = link.position(is_copied(epoch, rank)).unwrap();
        let durable = link.position(is_durable(epoch, rank)).unwrap();
        assert!(copied < durable, "rank {rank}: {:?}", link.seen);
    }
    assert!(written_total > 0, "{:?}", link.seen);
}

#[test]
fn coordinated_checkpoint_then_restart_is_byte_identical() {
    let setup = setup();
    let coord = FakeCoordinator::new("cjob");
    let (agent, mut link) = coordinated_agent(&setup, &coord, &["--copy-budget", "64MiB"]);
    let program = Program::Rust;
    let specs: Vec<RankSpec<'_>> = (0..2)
        .map(|rank| RankSpec {
            program: &program,
            rank,
            agent: Some(&agent),
            steps: 100,
            state_mb: 8,
            step_ms: 15,
        })
        .collect();
    let refs: Vec<RankFiles> = specs.iter().map(|s| reference_of(&setup, s)).collect();
    let files: Vec<RankFiles> = (0..2)
        .map(|r| RankFiles::new(setup.dir.path(), &format!("run-{r}"), &setup.input))
        .collect();
    let env = [("CRYO_TOKEN", coord.token.expose())];
    let mut ranks: Vec<Rank> = (0..2)
        .map(|r| Rank::start_with_env(&specs[r], &files[r], &env))
        .collect();
    for rank in 0..2 {
        link.expect("RankRegistered", is_registered(rank, None));
    }
    for rank in &mut ranks {
        rank.wait_lines(30);
    }

    // The ranks stop when they report the capture and go on once epoch 1 is
    // committed, so they cannot finish while it drains.
    let all: Vec<&Rank> = ranks.iter().collect();
    let ((), frozen) = checkpoint_frozen(&all, || checkpoint(&mut link, 1, &[0, 1]));
    let job = agent.job_store();
    assert_eq!(
        job.committed_epochs().unwrap(),
        Vec::<u64>::new(),
        "a coordinated agent must not commit"
    );
    let manifest = job.commit_epoch(1, 2, CHUNK).unwrap();
    assert!(job.verify_manifest(&manifest).is_ok());
    link.send(&CoordinatorToAgent::Committed { epoch: 1 });
    wait_logged(&agent, &["epoch.committed", "epoch=1"]);
    let saved: Vec<usize> = files.iter().map(|f| lines(&f.log)).collect();
    drop(frozen);

    // Run past the checkpoint, then lose both ranks.
    for (rank, saved) in ranks.iter_mut().zip(saved) {
        rank.wait_lines(saved + 3);
    }
    for rank in ranks {
        rank.kill9();
    }
    for rank in 0..2 {
        link.expect(
            "RankLeft",
            move |m| matches!(m, AgentToCoordinator::RankLeft { rank: r, .. } if *r == rank),
        );
    }
    link.send(&CoordinatorToAgent::ArmRestart { epoch: 1 });
    wait_logged(&agent, &["restart.armed", "epoch=1"]);
    let restarted: Vec<Rank> = (0..2)
        .map(|r| Rank::start_with_env(&specs[r], &files[r], &env))
        .collect();
    for rank in 0..2 {
        link.expect("RankRegistered after restart", is_registered(rank, Some(1)));
    }
    for (r, rank) in restarted.into_iter().enumerate() {
        let status = rank.wait();
        assert!(status.success(), "rank {r}: {}", Rank::stderr(&files[r]));
        assert!(Rank::stderr(&files[r]).contains("restarted from epoch 1"));
        assert_same_file(&files[r].log, &refs[r].log);
        assert_same_file(&files[r].final_state, &refs[r].final_state);
    }
}

#[test]
fn abort_mid_epoch_resumes_ranks_and_keeps_the_committed_epoch() {
    let setup = setup();
    let coord = FakeCoordinator::new("abort");
    // A small copy budget: rank 0's 96 MiB stream through it while the rank
    // stays parked. The agent then holds every rank of epoch 2 parked for 3 s
    // after its copy, so the abort always finds rank 0 parked, however fast
    // the stream.
    let (agent, mut link) = coordinated_agent_with_env(
        &setup,
        &coord,
        &["--copy-budget", "4MiB"],
        &[("CRYO_FAULT", "pause-at:copy:2:3000")],
    );
    let program = Program::Rust;
    let specs = [
        RankSpec {
            program: &program,
            rank: 0,
            agent: Some(&agent),
            steps: 200,
            state_mb: 96,
            step_ms: 30,
        },
        // Slow steps: rank 1 is usually still computing when the abort
        // comes.
        RankSpec {
            program: &program,
            rank: 1,
            agent: Some(&agent),
            steps: 40,
            state_mb: 1,
            step_ms: 300,
        },
    ];
    let refs: Vec<RankFiles> = specs.iter().map(|s| reference_of(&setup, s)).collect();
    let files: Vec<RankFiles> = (0..2)
        .map(|r| RankFiles::new(setup.dir.path(), &format!("run-{r}"), &setup.input))
        .collect();
    // Without write tracking epoch 2 copies all 96 MiB again; an incremental
    // epoch would copy a few chunks and resume rank 0 before the abort.
    let env = [
        ("CRYO_TOKEN", coord.token.expose()),
        ("CRYO_DIRTY_TRACKING", "off"),
    ];
    let mut ranks: Vec<Rank> = (0..2)
        .map(|r| Rank::start_with_env(&specs[r], &files[r], &env))
        .collect();
    for rank in 0..2 {
        link.expect("RankRegistered", is_registered(rank, None));
    }
    ranks[0].wait_lines(5);
    ranks[1].wait_lines(2);

    checkpoint(&mut link, 1, &[0, 1]);
    let job = agent.job_store();
    job.commit_epoch(1, 2, CHUNK).unwrap();
    wait_idle(&agent);

    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 2,
        park_timeout_ms: 30_000,
    });
    wait_logged(&agent, &["rank.quiesced", "rank=0", "epoch=2"]);
    link.send(&CoordinatorToAgent::Abort {
        epoch: 2,
        reason: AbortReason::AgentLost {
            node: "other".into(),
        },
    });
    // Rank 0 was parked, streaming: it gets Abort and runs on.
    wait_until("rank 0 to hear of the abort", WAIT, || {
        Rank::stderr(&files[0]).contains("checkpoint 2 aborted")
    });
    wait_idle(&agent);
    wait_logged(&agent, &["checkpoint.aborted", "epoch=2"]);
    link.drain();
    assert!(
        link.position(is_durable(2, 0)).is_none(),
        "rank 0 was aborted mid-stream: {:?}",
        link.seen
    );
    assert!(
        link.position(|m| matches!(m, AgentToCoordinator::Failed { .. }))
            .is_none(),
        "an abort asked for is not a failure: {:?}",
        link.seen
    );
    // This agent's parts of epoch 2 are gone; epoch 1 is intact.
    for rank in 0..2 {
        assert!(
            !job.part_path(2, rank).exists(),
            "{}",
            job.part_path(2, rank).display()
        );
    }
    assert_eq!(job.committed_epochs().unwrap(), vec![1]);
    assert!(job.verify_manifest(&job.load_manifest(1).unwrap()).is_ok());

    // A late park for the aborted epoch would be answered at once, and the
    // next epoch works.
    checkpoint(&mut link, 3, &[0, 1]);
    job.commit_epoch(3, 2, CHUNK).unwrap();
    assert!(job.verify_manifest(&job.load_manifest(3).unwrap()).is_ok());

    for (r, rank) in ranks.into_iter().enumerate() {
        let status = rank.wait();
        assert!(status.success(), "rank {r}: {}", Rank::stderr(&files[r]));
        assert_same_file(&files[r].log, &refs[r].log);
        assert_same_file(&files[r].final_state, &refs[r].final_state);
    }
}

#[test]
fn tokens_are_checked_for_agents_and_ranks() {
    let setup = setup();
    let dir = setup.dir.path();

    // The agent presents a wrong token: the coordinator refuses it.
    let coord = FakeCoordinator::new("tok");
    let wrong = JobToken::generate().unwrap();
    let wrong_file = dir.join("wrong-token");
    wrong.write(&wrong_file).unwrap();
    let pending = coord.accept();
    let mut refused = Agent::spawn(
        dir,
        "tok",
        &[
            "--coordinator",
            &coord.addr,
            "--token-file",
            wrong_file.to_str().unwrap(),
        ],
        &[],
    );
    let status = refused.wait_exit(WAIT);
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains(&format!(
            "the coordinator at {} refused this agent: wrong job token",
            coord.addr
        )),
        "{log}"
    );
    assert!(!refused.socket.exists(), "a refused agent leaves no socket");
    drop(pending.join().unwrap());

    // Nothing listens: a clear error after a short retry.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut unreachable = Agent::spawn(
        dir,
        "tok2",
        &[
            "--coordinator",
            &addr,
            "--coordinator-wait",
            "0.5",
            "--token-file",
            wrong_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!unreachable.wait_exit(WAIT).success());
    let log = unreachable.log_text();
    assert!(
        log.contains(&format!("cannot reach the coordinator at {addr}")),
        "{log}"
    );

    // Coordinated mode without any token.
    let mut tokenless = Agent::spawn(dir, "tok3", &["--coordinator", &addr], &[]);
    assert!(!tokenless.wait_exit(WAIT).success());
    assert!(
        tokenless.log_text().contains("needs the job token"),
        "{}",
        tokenless.log_text()
    );

    // A coordinated agent refuses ranks with a wrong or missing token.
    let (agent, mut link) = coordinated_agent(&setup, &coord, &["--copy-budget", "16MiB"]);
    let program = Program::Rust;
    let spec = RankSpec {
        program: &program,
        rank: 0,
        agent: Some(&agent),
        steps: 5,
        state_mb: 1,
        step_ms: 0,
    };
    let files = RankFiles::new(dir, "bad-token", &setup.input);
    let status = Rank::start_with_env(&spec, &files, &[("CRYO_TOKEN", wrong.expose())]).wait();
    assert!(!status.success());
    let err = Rank::stderr(&files);
    assert!(
        err.contains("refused registration") && err.contains("wrong job token"),
        "{err}"
    );
    let files = RankFiles::new(dir, "no-token", &setup.input);
    let status = Rank::start_with_env(&spec, &files, &[]).wait();
    assert!(!status.success());
    let err = Rank::stderr(&files);
    assert!(err.contains("no job token"), "{err}");
    wait_logged(&agent, &["peer.rejected", "rank=0"]);
    // The right token is accepted, and only that rank was reported.
    let files = RankFiles::new(dir, "good-token", &setup.input);
    let env = [("CRYO_TOKEN", coord.token.expose())];
    let status = Rank::start_with_env(&spec, &files, &env).wait();
    assert!(status.success(), "{}", Rank::stderr(&files));
    link.expect("RankRegistered", is_registered(0, None));
    assert!(
        matches!(link.seen[0], AgentToCoordinator::RankRegistered { .. }),
        "{:?}",
        link.seen
    );
    assert_eq!(lines(&files.log), 5);

    // A standalone agent given a token checks it too.
    let token_file = dir.join("token");
    let standalone = Agent::start(
        dir,
        "solo",
        &[
            "--copy-budget",
            "16MiB",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let spec = RankSpec {
        agent: Some(&standalone),
        ..spec
    };
    let files = RankFiles::new(dir, "solo-bad", &setup.input);
    let status = Rank::start_with_env(&spec, &files, &[("CRYO_TOKEN", wrong.expose())]).wait();
    assert!(!status.success());
    assert!(Rank::stderr(&files).contains("wrong job token"));
    let files = RankFiles::new(dir, "solo-good", &setup.input);
    assert!(Rank::start_with_env(&spec, &files, &env).wait().success());
}

#[test]
fn lost_coordinator_aborts_the_epoch_and_the_job_computes_on() {
    let setup = setup();
    let coord = FakeCoordinator::new("lost");
    // The rank is held parked for 3 s after its copy, so the link is always
    // cut while the epoch is in progress.
    let (mut agent, mut link) = coordinated_agent_with_env(
        &setup,
        &coord,
        &["--copy-budget", "4MiB"],
        &[("CRYO_FAULT", "pause-at:copy:1:3000")],
    );
    let program = Program::Rust;
    let spec = RankSpec {
        program: &program,
        rank: 0,
        agent: Some(&agent),
        steps: 200,
        state_mb: 96,
        step_ms: 30,
    };
    let reference = reference_of(&setup, &spec);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let env = [("CRYO_TOKEN", coord.token.expose())];
    let mut rank = Rank::start_with_env(&spec, &files, &env);
    link.expect("RankRegistered", is_registered(0, None));
    rank.wait_lines(5);
    link.send(&CoordinatorToAgent::Checkpoint {
        epoch: 1,
        park_timeout_ms: 30_000,
    });
    wait_logged(&agent, &["rank.quiesced", "rank=0", "epoch=1"]);
    link.cut();
    wait_logged(&agent, &["coordinator.lost", &coord.addr]);
    wait_until("the rank to hear of the abort", WAIT, || {
        Rank::stderr(&files).contains("checkpoint 1 aborted")
    });
    wait_idle(&agent);
    let job = agent.job_store();
    assert_eq!(job.committed_epochs().unwrap(), Vec::<u64>::new());
    assert!(!job.part_path(1, 0).exists());
    // The agent still serves: the rank computes on, and the control socket
    // can still checkpoint (standalone-style, committed by the agent).
    rank.wait_lines(lines(&files.log) + 2);
    let report = agent.checkpoint();
    assert_eq!(report.epoch, 2);
    assert!(job.verify_manifest(&job.load_manifest(2).unwrap()).is_ok());
    let status = rank.wait();
    assert!(status.success(), "{}", Rank::stderr(&files));
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
    // With neither its coordinator nor a rank left, the agent ends.
    let status = agent.wait_exit(WAIT);
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(agent.log_text().contains("agent.orphaned"));
}

#[test]
fn an_agent_ends_when_its_coordinator_is_gone_and_its_last_rank_left() {
    let setup = setup();
    let coord = FakeCoordinator::new("orphan");
    let (mut agent, link) = coordinated_agent(&setup, &coord, &["--copy-budget", "16MiB"]);
    let rank = FakeRank::register(&agent, &coord.token);
    link.cut();
    wait_logged(&agent, &["coordinator.lost", &coord.addr]);
    // A rank still computes: the agent stays for it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.is_running(), "{}", agent.log_text());
    assert!(agent.socket.exists());
    drop(rank);
    let status = agent.wait_exit(WAIT);
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(agent.log_text().contains("agent.orphaned"));
    assert!(!agent.socket.exists());
}

#[test]
fn shutdown_exits_cleanly_and_removes_the_socket() {
    let setup = setup();
    let coord = FakeCoordinator::new("bye");
    let (mut agent, link) = coordinated_agent(&setup, &coord, &["--copy-budget", "16MiB"]);
    assert!(agent.socket.exists());
    link.send(&CoordinatorToAgent::Shutdown);
    let status = agent.wait_exit(WAIT);
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(!agent.socket.exists());
    assert!(agent.log_text().contains("agent.shutdown"));
}

/// Whether MPICH's `mpiexec` is here; says so loudly when not.
fn mpiexec_available() -> bool {
    let ok = std::process::Command::new("mpiexec")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("\n!!!!! SKIPPING THE MPI COORDINATED TEST: no mpiexec (install mpich) !!!!!\n");
    }
    ok
}

/// The Rust heat2d example (rsmpi), built once.
fn heat2d() -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(root).args(["build", "-p", "cryo-heat2d"]);
        if cryo_tests::bin_dir()
            .file_name()
            .is_some_and(|n| n == "release")
        {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building heat2d failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    cryo_tests::bin_dir().join("heat2d")
}

/// An MPI job under `mpiexec`, in its own process group; SIGKILLed (with
/// every process whose command line names `marker`) on drop.
struct MpiJob {
    child: Option<std::process::Child>,
    marker: String,
}

impl MpiJob {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Ranks and proxies that left the group.
        let me = std::process::id().to_string();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<i32>() else {
                continue;
            };
            if name == me {
                continue;
            }
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains(&self.marker) && cmdline.contains("heat2d") {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Waits for the job; on a hang, panics with what each of its processes
    /// is blocked in, the job's stderr and the agents' logs.
    fn wait(mut self, stderr: &Path, agents: &[Agent]) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let timeout = Duration::from_secs(120);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > timeout {
                let report = self.blocked_in();
                self.child = Some(child);
                self.kill();
                let logs: Vec<String> = agents
                    .iter()
                    .map(|a| fs::read_to_string(&a.log).unwrap_or_default())
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for the MPI job to finish\n\
                     processes:\n{report}\nstderr:\n{}\nagent logs:\n{}",
                    fs::read_to_string(stderr).unwrap_or_default(),
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Each of the job's threads: state, kernel wait channel and stack.
    fn blocked_in(&self) -> String {
        let mut out = String::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(&self.marker) || !cmdline.contains("heat2d") {
                continue;
            }
            out.push_str(&format!(
                "{}: {cmdline}\n",
                entry.file_name().to_string_lossy()
            ));
            for task in fs::read_dir(entry.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let read = |f: &str| fs::read_to_string(task.path().join(f)).unwrap_or_default();
                let stat = read("stat");
                let state = stat
                    .rsplit_once(')')
                    .map_or("", |(_, r)| r.trim())
                    .get(..1)
                    .unwrap_or("");
                out.push_str(&format!(
                    "  task {} state {state} wchan {}\n{}",
                    task.file_name().to_string_lossy(),
                    read("wchan"),
                    read("stack")
                ));
            }
        }
        out
    }
}

impl Drop for MpiJob {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn mpi_ranks_parked_before_their_agent_heard_of_the_epoch_are_captured() {
    ranks_parked_ahead_of_their_agent_are_captured(Ahead::OfTheRequest);
}

/// The other window: node b's agent has the request and has opened the
/// epoch, but is held (`pause-at:open`) before it takes what its ranks
/// queued; they park right then. Their parks belong to the epoch and must
/// be captured, not answered as left over from an abandoned one.
#[test]
fn mpi_ranks_that_park_while_their_agent_opens_the_epoch_are_captured() {
    ranks_parked_ahead_of_their_agent_are_captured(Ahead::OfTheRun);
}

/// What node b's ranks are ahead of when they park.
#[derive(Clone, Copy, PartialEq)]
enum Ahead {
    /// Node b's agent has not been asked yet.
    OfTheRequest,
    /// Node b's agent opened the epoch, and is held before its run.
    OfTheRun,
}

fn ranks_parked_ahead_of_their_agent_are_captured(ahead: Ahead) {
    use std::os::unix::process::CommandExt;
    if !mpiexec_available() {
        return;
    }
    let program = heat2d();
    let setup = setup();
    let dir = setup.dir.path();
    let marker = dir.display().to_string();
    let input = dir.join("grid.bin");
    assert!(std::process::Command::new(&program)
        .arg("--make-input")
        .arg(&input)
        .args(["--n", "96"])
        .status()
        .unwrap()
        .success());
    let app = |tag: &str, step_ms: &str| -> Vec<String> {
        vec![
            "--n".into(),
            "96".into(),
            "--iters".into(),
            "100".into(),
            "--step-ms".into(),
            step_ms.into(),
            "--input".into(),
            input.display().to_string(),
            "--log".into(),
            dir.join(format!("{tag}.log")).display().to_string(),
            "--output".into(),
            dir.join(format!("{tag}.out")).display().to_string(),
        ]
    };
    let reference = std::process::Command::new("mpiexec")
        .args(["-n", "4"])
        .arg(&program)
        .args(app("ref", "0"))
        .output()
        .unwrap();
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );

    // Two emulated nodes, one agent each, one shared store.
    let coord = FakeCoordinator::new("heat");
    let token_file = coord.token_file(dir);
    let store = dir.join("store");
    let mut agents = Vec::new();
    let mut links = Vec::new();
    for node in ["a", "b"] {
        let node_dir = dir.join(node);
        fs::create_dir_all(&node_dir).unwrap();
        let pending = coord.accept();
        let held: &[(&str, &str)] = if ahead == Ahead::OfTheRun && node == "b" {
            &[("CRYO_FAULT", "pause-at:open:1:1500")]
        } else {
            &[]
        };
        let mut agent = Agent::spawn_node(
            &node_dir,
            &store,
            "heat",
            node,
            &[
                "--coordinator",
                &coord.addr,
                "--token-file",
                token_file.to_str().unwrap(),
                "--copy-budget",
                "32MiB",
            ],
            held,
        );
        agent.wait_ready();
        links.push(pending.join().unwrap());
        agents.push(agent);
    }
    let launch = |tag: &str| {
        let mut cmd = std::process::Command::new("mpiexec");
        cmd.args(["-genv", "CRYO_JOB", "heat"])
            .args(["-genv", "CRYO_TOKEN", coord.token.expose()]);
        for (i, agent) in agents.iter().enumerate() {
            if i > 0 {
                cmd.arg(":");
            }
            cmd.args(["-n", "2", "-env", "CRYO_AGENT_SOCKET"])
                .arg(&agent.socket)
                .arg(&program)
                .args(app(tag, "40"));
        }
        cmd.stdout(fs::File::create(dir.join(format!("{tag}.stdout"))).unwrap())
            .stderr(fs::File::create(dir.join(format!("{tag}.stderr"))).unwrap())
            .process_group(0);
        MpiJob {
            child: Some(cmd.spawn().unwrap()),
            marker: marker.clone(),
        }
    };
    let mut job = launch("run");
    for (link, ranks) in links.iter_mut().zip([[0, 1], [2, 3]]) {
        for rank in ranks {
            link.expect("RankRegistered", is_registered(rank, None));
        }
    }
    wait_until("iteration 30", WAIT, || lines(&dir.join("run.log")) >= 30);

    let checkpoint = CoordinatorToAgent::Checkpoint {
        epoch: 1,
        park_timeout_ms: 30_000,
    };
    if ahead == Ahead::OfTheRequest {
        // Only node a hears of epoch 1. The ranks agree on it among
        // themselves, so node b's ranks park for it before their agent is
        // asked.
        links[0].send(&checkpoint);
        wait_logged(&agents[1], &["rank.parked_early", "epoch=1"]);
        links[1].send(&checkpoint);
    } else {
        // Node b's agent opens the epoch at once and is then held while its
        // ranks, joining on node a's ring, park.
        links[1].send(&checkpoint);
        wait_logged(&agents[1], &["fault.paused", "open"]);
        links[0].send(&checkpoint);
    }
    for (link, ranks) in links.iter_mut().zip([[0, 1], [2, 3]]) {
        for rank in ranks {
            link.expect("Copied", is_copied(1, rank));
            link.expect("Durable", is_durable(1, rank));
        }
    }
    let job_store = agents[0].job_store();
    assert!(job_store
        .verify_manifest(&job_store.commit_epoch(1, 4, CHUNK).unwrap())
        .is_ok());
    for link in &links {
        link.send(&CoordinatorToAgent::Committed { epoch: 1 });
    }
    let at = lines(&dir.join("run.log"));
    wait_until("the job to run past the checkpoint", WAIT, || {
        lines(&dir.join("run.log")) >= at + 3
    });
    assert!(lines(&dir.join("run.log")) < 100, "finished too early");
    job.kill();
    for (link, ranks) in links.iter_mut().zip([[0, 1], [2, 3]]) {
        for rank in ranks {
            link.expect(
                "RankLeft",
                move |m| matches!(m, AgentToCoordinator::RankLeft { rank: r, .. } if *r == rank),
            );
        }
        link.send(&CoordinatorToAgent::ArmRestart { epoch: 1 });
    }
    for agent in &agents {
        wait_logged(agent, &["restart.armed", "epoch=1"]);
    }
    let status = launch("run").wait(&dir.join("run.stderr"), &agents);
    assert!(
        status.success(),
        "restarted job failed: {}",
        fs::read_to_string(dir.join("run.stderr")).unwrap_or_default()
    );
    for (link, ranks) in links.iter_mut().zip([[0, 1], [2, 3]]) {
        for rank in ranks {
            link.expect("RankRegistered after restart", is_registered(rank, Some(1)));
        }
    }
    assert_same_file(&dir.join("run.out"), &dir.join("ref.out"));
    assert_same_file(&dir.join("run.log"), &dir.join("ref.log"));
}
