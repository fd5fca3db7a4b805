//! Nodes that are separate hosts: jobs across a cluster of network
//! namespaces (`cryo_tests::netns`), each node with its own host name,
//! address and network stack, MPI between them over TCP through a bridge,
//! and faults made of real lost packets.
//!
//! Each test builds its own cluster (`head`, where `cryo run` runs, and the
//! nodes) and tears it down when it ends, passed or failed. The tests need
//! root; `CRYO_SKIP_NETNS=1` skips them knowingly where there is none.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

use cryo_tests::heat2d::{
    built, c_heat2d, compile_mpich_program, compile_mpich_program_with, openmpi_available, Case,
    Heat2dFiles, Mpi, Program,
};
use cryo_tests::netns::{self, Cluster, Site};
use cryo_tests::{lines, output_text, state, wait_until};

/// How long the ranks, proxies and agents of a finished job may take to
/// end on their hosts (a launcher stopped by `--finalize-timeout` leaves
/// its remote proxies to notice the lost connection).
const LEFTOVER_GRACE: Duration = Duration::from_secs(20);

/// One cluster at a time: the machine has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn cluster(nodes: &[&str]) -> Option<(std::sync::MutexGuard<'static, ()>, Rc<Cluster>)> {
    if !netns::available() {
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Some((guard, Rc::new(Cluster::up(nodes))))
}

/// The C heat2d (MPICH), with `cryo` run in the cluster's head node.
fn heat2d_case(cluster: &Rc<Cluster>) -> Case {
    let mut case = Case::mpich(c_heat2d(Mpi::Mpich));
    case.site = Site::Cluster(Rc::clone(cluster));
    case
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The nodes whose agents joined, in the order `cryo run` logged them.
fn joined_nodes(log: &str) -> Vec<String> {
    plain(log)
        .lines()
        .filter(|l| l.contains("agent.joined"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("node="))
                .map(|n| n.trim_matches('"').to_owned())
        })
        .collect()
}

/// `cryo checkpoint heat` commits epoch 1, with the agents of `nodes`.
fn checkpoint_on(case: &Case, job: &cryo_tests::heat2d::Job, nodes: &[&str]) {
    let out = case.checkpoint("heat");
    let said = output_text(&out);
    assert!(
        out.status.success() && said.contains("epoch 1 committed"),
        "cryo checkpoint failed: {said}\n{}",
        job.log_text()
    );
    // The MPI library's connections between the hosts are its own, made
    // again by the restart's MPI_Init: not the application's sockets.
    assert!(
        !said.contains("will not be restored: socket"),
        "{said}\n{}",
        job.log_text()
    );
    let mut joined = joined_nodes(&job.log_text());
    joined.sort();
    assert_eq!(joined, nodes, "{}", job.log_text());
}

/// heat2d on 4 ranks on hosts n0 and n1: MPI crosses the bridge, the
/// checkpoint commits, every process of the job is killed, and `cryo
/// restart --hosts n2,n3,n4` finishes byte-identical to a run without cryo.
#[test]
fn heat2d_checkpointed_on_two_hosts_restarts_on_three_others() {
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3", "n4"]) else {
        return;
    };
    let case = heat2d_case(&cluster);
    case.reference(4);
    cluster.count_traffic("n0", "n1");
    let job = case.start("heat", "n0:2,n1:2", 4, &[], 40);
    wait_until("iteration 45", Duration::from_secs(90), || {
        lines(&case.path("run.log")) >= 45
    });
    checkpoint_on(&case, &job, &["n0", "n1"]);
    // Ranks 1 and 2 are halo neighbours on different hosts: each
    // iteration's row of 96 doubles went from n0 to n1 over the bridge,
    // not through shared memory.
    let sent = cluster.traffic("n0");
    eprintln!("n0 sent {sent} bytes to n1");
    assert!(
        sent > 45 * 8 * 96,
        "n0 sent only {sent} bytes to n1: MPI did not cross the network"
    );
    assert!(lines(&case.path("run.log")) < Heat2dFiles::ITERS);
    for node in ["n0", "n1", netns::HEAD] {
        cluster.kill_node(node);
    }
    drop(job);

    let out = case.restart("heat", "n2,n3,n4", &[]);
    let said = output_text(&out);
    assert!(out.status.success(), "restart on n2,n3,n4 failed: {said}");
    assert!(
        said.contains("restarting job \"heat\" from epoch 1"),
        "{said}"
    );
    let mut joined = joined_nodes(&said);
    joined.sort();
    assert_eq!(joined, ["n2", "n3", "n4"], "{said}");
    case.assert_matches_reference();
    cluster.assert_nothing_left(&["n2", "n3", "n4", netns::HEAD], LEFTOVER_GRACE);
}

