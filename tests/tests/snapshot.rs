//! The copy-on-write capture end to end: a real agent asks a parked rank for
//! a snapshot, resumes it at once and stores its memory from the snapshot
//! while the rank computes on. Each run ends byte-identical to an
//! uninterrupted one.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_core::protocol::{ControlRequest, ControlResponse};
use cryo_tests::counter::{reference, setup, spec, Setup, STEPS};
use cryo_tests::{assert_same_file, lines, wait_until, Agent, Program, Rank, RankFiles, RankSpec};

/// What the agent logged for one rank's snapshot.
fn snapshot_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("rank.snapshot") && !l.contains("rank.snapshot_"))
        .filter_map(|l| {
            let at = l.find("pid=")? + 4;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// One checkpointed run.
struct Run {
    setup: Setup,
    agent: Agent,
    /// Lines in the rank's log when the checkpoint was committed.
    lines_at_commit: usize,
    /// The step the rank said it was checkpointed after.
    checkpointed_step: u64,
}

/// Runs the counter with `state_mb` of state against an agent started with
/// `agent_args` and `agent_env`, checkpoints it once at line 20 without
/// stopping it, kills it a few lines later, restarts it from the
/// checkpoint and runs it to the end; compares with an uninterrupted run.
fn checkpoint_kill_restart(
    state_mb: u64,
    agent_args: &[&str],
    agent_env: &[(&str, &str)],
    rank_env: &[(&str, &str)],
) -> Run {
    let setup = setup();
    let program = Program::Rust;
    let reference = reference(&setup, &program, 0, state_mb);
    let agent = Agent::start_with_env(setup.dir.path(), "job1", agent_args, agent_env);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    // Slower steps than the other tests: the rank must still be running
    // when the checkpoint, stored after the resume, is committed.
    let spec = RankSpec {
        step_ms: 40,
        ..spec(&program, 0, &agent, state_mb)
    };
    let mut rank = Rank::start_with_env(&spec, &files, rank_env);
    rank.wait_lines(20);
    if agent_args
        .windows(2)
        .any(|w| w == ["--prefault-delay", "0"])
    {
        // Warmed at once: as far as the rank's state, once the agent has
        // seen it (it looks once a second).
        wait_until(
            "the budget to warm for the rank's state",
            Duration::from_secs(20),
            || warm_bytes(&agent) >= state_mb << 20,
        );
    }
    let report = agent.checkpoint();
    assert_eq!(report.ranks.len(), 1);
    let lines_at_commit = lines(&files.log);
    let checkpointed_step = checkpointed_step(&Rank::stderr(&files));
    rank.wait_lines(lines_at_commit + 3);
    rank.kill9();
    assert_eq!(agent.arm_restart(), report.epoch);
    let rank = Rank::start_with_env(&spec, &files, rank_env);
    let status = rank.wait();
    assert!(
        status.success(),
        "restarted run failed: {}",
        Rank::stderr(&files)
    );
    assert!(
        Rank::stderr(&files).contains("restarted from epoch"),
        "{}",
        Rank::stderr(&files)
    );
    assert_eq!(lines(&files.log) as u64, STEPS);
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
    Run {
        setup,
        agent,
        lines_at_commit,
        checkpointed_step,
    }
}

/// The step the rank said it was checkpointed after.
fn checkpointed_step(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("checkpointed epoch"))
        .unwrap_or_else(|| panic!("no checkpoint in the rank's stderr:\n{stderr}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_rank_computes_on_while_its_snapshot_is_stored() {
    // The agent holds off reading the snapshot for 400 ms after the resume:
    // the rank runs about 10 steps meanwhile, rewriting its state. A restart
    // is byte-identical only if what was stored is the state at the park.
    let run = checkpoint_kill_restart(
        64,
        &["--snapshot", "on", "--copy-budget", "8MiB"],
        &[("CRYO_FAULT", "pause-at:snapshot:1:400")],
        &[("CRYO_EXAMPLE_CHILD", "true")],
    );
    let log = run.agent.log_text();
    let pids = snapshot_pids(&log);
    assert_eq!(pids.len(), 1, "{log}");
    // The rank's child is named at the checkpoint; its snapshot, alive
    // when the children are looked for, is the agent's and is not.
    let job = cryo_core::Store::open(run.setup.dir.path().join("store"))
        .and_then(|store| store.existing_job("job1"))
        .unwrap();
    let manifest = job
        .load_manifest(job.latest_committed().unwrap().unwrap())
        .unwrap();
    let children: Vec<&String> = (manifest.ranks[0].warnings.iter())
        .filter(|w| w.starts_with("child process "))
        .collect();
    assert_eq!(children.len(), 1, "{children:?}");
    assert!(
        children[0].contains(" (sleep) of the rank is not saved"),
        "{children:?}"
    );
    assert!(!children[0].contains(&pids[0].to_string()), "{children:?}");
    let resumed = log.find("rank.resumed").unwrap();
    let read = log.find("rank.snapshot_read").unwrap_or(0);
    assert!(
        resumed < read,
        "the rank resumed only after the copy:\n{log}"
    );
    assert!(log.contains("streamed=false"), "{log}");
    // The rank computed on while the snapshot waited (40 ms steps).
    let step = run.checkpointed_step;
    assert!(
        run.lines_at_commit as u64 > step + 5,
        "checkpointed after step {step}, {} lines at the commit",
        run.lines_at_commit
    );
    // The snapshot was killed once stored: at most a zombie until the rank
    // reaps it, and gone once the rank is.
    assert!(!alive(pids[0]), "snapshot {} still runs", pids[0]);
    // An 8 MiB budget bounds the agent's memory as when streaming parked.
    match run.agent.request(&ControlRequest::Status) {
        ControlResponse::Status(status) => assert!(
            status.peak_rss_bytes < 80 << 20,
            "agent peak RSS {} for 64 MiB of state with an 8 MiB budget",
            status.peak_rss_bytes
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn memory_missing_from_the_snapshot_is_copied_while_parked() {
    // The state is MADV_DONTFORK, as RDMA libraries mark what they
    // register: the clone lacks it, so the agent drops the snapshot and
    // copies with the rank parked.
    let run = checkpoint_kill_restart(
        48,
        &["--snapshot", "on"],
        &[],
        &[("CRYO_EXAMPLE_STATE_DONTFORK", "1")],
    );
    let log = run.agent.log_text();
    assert!(log.contains("rank.snapshot_failed"), "{log}");
    assert!(log.contains("lacks memory"), "{log}");
    for pid in snapshot_pids(&log) {
        assert!(!alive(pid), "dropped snapshot {pid} still runs");
    }
    assert!(!log.contains("rank.snapshot_read"), "{log}");
}

#[test]
fn no_snapshot_when_turned_off_or_not_worth_it() {
    // `off`, and `auto` for a copy into a warm budget that holds it: the
    // copy is made parked. (Into a cold budget, `auto` clones: faulting the
    // copy's buffers in would cost the pause more.)
    let warm = ["--copy-budget", "64MiB", "--prefault-delay", "0"];
    for (args, state_mb) in [(&["--snapshot", "off"][..], 48), (&warm[..], 8)] {
        let log = checkpoint_kill_restart(state_mb, args, &[], &[])
            .agent
            .log_text();
        assert!(snapshot_pids(&log).is_empty(), "{args:?}: {log}");
        assert!(!log.contains("rank.snapshot"), "{args:?}: {log}");
    }
}

#[test]
fn a_parked_rank_copies_its_own_memory_unless_told_not_to() {
    // Snapshots off, so the copy is made parked: by the rank itself into
    // the agent's budget by default, by the agent with `--self-copy off`.
    // Either way the restart is byte-identical (checked by the helper).
    for (args, by_rank) in [
        (&["--snapshot", "off"][..], true),
        (&["--snapshot", "off", "--self-copy", "off"][..], false),
    ] {
        let log = checkpoint_kill_restart(48, args, &[], &[]).agent.log_text();
        assert_eq!(log.contains("rank.self_copied"), by_rank, "{args:?}: {log}");
        assert!(!log.contains("rank.self_copy_declined"), "{args:?}: {log}");
    }
}

/// The bytes of the agent's copy budget already faulted in.
fn warm_bytes(agent: &Agent) -> u64 {
    match agent.request(&ControlRequest::Status) {
        ControlResponse::Status(status) => status.copy_budget_warm,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_agent_keeps_warm_what_its_ranks_need_not_its_whole_budget() {
    // A budget of 1 GiB pre-faulted at once, for a rank of 16 MiB: the
    // agent faults in about the rank's state and leaves the rest to the
    // node, and a checkpoint then copies parked into warm memory.
    let setup = setup();
    let program = Program::Rust;
    let agent = Agent::start_with_env(
        setup.dir.path(),
        "job1",
        &["--copy-budget", "1GiB", "--prefault-delay", "0"],
        &[],
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(warm_bytes(&agent), 0, "warmed with no rank to warm for");
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = RankSpec {
        step_ms: 40,
        ..spec(&program, 0, &agent, 16)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(5);
    wait_until(
        "the budget to warm for the rank's state",
        Duration::from_secs(20),
        || warm_bytes(&agent) >= 16 << 20,
    );
    std::thread::sleep(Duration::from_millis(2500));
    let warm = warm_bytes(&agent);
    assert!(
        warm <= 64 << 20,
        "{warm} bytes of a 1 GiB budget warm for a rank of 16 MiB"
    );
    let report = agent.checkpoint();
    assert!(report.ranks[0].copied_bytes >= 16 << 20, "{report:?}");
    let log = agent.log_text();
    assert!(
        snapshot_pids(&log).is_empty(),
        "cloned into a warm budget: {log}"
    );
    rank.kill9();
}

/// Bytes of `pid`'s mappings of its agent's copy budget that are in its
/// page tables.
fn budget_view_rss(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_view = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode path`.
            in_view = line.contains("/memfd:cryo-pool");
        } else if in_view && first == "Rss:" {
            let value = line[first.len()..].trim().trim_end_matches("kB").trim();
            kib += value.parse::<u64>().unwrap_or(0);
        }
    }
    kib * 1024
}

#[test]
fn a_rank_fills_its_view_of_the_budget_before_its_first_checkpoint() {
    // Once the budget is warm for it, the agent tells a running rank where
    // its first parked copy goes, and the rank fills its view of those
    // slots while it computes: the copy then does not fault them in while
    // the rank is parked, as later copies do not. The budget warms as soon
    // as the rank has passed a safe point, not at the end of the pre-fault
    // delay (an hour here).
    let setup = setup();
    let program = Program::Rust;
    let agent = Agent::start_with_env(
        setup.dir.path(),
        "job1",
        &["--copy-budget", "1GiB", "--prefault-delay", "3600"],
        &[],
    );
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = RankSpec {
        step_ms: 40,
        ..spec(&program, 0, &agent, 16)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(5);
    let pid = rank.pid();
    wait_until(
        "the rank to fill its view of its slots before any checkpoint",
        Duration::from_secs(30),
        || budget_view_rss(pid) >= 16 << 20,
    );
    let log = agent.log_text();
    assert!(log.contains("rank.fill_view_early"), "{log}");
    // Its slots, not the budget.
    let filled = budget_view_rss(pid);
    assert!(filled <= 64 << 20, "{filled} bytes of the budget filled");
    let before = lines(&files.log);
    let report = agent.checkpoint();
    assert!(report.ranks[0].copied_bytes >= 16 << 20, "{report:?}");
    assert!(snapshot_pids(&agent.log_text()).is_empty());
    rank.wait_lines(before + 2);
    rank.kill9();
}

#[test]
fn auto_clones_into_a_cold_budget_then_warms_it_for_the_next_checkpoint() {
    // A budget the idle pre-fault does not reach during the test: the first
    // checkpoint finds it cold. `auto` clones the rank rather than fault the
    // budget in while it heads for its safe point (which took a core from
    // it) or while it is parked. Once that epoch is stored the agent warms
    // what it expects to copy, and the next checkpoint copies parked.
    let setup = setup();
    let program = Program::Rust;
    let reference = reference(&setup, &program, 0, 48);
    let agent = Agent::start_with_env(
        setup.dir.path(),
        "job1",
        &[
            "--copy-budget",
            "64MiB",
            "--prefault-delay",
            "3600",
            "--prefault-early",
            "off",
        ],
        &[],
    );
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    // Long steps, and the request right after a step's safe point: the
    // rank parks about 300 ms later.
    let spec = RankSpec {
        step_ms: 300,
        ..spec(&program, 0, &agent, 48)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(4);
    std::thread::scope(|scope| {
        let first = scope.spawn(|| agent.checkpoint());
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            warm_bytes(&agent),
            0,
            "the budget was faulted in while the rank headed for its safe point"
        );
        first.join().unwrap();
    });
    let log = agent.log_text();
    assert_eq!(snapshot_pids(&log).len(), 1, "{log}");
    // The slots of the next copy were named as the rank resumed, for it to
    // fill its view of them while it computes.
    assert!(log.contains("rank.fill_view"), "{log}");
    wait_until(
        "the budget to warm for the next checkpoint",
        Duration::from_secs(20),
        || warm_bytes(&agent) >= 48 << 20,
    );
    rank.wait_lines(lines(&files.log) + 1);
    let second = agent.checkpoint();
    assert!(second.ranks[0].copied_bytes > 0, "{second:?}");
    let log = agent.log_text();
    assert_eq!(
        snapshot_pids(&log).len(),
        1,
        "the second checkpoint cloned again:\n{log}"
    );
    // A restart from it is byte-identical.
    rank.kill9();
    assert_eq!(agent.arm_restart(), second.epoch);
    let rank = Rank::start(&spec, &files);
    let status = rank.wait();
    assert!(status.success(), "restart failed: {}", Rank::stderr(&files));
    assert_eq!(lines(&files.log) as u64, STEPS);
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
}

#[test]
fn auto_takes_a_snapshot_of_a_copy_larger_than_the_budget_and_reaps_it() {
    // Parked, 48 MiB would stream through 8 MiB with the rank waiting.
    let log = checkpoint_kill_restart(48, &["--copy-budget", "8MiB"], &[], &[])
        .agent
        .log_text();
    let pids = snapshot_pids(&log);
    assert_eq!(pids.len(), 1, "{log}");
    // Every rank process is gone: so is its snapshot (no orphan left
    // holding the job's memory).
    wait_until("the snapshot to exit", Duration::from_secs(5), || {
        !alive(pids[0])
    });
}

#[test]
fn a_rank_that_finalizes_while_its_snapshot_is_read_waits_for_it() {
    // The checkpoint comes three steps before the end, and the agent holds
    // off reading the snapshot for 800 ms: the rank reaches cryo_finalize
    // meanwhile, and must not say goodbye (and exit, ending a Slurm step
    // and every process in it) before its snapshot is read.
    let setup = setup();
    let program = Program::Rust;
    let reference = reference(&setup, &program, 0, 48);
    let agent = Agent::start_with_env(
        setup.dir.path(),
        "job1",
        &["--snapshot", "on"],
        &[("CRYO_FAULT", "pause-at:snapshot:1:800")],
    );
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = RankSpec {
        step_ms: 40,
        ..spec(&program, 0, &agent, 48)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(usize::try_from(STEPS).unwrap() - 4);
    let report = agent.checkpoint();
    assert!(report.committed);
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
    let log = agent.log_text();
    let read = log.find("rank.snapshot_read");
    let left = log.find("rank.left");
    assert!(
        read.is_some() && left.is_some() && read < left,
        "the rank left before its snapshot was read:\n{log}"
    );
    // And the checkpoint restarts to the same end.
    assert_eq!(agent.arm_restart(), report.epoch);
    let rank = Rank::start(&spec, &files);
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
}
