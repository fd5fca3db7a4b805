//! A restarting rank has its chunks read while it starts (`rank/src/
//! prefetch.rs`): with a real agent and a real store dropped from the page
//! cache, the rank's prefetch asks for exactly what its restore needs, a
//! wrong hint costs nothing but a failed request, and `CRYO_PREFETCH=0`
//! turns it off. Each restart must still end byte-identical to an uninterrupted
//! run.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_core::store::prefetch::PrefetchPlan;
use cryo_tests::{
    assert_same_file, checkpoint_frozen, lines, wait_until, write_input, Agent, Program, Rank,
    RankFiles, RankSpec,
};

const STEPS: u64 = 80;

/// Drops every file of `dir` from the page cache.
fn evict(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            evict(&path);
        } else if let Ok(file) = std::fs::File::open(&path) {
            file.sync_all().unwrap();
            // SAFETY: advice on a descriptor we own; no memory is involved.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        }
    }
}

/// A folder for a test, with the counter's input in it.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.dat");
    write_input(&input, 100_000);
    (dir, input)
}

/// The counter as rank 0: `STEPS` steps of `step_ms` over 16 MiB of state.
fn counter<'a>(program: &'a Program, agent: Option<&'a Agent>, step_ms: u64) -> RankSpec<'a> {
    RankSpec {
        program,
        rank: 0,
        agent,
        steps: STEPS,
        state_mb: 16,
        step_ms,
    }
}

/// An uninterrupted run of the counter without an agent, to compare with.
fn reference(dir: &Path, input: &Path, program: &Program) -> RankFiles {
    let reference = RankFiles::new(dir, "ref-0", input);
    assert!(Rank::run(&counter(program, None, 0), &reference).success());
    reference
}

