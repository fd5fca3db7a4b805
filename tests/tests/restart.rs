//! End to end on one node: real `cryo-agent`, real example ranks (Rust and
//! C), real files. Each checkpointed run must end byte-identical (log and
//! final state) to an uninterrupted run of the same program.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use cryo_core::format::manifest::{FdRestore, RegionKind};
use cryo_core::protocol::{AbortReason, BusyPolicy, Completion, ControlRequest, ControlResponse};
use cryo_tests::counter::{reference, setup, spec, Setup, STEPS};
use cryo_tests::{
    assert_same_file, c_counter, c_counter_static, checkpoint_frozen, lines, wait_until, Agent,
    Program, Rank, RankFiles, RankSpec,
};

/// Runs `program` as rank 0 with a checkpoint → kill -9 → restart cycle at
/// each of `at` log lines, then to the end; compares with a reference.
fn cycles(program: &Program, at: &[usize], state_mb: u64, agent_args: &[&str]) -> (Setup, Agent) {
    let setup = setup();
    let reference = reference(&setup, program, 0, state_mb);
    let agent = Agent::start(setup.dir.path(), "job1", agent_args);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = spec(program, 0, &agent, state_mb);
    let mut rank = Rank::start(&spec, &files);
    for (cycle, &lines_at) in at.iter().enumerate() {
        rank.wait_lines(lines_at);
        let (report, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
        assert_eq!(report.ranks.len(), 1);
        let saved_lines = lines(&files.log);
        drop(frozen);
        // Let the rank run past the checkpoint, so the restart has output
        // to cut back.
        rank.wait_lines(saved_lines + 3);
        rank.kill9();
        let epoch = agent.arm_restart();
        assert_eq!(epoch, report.epoch, "cycle {cycle}");
        rank = Rank::start(&spec, &files);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !Rank::stderr(&files).contains("restarted from epoch") {
            assert!(
                std::time::Instant::now() < deadline,
                "cycle {cycle}: the rank did not restart within 20 s; its stderr:\n{}\nthe agent's log:\n{}",
                Rank::stderr(&files),
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = rank.wait();
    assert!(
        status.success(),
        "final run failed: {}",
        Rank::stderr(&files)
    );
    assert_eq!(lines(&files.log), STEPS as usize);
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
    (setup, agent)
}

#[test]
fn rust_checkpoint_kill_restart_is_byte_identical() {
    let (_setup, agent) = cycles(&Program::Rust, &[50], 8, &["--copy-budget", "64MiB"]);
    // What the manifest says about the rank's fds, mappings and regions.
    let job = agent.job_store();
    let manifest = job.load_manifest(1).unwrap();
    let rank = &manifest.ranks[0];
    let log = rank
        .fds
        .iter()
        .find(|f| f.path.ends_with("run-0.log"))
        .expect("log fd recorded");
    assert_eq!(log.restore, FdRestore::Restore);
    assert_eq!(log.offset, log.size_at_checkpoint);
    for fd in 0..=2 {
        let std = rank
            .fds
            .iter()
            .find(|f| f.fd == fd)
            .expect("standard stream recorded");
        assert!(
            matches!(&std.restore, FdRestore::NotOurs(why) if why.contains("standard")),
            "{std:?}"
        );
    }
    let runtime: Vec<_> = rank
        .fds
        .iter()
        .filter(|f| matches!(&f.restore, FdRestore::NotOurs(why) if why == "cryo runtime"))
        .collect();
    assert_eq!(
        runtime.len(),
        3,
        "socket, control page and write tracker: {:?}",
        rank.fds
    );
    assert!(
        runtime.iter().any(|f| f.path.contains("userfaultfd")),
        "{runtime:?}"
    );
    let kinds: Vec<(&str, &RegionKind)> = rank
        .regions
        .iter()
        .map(|r| (r.name.as_str(), &r.kind))
        .collect();
    assert!(matches!(kinds[0], ("state", RegionKind::Anonymous)));
    assert!(matches!(kinds[1], ("input", RegionKind::FileShared { .. })));
    assert!(matches!(kinds[2], ("meta", RegionKind::Protected)));
    assert!(rank
        .mappings
        .iter()
        .any(|m| m.region.as_deref() == Some("state")));
    assert!(agent.log_text().contains("restart.done"));
}

/// A buffer the program registers on a fresh start only is named after a
/// restart, at the rank's first safe point and in the next checkpoint,
/// since its saved contents are not back.
#[test]
fn a_region_not_registered_again_after_a_restart_is_named() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "unclaimed", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = spec(&Program::Rust, 0, &agent, 4);
    let env = [("CRYO_EXAMPLE_FRESH_ONLY_REGION", "1")];
    let mut rank = Rank::start_with_env(&spec, &files, &env);
    rank.wait_lines(20);
    let (report, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    drop(frozen);
    let first = agent.job_store().load_manifest(report.epoch).unwrap();
    assert!(first.ranks[0]
        .regions
        .iter()
        .any(|r| r.name == "fresh-only"));
    assert!(
        first.ranks[0].warnings.is_empty(),
        "{:?}",
        first.ranks[0].warnings
    );
    rank.kill9();
    agent.arm_restart();
    let rank = Rank::start_with_env(&spec, &files, &env);
    let named = "region 'fresh-only' (8192 bytes) of epoch 1 has not been registered again";
    wait_until(
        "the restarted rank names the region",
        Duration::from_secs(20),
        || Rank::stderr(&files).contains(named),
    );
    assert!(
        Rank::stderr(&files).contains("WARNING: at its first safe point"),
        "{}",
        Rank::stderr(&files)
    );
    let (second, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    drop(frozen);
    let manifest = agent.job_store().load_manifest(second.epoch).unwrap();
    let warnings = &manifest.ranks[0].warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(named) && w.ends_with("nor in this checkpoint")),
        "{warnings:?}"
    );
    assert!(!manifest.ranks[0]
        .regions
        .iter()
        .any(|r| r.name == "fresh-only"));
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
}

#[test]
fn three_checkpoint_kill_restart_cycles_in_one_run() {
    cycles(
        &Program::Rust,
        &[25, 50, 75],
        8,
        &["--copy-budget", "64MiB"],
    );
}

/// `--zstd-level` (`CRYO_ZSTD_LEVEL`): 0 stores chunks raw, a fast level
/// still compresses; either way the restart is byte-identical.
#[test]
fn chunks_stored_raw_or_at_a_fast_level_restart_byte_identical() {
    let ratio = |level: &str| {
        let args = ["--copy-budget", "64MiB", &format!("--zstd-level={level}")];
        let (_setup, agent) = cycles(&Program::Rust, &[50], 8, &args);
        agent.job_store().summarize(1).unwrap().compression_ratio()
    };
    let raw = ratio("0");
    assert!(raw <= 1.0, "level 0 must store chunks raw: ratio {raw}");
    let fast = ratio("-3");
    assert!(fast > 1.5, "a fast level must still compress: ratio {fast}");
}

#[test]
fn c_example_checkpoint_kill_restart_is_byte_identical() {
    let Some(path) = c_counter() else { return };
    cycles(&Program::C(path), &[50], 8, &["--copy-budget", "64MiB"]);
}

#[test]
fn c_example_linked_statically_is_restartable() {
    let Some(path) = c_counter_static() else {
        return;
    };
    cycles(&Program::C(path), &[30], 2, &["--copy-budget", "16MiB"]);
}

#[test]
fn state_over_the_copy_budget_is_streamed_with_bounded_memory() {
    // Parked streaming: the path without snapshots (tests/snapshot.rs has
    // the same state through a snapshot).
    let (_setup, agent) = cycles(
        &Program::Rust,
        &[50],
        96,
        &["--copy-budget", "8MiB", "--snapshot", "off"],
    );
    match agent.request(&ControlRequest::Status) {
        ControlResponse::Status(status) => {
            assert_eq!(status.copy_budget, 8 << 20);
            assert!(
                status.peak_rss_bytes < 80 << 20,
                "agent peak RSS {} for 96 MiB of state with an 8 MiB budget",
                status.peak_rss_bytes
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        agent.log_text().contains("streamed=true"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn four_ranks_checkpointed_in_parallel() {
    let setup = setup();
    let program = Program::Rust;
    let refs: Vec<RankFiles> = (0..4).map(|r| reference(&setup, &program, r, 8)).collect();
    let agent = Agent::start(
        setup.dir.path(),
        "job4",
        &["--copy-budget", "128MiB", "--ranks", "4"],
    );
    let files: Vec<RankFiles> = (0..4)
        .map(|r| RankFiles::new(setup.dir.path(), &format!("run-{r}"), &setup.input))
        .collect();
    let specs: Vec<RankSpec<'_>> = (0..4).map(|r| spec(&program, r, &agent, 8)).collect();
    let mut ranks: Vec<Rank> = (0..4).map(|r| Rank::start(&specs[r], &files[r])).collect();
    for rank in &mut ranks {
        rank.wait_lines(40);
    }
    agent.wait_ranks(4);
    let all: Vec<&Rank> = ranks.iter().collect();
    let (report, frozen) = checkpoint_frozen(&all, || agent.checkpoint());
    assert_eq!(
        report.ranks.iter().map(|r| r.rank).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let saved: Vec<usize> = files.iter().map(|f| lines(&f.log)).collect();
    drop(frozen);
    for (rank, saved) in ranks.iter_mut().zip(saved) {
        rank.wait_lines(saved + 2);
    }
    for rank in ranks {
        rank.kill9();
    }
    agent.arm_restart();
    let restarted: Vec<Rank> = (0..4).map(|r| Rank::start(&specs[r], &files[r])).collect();
    for (r, rank) in restarted.into_iter().enumerate() {
        let status = rank.wait();
        assert!(status.success(), "rank {r}: {}", Rank::stderr(&files[r]));
        assert!(Rank::stderr(&files[r]).contains("restarted from epoch"));
        assert_same_file(&files[r].log, &refs[r].log);
        assert_same_file(&files[r].final_state, &refs[r].final_state);
    }
}

#[test]
fn second_checkpoint_writes_only_changed_chunks() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "inc", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    // Slow steps, so that few steps pass between the two checkpoints.
    let spec = RankSpec {
        step_ms: 100,
        ..spec(&program, 0, &agent, 32)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(5);
    let before_first = lines(&files.log);
    let first = agent.checkpoint();
    rank.wait_lines(lines(&files.log) + 2);
    let second = agent.checkpoint();
    let after_second = lines(&files.log);
    rank.kill9();
    // 32 MiB + a header page = 33 chunks, the input 1, the protected buffer 1.
    assert_eq!(first.stats.chunks, 35);
    assert_eq!(first.stats.new_chunks, 35, "{:?}", first.stats);
    // Each step rewrites one 256 KiB block (a quarter of a chunk; blocks
    // start after the header page, so a run of them may straddle one more
    // chunk), plus the header chunk and the protected buffer.
    let steps = (after_second - before_first) as u64;
    assert_eq!(second.stats.chunks, 35);
    assert!(
        second.stats.new_chunks <= steps / 4 + 4,
        "second checkpoint wrote {} new chunks after at most {steps} steps",
        second.stats.new_chunks
    );
    assert!(
        second.stats.new_raw_bytes * 2 < first.stats.new_raw_bytes,
        "{:?} vs {:?}",
        second.stats,
        first.stats
    );
}

/// Write tracking: after the first capture (and a forced full one), each
/// checkpoint copies only the chunks the rank wrote since the previous one;
/// a restart from the last of a chain of such checkpoints must still end
/// byte-identical. Missing a single written page would change the final
/// state.
#[test]
fn incremental_checkpoints_copy_only_written_chunks_and_restore_exactly() {
    incremental_chain(false);
}

/// The same with the state in a heap buffer registered with
/// `cryo_protect`, as a code whose arrays live in its own structures is
/// ported: the buffer is write-tracked like a region (its pages, shared
/// with other heap data, may only look written more often).
#[test]
fn protected_buffers_are_write_tracked_like_regions() {
    incremental_chain(true);
}

fn incremental_chain(protected: bool) {
    let env: &[(&str, &str)] = if protected {
        &[("CRYO_EXAMPLE_PROTECTED_STATE", "true")]
    } else {
        &[]
    };
    let setup = setup();
    let state_mb = 32;
    let program = Program::Rust;
    let reference = reference(&setup, &program, 0, state_mb);
    let agent = Agent::start(setup.dir.path(), "dirty", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let spec = RankSpec {
        steps: STEPS,
        ..spec(&program, 0, &agent, state_mb)
    };
    let mut rank = Rank::start_with_env(&spec, &files, env);
    let checkpoint = |full: bool| match agent.request(&ControlRequest::Checkpoint {
        full,
        epoch: None,
        if_busy: BusyPolicy::Wait,
        until: Completion::Committed,
    }) {
        ControlResponse::Checkpoint(report) => report,
        other => panic!("{other:?}"),
    };
    // Each checkpoint stops the rank when it reports the capture and the
    // next lets it go, so the steps between two captures are the ones
    // counted here, however long each commit takes.
    rank.wait_lines(10);
    let (first, frozen) = checkpoint_frozen(&[&rank], || checkpoint(false));
    let mut before = lines(&files.log);
    drop(frozen);
    rank.wait_lines(before + 5);
    let (forced, frozen) = checkpoint_frozen(&[&rank], || checkpoint(true));
    before = lines(&files.log);
    drop(frozen);
    let all = first.ranks[0].bytes;
    assert_eq!(
        first.ranks[0].copied_bytes, all,
        "the first capture copies everything"
    );
    assert_eq!(
        forced.ranks[0].copied_bytes, all,
        "a full capture copies everything"
    );
    let mut copied = Vec::new();
    for _ in 0..2 {
        rank.wait_lines(before + 5);
        let (report, frozen) = checkpoint_frozen(&[&rank], || checkpoint(false));
        let at = lines(&files.log);
        drop(frozen);
        let steps = (at - before) as u64;
        before = at;
        let r = &report.ranks[0];
        // Each step writes one 256 KiB block of the state (and its header
        // page) and the small protected buffer.
        let bound = (steps / 4 + 4) << 20;
        assert!(
            r.copied_bytes <= bound && r.copied_bytes < all / 3,
            "copied {} of {all} bytes after about {steps} steps (bound {bound})",
            r.copied_bytes
        );
        assert_eq!(
            report.stats.raw_bytes, first.stats.raw_bytes,
            "every chunk is in the manifest"
        );
        copied.push(r.copied_bytes);
    }
    rank.wait_lines(before + 3);
    rank.kill9();
    let epoch = agent.arm_restart();
    assert_eq!(epoch, 4);
    let job = agent.job_store();
    assert!(job
        .verify_manifest(&job.load_manifest(epoch).unwrap())
        .is_ok());
    let rank = Rank::start_with_env(&spec, &files, env);
    let status = rank.wait();
    assert!(status.success(), "{}", Rank::stderr(&files));
    assert!(Rank::stderr(&files).contains("restarted from epoch 4"));
    assert_eq!(lines(&files.log), STEPS as usize);
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
    assert!(
        copied.iter().all(|c| *c > 0),
        "the state changed: {copied:?}"
    );
}

#[test]
fn restart_is_refused_clearly_when_a_file_vanished() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "gone", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    let spec = spec(&program, 0, &agent, 8);
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(20);
    agent.checkpoint();
    rank.kill9();
    fs::remove_file(&files.log).unwrap();
    agent.arm_restart();
    let status = Rank::run(&spec, &files);
    assert!(!status.success());
    let err = Rank::stderr(&files);
    assert!(
        err.contains("vanished")
            && err.contains(&files.log.display().to_string())
            && err.contains("rank 0"),
        "{err}"
    );
    assert!(
        !files.log.exists(),
        "a refused restart must not re-create the file"
    );
    wait_until(
        "restart.failed in the agent log",
        Duration::from_secs(10),
        || agent.log_text().contains("restart.failed"),
    );
}

#[test]
fn restart_is_refused_when_a_file_shrank_below_its_offset() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "shrunk", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    let spec = spec(&program, 0, &agent, 8);
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(20);
    agent.checkpoint();
    rank.kill9();
    fs::write(&files.log, b"short\n").unwrap();
    agent.arm_restart();
    assert!(!Rank::run(&spec, &files).success());
    let err = Rank::stderr(&files);
    assert!(err.contains("shrank") && err.contains("run-0.log"), "{err}");
}

fn corrupt_state_chunk(store: &cryo_core::JobStore, epoch: u64) {
    let manifest = store.load_manifest(epoch).unwrap();
    let state = manifest.ranks[0]
        .regions
        .iter()
        .find(|r| r.name == "state")
        .unwrap();
    cryo_tests::damage_stored_chunk(store, &state.chunks[1], |len| vec![len - 7], 0x5a);
}

#[test]
fn corrupt_chunk_is_detected_at_restart() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "bad", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    let spec = spec(&program, 0, &agent, 8);
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(20);
    let report = agent.checkpoint();
    rank.kill9();
    corrupt_state_chunk(&agent.job_store(), report.epoch);
    agent.arm_restart();
    assert!(!Rank::run(&spec, &files).success());
    let err = Rank::stderr(&files);
    assert!(
        err.contains("corrupt") && err.contains("\"state\""),
        "{err}"
    );
}

#[test]
fn busy_checkpoint_is_refused_with_a_clear_message_or_waits() {
    let setup = setup();
    // Epoch 1 is held for 2 s before its part is made durable, so it is
    // always still in progress when the second request lands.
    let agent = Agent::start_with_env(
        setup.dir.path(),
        "busy",
        &["--copy-budget", "256MiB"],
        &[("CRYO_FAULT", "pause-at:drain:1:2000")],
    );
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    let spec = RankSpec {
        step_ms: 30,
        steps: 100_000,
        ..spec(&program, 0, &agent, 192)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(3);
    let first = match agent.request(&ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Refuse,
        until: Completion::Resumed,
    }) {
        ControlResponse::Checkpoint(report) => report,
        other => panic!("{other:?}"),
    };
    assert!(
        !first.committed,
        "answered at resume, before the data drained"
    );
    // 192 MiB are still being hashed, compressed and written (and held).
    match agent.request(&ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Refuse,
        until: Completion::Committed,
    }) {
        ControlResponse::Busy { epoch, reason } => {
            assert_eq!(epoch, first.epoch);
            assert!(reason.contains("still in progress"), "{reason}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    let second = agent.checkpoint(); // waits for the first to commit
    assert_eq!(second.epoch, first.epoch + 1);
    let job = agent.job_store();
    assert_eq!(
        job.committed_epochs().unwrap(),
        vec![first.epoch, second.epoch]
    );
    for epoch in [first.epoch, second.epoch] {
        assert!(job
            .verify_manifest(&job.load_manifest(epoch).unwrap())
            .is_ok());
    }
    rank.kill9();
}

#[test]
fn rank_that_never_reaches_a_safe_point_aborts_the_epoch_cleanly() {
    let setup = setup();
    let agent = Agent::start(
        setup.dir.path(),
        "slow",
        &["--copy-budget", "64MiB", "--park-timeout", "0.3"],
    );
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    let spec = RankSpec {
        step_ms: 1500,
        steps: 4,
        ..spec(&program, 0, &agent, 1)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(1);
    agent.wait_ranks(1);
    // The rank passes its safe point right after writing the line, then
    // sleeps 1.5 s: give it time to get there even on a loaded machine, so
    // the request finds it asleep and the 0.3 s park timeout expires first.
    std::thread::sleep(Duration::from_millis(200));
    match agent.request(&ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Wait,
        until: Completion::Committed,
    }) {
        ControlResponse::Failed { reason, .. } => assert!(
            matches!(reason, AbortReason::ParkTimeout { rank: 0, .. }),
            "{reason:?}"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(
        agent.job_store().committed_epochs().unwrap(),
        Vec::<u64>::new()
    );
    // The rank was never parked: it runs to the end.
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
    assert_eq!(lines(&files.log), 4);
}

#[test]
fn command_line_checkpoint_restart_and_status() {
    let setup = setup();
    let agent = Agent::start(setup.dir.path(), "cli", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let program = Program::Rust;
    // Killed at the end, never compared: enough steps to outlast the CLI
    // calls on any machine.
    let spec = RankSpec {
        steps: 100_000,
        ..spec(&program, 0, &agent, 4)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(5);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(cryo_tests::bin("cryo-agent"))
            .args(args)
            .arg("--socket")
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&["checkpoint"]);
    assert!(
        text.contains("epoch 1 of job cli")
            && text.contains("committed")
            && text.contains("peak RSS"),
        "{text}"
    );
    let json = run(&["checkpoint", "--json"]);
    assert!(
        json.contains("\"epoch\":2") && json.contains("\"committed\":true"),
        "{json}"
    );
    let status = run(&["status"]);
    assert!(status.contains("last committed: Some(2)"), "{status}");
    assert!(status.contains("of it warm)"), "{status}");
    let armed = run(&["restart", "--epoch", "1"]);
    assert!(armed.contains("epoch 1"), "{armed}");
    rank.kill9();
    assert!(Path::new(&agent.socket).exists());
}

/// Whether any page of `[addr, addr + len)` in `pid` is write-protected for
/// tracking (`PM_UFFD_WP`, bit 57 of `/proc/<pid>/pagemap`).
fn any_page_write_protected(pid: u32, addr: u64, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let pagemap = fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let pages = usize::try_from(len.div_ceil(4096)).unwrap();
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, addr / 4096 * 8)
        .unwrap();
    entries
        .chunks_exact(8)
        .any(|e| u64::from_le_bytes(e.try_into().unwrap()) & (1 << 57) != 0)
}

/// A region the rank rewrites whole between checkpoints goes hot: from the
/// capture that finds it so, it is copied whole without being protected
/// again, so the rank takes no write faults for it; every few captures it
/// is probed; and a restart from a hot epoch is still exact.
#[test]
fn a_region_rewritten_whole_is_copied_without_write_protection() {
    let setup = setup();
    // 1 MiB: four 256 KiB blocks, so four steps rewrite the whole state.
    let state_mb = 1;
    let program = Program::Rust;
    let agent = Agent::start(setup.dir.path(), "hot", &["--copy-budget", "16MiB"]);
    let spec = RankSpec {
        steps: 120,
        step_ms: 40,
        ..spec(&program, 0, &agent, state_mb)
    };
    let reference = RankFiles::new(setup.dir.path(), "ref-0", &setup.input);
    let alone = RankSpec {
        agent: None,
        step_ms: 0,
        ..spec.clone()
    };
    assert!(Rank::run(&alone, &reference).success());
    let files = RankFiles::new(setup.dir.path(), "run-0", &setup.input);
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(3);
    let job = agent.job_store();
    let mut protected_after = Vec::new();
    let mut copied_whole = Vec::new();
    for epoch in 1..=4 {
        rank.wait_lines(lines(&files.log) + 6);
        // The rank is stopped as soon as it reports the capture, so its
        // pages are seen as the capture left them, however long the commit
        // takes.
        let (report, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
        assert_eq!(report.epoch, epoch);
        let r = &report.ranks[0];
        let manifest = job.load_manifest(report.epoch).unwrap();
        let state = manifest.ranks[0]
            .regions
            .iter()
            .find(|g| g.name == "state")
            .unwrap();
        // Right after the capture, a region protected again has protected
        // pages.
        protected_after.push(any_page_write_protected(r.pid, state.addr, state.len));
        drop(frozen);
        // The state is copied whole every time (the read-only input
        // mapping is not written, so its chunk is reused).
        copied_whole.push(r.copied_bytes >= state.len);
    }
    // Epoch 1: first scan, which protects; epoch 2: measured whole by a
    // look that does not protect, so it goes hot unprotected; epochs 3 and
    // 4: hot, neither scanned nor protected.
    assert_eq!(
        protected_after,
        [true, false, false, false],
        "{}",
        agent.log_text()
    );
    assert_eq!(copied_whole, [true, true, true, true]);
    assert!(agent.log_text().contains("region.hot"));
    let saved = lines(&files.log);
    rank.wait_lines(saved + 2);
    rank.kill9();
    assert_eq!(agent.arm_restart(), 4);
    let rank = Rank::start(&spec, &files);
    let status = rank.wait();
    assert!(status.success(), "{}", Rank::stderr(&files));
    assert!(Rank::stderr(&files).contains("restarted from epoch 4"));
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
}