/// The environment of every running process whose executable is `exe`.
fn environments_of(exe: &std::path::Path) -> Vec<String> {
    let exe = std::fs::canonicalize(exe).unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = entry.path();
        if std::fs::read_link(dir.join("exe")).is_ok_and(|e| e == exe) {
            if let Ok(env) = std::fs::read(dir.join("environ")) {
                found.push(String::from_utf8_lossy(&env).replace('\0', "\n"));
            }
        }
    }
    found
}

/// heat2d built with Open MPI, 4 ranks on hosts n0 and n1, started by
/// `mpirun.openmpi` through an ssh stand-in that gives each remote command
/// a fresh environment, as sshd does: the ranks and agents there know their
/// job, token and agent, and carry the user's settings, only because `cryo
/// run` names them to the launcher. Checkpointed, killed, and restarted on
/// n2 and n3: byte-identical to an uninterrupted Open MPI run.
#[test]
fn heat2d_with_open_mpi_over_ssh_restarts_on_other_hosts() {
    if !openmpi_available() {
        return;
    }
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3"]) else {
        return;
    };
    let mut case = Case::new(Program::compiled(c_heat2d(Mpi::OpenMpi), Mpi::OpenMpi));
    case.site = Site::Cluster(Rc::clone(&cluster));
    case.reference(4);
    let job = case.start_with_env(
        "heat",
        "n0:2,n1:2",
        4,
        &[],
        40,
        &[
            ("CRYO_RESTORE_THREADS", "2"),
            ("CRYO_EXPORT", "HEAT_CARRIED"),
            ("HEAT_CARRIED", "yes"),
            ("HEAT_LEFT_BEHIND", "yes"),
        ],
    );
    wait_until("iteration 45", Duration::from_secs(120), || {
        lines(&case.path("run.log")) >= 45
    });
    let ranks = environments_of(&case.program.exe);
    assert_eq!(ranks.len(), 4, "{}", job.log_text());
    for env in &ranks {
        for carried in [
            "CRYO_RESTORE_THREADS=2",
            "HEAT_CARRIED=yes",
            "CRYO_JOB=heat",
        ] {
            assert!(
                env.lines().any(|l| l == carried),
                "{carried} missing:\n{env}"
            );
        }
        // The stand-in drops what no launcher carries, as sshd would.
        assert!(!env.contains("HEAT_LEFT_BEHIND"), "{env}");
    }
    checkpoint_on(&case, &job, &["n0", "n1"]);
    assert!(lines(&case.path("run.log")) < Heat2dFiles::ITERS);
    for node in ["n0", "n1", netns::HEAD] {
        cluster.kill_node(node);
    }
    drop(job);

    let out = case.restart("heat", "n2:2,n3:2", &[]);
    let said = output_text(&out);
    assert!(out.status.success(), "restart on n2,n3 failed: {said}");
    assert!(said.contains("mpirun.openmpi"), "{said}");
    let mut joined = joined_nodes(&said);
    joined.sort();
    assert_eq!(joined, ["n2", "n3"], "{said}");
    case.assert_matches_reference();
    cluster.assert_nothing_left(&["n2", "n3", netns::HEAD], LEFTOVER_GRACE);
}

/// The state suite's `all` program (every open-file shape in one job), on
/// 3 ranks on 2 hosts, checkpointed, killed, and restarted on 3 other
/// hosts: the output folder is byte-identical to the reference's.
#[test]
fn open_file_state_survives_a_restart_on_other_hosts() {
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3", "n4"]) else {
        return;
    };
    let case = state::Case::new("all").on(Site::Cluster(Rc::clone(&cluster)));
    let survived = state::survives_on(
        case,
        "all",
        state::ALL_ITERS,
        3,
        ("n0:2,n1:1", "n2,n3,n4"),
        [&[], &[]],
    );
    let mut joined = joined_nodes(&survived.restart);
    joined.sort();
    assert_eq!(joined, ["n2", "n3", "n4"], "{}", survived.restart);
    cluster.assert_nothing_left(&["n2", "n3", "n4", netns::HEAD], LEFTOVER_GRACE);
}