/// Checkpoints a Rust counter rank, kills it, evicts the store and restarts
/// it with `env` (`{epoch}` and `{store}` replaced); returns the restarted
/// rank's stderr, the bytes its plan reads and how long the restarted rank
/// ran. The run must end as an uninterrupted one does.
fn restart_with(env: &[(&str, &str)]) -> (String, u64, Duration) {
    let (dir, input) = scratch();
    let program = Program::Rust;
    let reference = reference(dir.path(), &input, &program);
    let agent = Agent::start(dir.path(), "pf", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(dir.path(), "run-0", &input);
    let spec = counter(&program, Some(&agent), 15);
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(30);
    let (report, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    let saved = lines(&files.log);
    drop(frozen);
    rank.wait_lines(saved + 3);
    rank.kill9();
    let manifest = agent.job_store().load_manifest(report.epoch).unwrap();
    let planned = PrefetchPlan::for_rank(&manifest.ranks[0]).pack_bytes();
    evict(&agent.store);
    assert_eq!(agent.arm_restart(), report.epoch);

    let (epoch, store) = (report.epoch.to_string(), agent.store.display().to_string());
    let env: Vec<(&str, String)> = env
        .iter()
        .map(|(k, v)| (*k, v.replace("{epoch}", &epoch).replace("{store}", &store)))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = std::time::Instant::now();
    let rank = Rank::start_with_env(&spec, &files, &env);
    wait_until("the rank to restart", Duration::from_secs(20), || {
        Rank::stderr(&files).contains("prefetch:")
    });
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
    let ran = started.elapsed();
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
    (Rank::stderr(&files), planned, ran)
}

/// The time a prefetch reports is its requests' (16 MiB here), not the
/// time until the rank asked for the status at its end, about 50 steps of
/// 15 ms after its restart.
fn assert_took_its_own_time(line: &str, ran: Duration) {
    assert!(
        prefetch_ms(line) * 2 < ran.as_millis(),
        "{line}, the restarted rank ran {ran:?}"
    );
}

/// The milliseconds a prefetch line says its requests took.
fn prefetch_ms(line: &str) -> u128 {
    let at = line.find(" bytes in ").unwrap_or_else(|| panic!("{line}")) + " bytes in ".len();
    line[at..]
        .split(' ')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn prefetch_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("prefetch:"))
        .unwrap_or_else(|| panic!("no prefetch line in:\n{stderr}"))
}

#[test]
fn a_restarting_rank_asks_for_exactly_its_chunks_from_an_evicted_store() {
    let (stderr, planned, ran) = restart_with(&[
        ("CRYO_RESTART_FROM", "{epoch}"),
        ("CRYO_STORE", "{store}"),
        ("CRYO_JOB", "pf"),
    ]);
    assert!(planned > 0);
    let line = prefetch_line(&stderr);
    assert!(
        line.contains(&format!("asked for {planned} of {planned} bytes"))
            && line.contains(" 0 failed"),
        "{line}"
    );
    assert_took_its_own_time(line, ran);
}

#[test]
fn a_hint_of_an_epoch_that_is_not_there_costs_nothing_and_the_right_one_is_read() {
    let (stderr, planned, _) = restart_with(&[
        ("CRYO_RESTART_FROM", "999"),
        ("CRYO_STORE", "{store}"),
        ("CRYO_JOB", "pf"),
    ]);
    // The hinted epoch fails to load; the restore starts the prefetch of
    // the epoch the agent restores once the rank's files are back.
    let line = prefetch_line(&stderr);
    assert!(!line.contains("epoch 999"), "{line}");
    assert!(
        line.contains(&format!("asked for {planned} of {planned} bytes")),
        "{line}"
    );
}

#[test]
fn without_a_hint_the_restore_starts_the_prefetch() {
    let (stderr, planned, ran) = restart_with(&[]);
    let line = prefetch_line(&stderr);
    assert!(
        line.contains(&format!("asked for {planned} of {planned} bytes")),
        "{line}"
    );
    // Started at the restore and joined only when the status is asked for.
    assert_took_its_own_time(line, ran);
}

#[test]
fn cryo_prefetch_0_turns_it_off() {
    let (stderr, _, _) = restart_with(&[
        ("CRYO_RESTART_FROM", "{epoch}"),
        ("CRYO_STORE", "{store}"),
        ("CRYO_JOB", "pf"),
        ("CRYO_PREFETCH", "0"),
    ]);
    assert!(
        prefetch_line(&stderr).ends_with("prefetch: none"),
        "{stderr}"
    );
}

/// Under `cryo run` with real MPICH, a job resumed on another node layout:
/// each rank learns its number from the launcher before `MPI_Init` and
/// reads exactly its own chunks.
#[test]
fn an_mpi_job_resumed_on_other_nodes_prefetches_each_ranks_own_chunks() {
    use cryo_tests::heat2d::{built, Mpi};
    if let Some(problem) = Mpi::Mpich.missing() {
        eprintln!("SKIPPED: {problem} (install mpich); the MPI prefetch test did not run");
        return;
    }
    let bin = built();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = |nodes: &str, extra: &[&str], run_secs: &str| {
        std::process::Command::new(bin.join("cryo"))
            .env("CRYO_STORE", &store)
            .env_remove("CRYO_PREFETCH")
            .current_dir(dir.path())
            .args(["run", "--job", "pfm", "-n", "2", "--nodes", nodes])
            .args(extra)
            .arg("--")
            .arg(bin.join("quiesce-bench"))
            .args([
                "--trials",
                "0",
                "--fill",
                "noise",
                "--state-bytes",
                "8388608",
            ])
            .args(["--run-secs", run_secs])
            .output()
            .unwrap()
    };
    // Six seconds of checkpoints a second: a loaded machine may take a few
    // seconds to start the ranks, and the test needs one committed epoch.
    let first = run("a:1,b:1", &["--interval", "1"], "6");
    let said = cryo_tests::output_text(&first);
    assert!(
        first.status.success() && said.contains("committed"),
        "{said}"
    );
    let job = cryo_core::Store::open(&store)
        .unwrap()
        .existing_job("pfm")
        .unwrap();
    let epoch = job.latest_committed().unwrap().unwrap();
    let manifest = job.load_manifest(epoch).unwrap();
    evict(&store);

    let resumed = run("b:2", &["--resume"], "0");
    let said = cryo_tests::output_text(&resumed);
    assert!(resumed.status.success(), "{said}");
    for rank in &manifest.ranks {
        let planned = PrefetchPlan::for_rank(rank).pack_bytes();
        assert!(planned > 0);
        assert!(said.contains(&format!(
            "quiesce-bench rank {}: state ready, restarted from epoch {epoch} (",
            rank.rank
        )));
        let ours = format!("quiesce-bench rank {}: prefetch: ", rank.rank);
        let line = said
            .lines()
            .find(|l| l.contains(&ours))
            .unwrap_or_else(|| panic!("{ours} not in:\n{said}"));
        let expected = format!("prefetch: epoch {epoch}: asked for {planned} of {planned} bytes");
        assert!(line.contains(&expected), "{expected} not in: {line}");
    }
}

/// The pack files a restarted rank's restore and prefetch keep open are the
/// runtime's: at high fd numbers, so they never take a number an
/// application fd comes back at, and never captured by the next checkpoint
/// as the application's (a restart from it would reopen them, or refuse).
#[test]
fn the_runtimes_store_files_are_never_the_applications() {
    let (dir, input) = scratch();
    let program = Program::Rust;
    let agent = Agent::start(dir.path(), "pf", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(dir.path(), "run-0", &input);
    let spec = RankSpec {
        steps: 200,
        ..counter(&program, Some(&agent), 10)
    };
    let mut rank = Rank::start(&spec, &files);
    rank.wait_lines(20);
    let (first, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    drop(frozen);
    rank.kill9();
    assert_eq!(agent.arm_restart(), first.epoch);
    let mut rank = Rank::start(&spec, &files);
    wait_until("the rank to restart", Duration::from_secs(20), || {
        Rank::stderr(&files).contains("restarted from epoch")
    });
    rank.wait_lines(lines(&files.log) + 3);
    let (second, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    drop(frozen);
    rank.kill9();
    let manifest = agent.job_store().load_manifest(second.epoch).unwrap();
    let store = agent.store.canonicalize().unwrap();
    for fd in &manifest.ranks[0].fds {
        assert!(
            !std::path::Path::new(&fd.path).starts_with(&store)
                || !matches!(fd.restore, cryo_core::format::manifest::FdRestore::Restore),
            "fd {} ({}) of the store was captured as the application's",
            fd.fd,
            fd.path
        );
    }
    // And the restart from that checkpoint works.
    assert_eq!(agent.arm_restart(), second.epoch);
    let rank = Rank::start(&spec, &files);
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
}

/// A hint left in the environment of a rank its agent starts afresh (the
/// agent was not armed) changes nothing: the prefetch is dropped and the
/// run is an ordinary fresh one.
#[test]
fn a_hint_for_a_rank_started_afresh_changes_nothing() {
    let (dir, input) = scratch();
    let program = Program::Rust;
    let reference = reference(dir.path(), &input, &program);
    let agent = Agent::start(dir.path(), "pf", &["--copy-budget", "64MiB"]);
    let first = RankFiles::new(dir.path(), "first", &input);
    let spec = counter(&program, Some(&agent), 5);
    let mut rank = Rank::start(&spec, &first);
    rank.wait_lines(10);
    let (report, frozen) = checkpoint_frozen(&[&rank], || agent.checkpoint());
    drop(frozen);
    rank.kill9();

    let files = RankFiles::new(dir.path(), "run-0", &input);
    let (epoch, store) = (report.epoch.to_string(), agent.store.display().to_string());
    let rank = Rank::start_with_env(
        &spec,
        &files,
        &[
            ("CRYO_RESTART_FROM", epoch.as_str()),
            ("CRYO_STORE", store.as_str()),
            ("CRYO_JOB", "pf"),
        ],
    );
    assert!(rank.wait().success(), "{}", Rank::stderr(&files));
    let said = Rank::stderr(&files);
    assert!(
        !said.contains("restarted") && !said.contains("prefetch:"),
        "{said}"
    );
    assert_same_file(&files.log, &reference.log);
    assert_same_file(&files.final_state, &reference.final_state);
}