/// A job stuck in `MPI_Finalize` on two hosts: `--finalize-timeout` stops
/// its launcher, the job's output ends with its own lines, and nothing of
/// it (ranks, proxies, agents) is left on either host.
#[test]
fn a_job_stuck_in_finalize_on_two_hosts_leaves_nothing_behind() {
    let Some((_guard, cluster)) = cluster(&["n0", "n1"]) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("cryo-netns-finalize-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("hangs_in_finalize");
    compile_mpich_program("tests/programs/hangs_in_finalize.c", &program);
    let mut run = Command::new(built().join("cryo"));
    run.env("CRYO_STORE", dir.path().join("store"))
        .args(["run", "--job", "fin", "--hosts", "n0:1,n1:1", "-n", "2"])
        .args(["--finalize-timeout", "2", "--scratch"])
        .arg(dir.path().join("scratch"))
        .arg("--")
        .arg(&program)
        .current_dir(dir.path())
        .stdin(Stdio::null());
    let out = Site::Cluster(Rc::clone(&cluster))
        .cryo(run)
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["rank 0 done", "rank 1 done"], "{said}");
    cluster.assert_nothing_left(&["n0", "n1", netns::HEAD], LEFTOVER_GRACE);
}

/// A preemption of heat2d on hosts n0 and n1 (`cryo preempt`): once the
/// checkpoint is durable `cryo run` stops the launcher at once, so nothing
/// of the job is left on either host (the remote ranks go with their
/// proxy's lost connection), the job's stdout holds no launcher banner, and
/// the restart on n2 and n3 finishes byte-identical.
#[test]
fn a_preempted_job_on_two_hosts_leaves_nothing_behind_and_restarts_elsewhere() {
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3"]) else {
        return;
    };
    let case = heat2d_case(&cluster);
    case.reference(4);
    let mut job = case.start("heat", "n0:2,n1:2", 4, &[], 40);
    wait_until("iteration 30", Duration::from_secs(90), || {
        lines(&case.path("run.log")) >= 30
    });
    let out = case.cryo().args(["preempt", "heat"]).output().unwrap();
    assert!(
        output_text(&out).contains("epoch 1 committed"),
        "{}\n{}",
        output_text(&out),
        job.log_text()
    );
    let status = job.wait();
    assert_eq!(status.code(), Some(75), "{}", job.log_text());
    assert!(lines(&case.path("run.log")) < Heat2dFiles::ITERS);
    let stdout = std::fs::read_to_string(case.path("heat.stdout")).unwrap();
    assert!(!stdout.contains("TERMINATION"), "{stdout}");
    cluster.assert_nothing_left(&["n0", "n1", netns::HEAD], LEFTOVER_GRACE);

    let out = case.restart("heat", "n2,n3", &[]);
    let said = output_text(&out);
    assert!(out.status.success(), "restart on n2,n3 failed: {said}");
    case.assert_matches_reference();
}

/// A log each host keeps at one path in its own memory (a tmpfs scratch),
/// written by its ranks: the checkpoint names the path; a restart that
/// would put ranks of both hosts on one host is refused before anything
/// starts, naming the ranks and the path; a restart on two hosts (the
/// refused one among them) brings each host's log back whole, every line
/// of its rank once; and so does one on the old hosts with the ranks
/// swapped, each rank finding the other's log at the path.
#[test]
fn a_log_of_each_hosts_own_keeps_their_ranks_apart_at_a_restart() {
    const STEPS: u64 = 400;
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3"]) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("cryo-netns-clash-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("omp_stencil");
    compile_mpich_program_with("tests/programs/omp_stencil.c", &["-fopenmp"], &program);
    let node_log = cluster.node_scratch().join("node.log");
    let site = Site::Cluster(Rc::clone(&cluster));
    let cryo = |args: &[&str]| {
        let mut cmd = Command::new(built().join("cryo"));
        cmd.env("CRYO_STORE", dir.path().join("store"))
            .env("OMP_NUM_THREADS", "1")
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null());
        site.cryo(cmd)
    };
    let mut run = cryo(&[
        "run",
        "--job",
        "clash",
        "--hosts",
        "n0:1,n1:1",
        "-n",
        "2",
        "--",
    ]);
    run.arg(&program)
        .args([&STEPS.to_string(), "20", "-", "-"])
        .arg(&node_log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap());
    let mut job = run.spawn().unwrap();
    let run_log = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    wait_until("20 steps logged", Duration::from_secs(90), || {
        lines(&dir.path().join("omp-0.log")) >= 20
    });
    let out = cryo(&["checkpoint", "clash"]).output().unwrap();
    let said = plain(&output_text(&out));
    assert!(out.status.success(), "{said}\n{}", run_log());
    assert!(
        said.contains(&format!(
            "{} is a different file on node n0 (rank 0), node n1 (rank 1), each on the node's own \
             filesystem",
            node_log.display()
        )),
        "the checkpoint must name the path:\n{said}"
    );
    for node in ["n0", "n1", netns::HEAD] {
        cluster.kill_node(node);
    }
    let _ = job.kill();
    let _ = job.wait();
    assert!(lines(&dir.path().join("omp-0.log")) < usize::try_from(STEPS).unwrap());

    // Both ranks on n2: refused before anything starts, naming them.
    let out = cryo(&["restart", "clash", "--hosts", "n2:2"])
        .output()
        .unwrap();
    let said = plain(&output_text(&out));
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "ranks 0 (on node n0 at the checkpoint) and 1 (on node n1) held different files at {} \
             on their nodes' own filesystems; placed together on node n2",
            node_log.display()
        )) && !said.contains("agent"),
        "the refusal must name the ranks and the path, and start nothing:\n{said}"
    );
    cluster.assert_nothing_left(&["n2", netns::HEAD], LEFTOVER_GRACE);

    // On two hosts, n2 among them, each host's log comes back and goes on.
    let out = cryo(&["restart", "clash", "--hosts", "n2:1,n3:1"])
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "restart on n2,n3 failed: {said}");
    let log_of = |rank: u64| -> String {
        (1..=STEPS)
            .map(|step| format!("rank {rank} step {step}\n"))
            .collect()
    };
    let mut logs: Vec<String> = ["n2", "n3"]
        .iter()
        .map(|node| std::fs::read_to_string(cluster.scratch_of(node).join("node.log")).unwrap())
        .collect();
    logs.sort();
    assert!(
        logs == [log_of(0), log_of(1)],
        "each host's log must hold its rank's every step once:\n{}\n{}\n{said}",
        logs[0],
        logs[1]
    );
    cluster.assert_nothing_left(&["n2", "n3", netns::HEAD], LEFTOVER_GRACE);

    // On the old hosts, the ranks swapped: each finds the other's log at
    // the path and puts its own back over it.
    let out = cryo(&["restart", "clash", "--hosts", "n1:1,n0:1"])
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "restart on n1,n0 failed: {said}");
    for (node, rank) in [("n1", 0), ("n0", 1)] {
        let log = std::fs::read_to_string(cluster.scratch_of(node).join("node.log")).unwrap();
        assert!(
            log == log_of(rank),
            "{node}'s log must now hold rank {rank}'s every step once:\n{log}\n{said}"
        );
    }
    cluster.assert_nothing_left(&["n0", "n1", netns::HEAD], LEFTOVER_GRACE);
}

/// Not a test: brings a cluster up and holds it for `CRYO_NETNS_HOLD`
/// seconds (default 600), printing how to enter its nodes, for looking
/// around by hand: `cargo test -p cryo-tests --test netns -- --ignored
/// --nocapture hold_a_cluster`.
#[test]
#[ignore = "holds a cluster for inspection by hand"]
fn hold_a_cluster() {
    let Some((_guard, cluster)) = cluster(&["n0", "n1", "n2", "n3"]) else {
        return;
    };
    let secs: u64 = std::env::var("CRYO_NETNS_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let env: Vec<String> = cluster
        .mpi_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "cluster up for {secs} s: {} NODE COMMAND enters a node (nodes: {}); mpiexec there needs {}",
        cluster.enter_script().display(),
        cluster
            .nodes()
            .iter()
            .map(|n| format!("{} {}", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", "),
        env.join(" ")
    );
    std::thread::sleep(Duration::from_secs(secs));
}
