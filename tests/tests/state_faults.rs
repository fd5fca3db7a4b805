//! The state suite's programs (`tests/state/`) where a checkpoint cannot
//! simply be taken and restored: an unlinked scratch file over
//! `CRYO_UNLINKED_CAP` (the epoch is refused, the job goes on), an unlinked
//! file's saved contents corrupted in the store (the restart falls back to
//! the previous epoch), a pipe no restart can give back (said when the
//! checkpoint is taken, by `cryo checkpoint`, `cryo run` and
//! `cryo describe`), a file written in place over `CRYO_WRITABLE_CAP`
//! (not saved, and named), files removed after the checkpoint (named by
//! `cryo restart` before the ranks start: made again, or the restart
//! fails), and restarts refused before they start. The harness is
//! `cryo_tests::state`.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use cryo_core::format::header::HEADER_LEN;
use cryo_core::RegionKind;
use cryo_tests::output_text;
use cryo_tests::state::{
    checkpointed_after, have_mpi, job_name, steps, survives_kill_and_restart, Case, Job, ITERS,
};

/// Bytes of one line of the `unlinked` shape's scratch files (rank and
/// scratch number under 10, step under 1000): every scratch file is a
/// whole number of them.
const UNLINKED_LINE: u64 = 43;
/// Bytes of one record of the `rdwr` shape's file.
const RDWR_RECORD: u64 = 56;

/// "rank R: fd F (PATH)<phrase>REST" in a message.
#[derive(Debug)]
struct FdClaim {
    rank: u32,
    fd: i32,
    path: String,
    /// What follows the phrase, to the end of its line.
    rest: String,
}

/// Every "rank R: fd F (PATH)<phrase>..." in `text`. PATH may hold
/// parentheses of its own ("(deleted)"): it ends where ")<phrase>" starts.
fn fd_claims(text: &str, phrase: &str) -> Vec<FdClaim> {
    let close = format!("){phrase}");
    let mut out = Vec::new();
    for line in text.lines() {
        for (at, _) in line.match_indices("rank ") {
            let tail = &line[at + "rank ".len()..];
            let Some((rank, tail)) = tail.split_once(": fd ") else {
                continue;
            };
            let Some((fd, tail)) = tail.split_once(" (") else {
                continue;
            };
            let (Ok(rank), Ok(fd)) = (rank.parse(), fd.parse()) else {
                continue;
            };
            let Some(end) = tail.find(&close) else {
                continue;
            };
            out.push(FdClaim {
                rank,
                fd,
                path: tail[..end].to_owned(),
                rest: tail[end + close.len()..].to_owned(),
            });
        }
    }
    out
}

/// The size `claim` gives for its file ("N bytes" right after its phrase),
/// checked to be over `cap` and a whole number of `unit`s (the shape's
/// line or record), with the variable and its value named ("over VAR (CAP
/// bytes per rank)"). `context` is for the messages.
fn size_over_cap(claim: &FdClaim, var: &str, cap: u64, unit: u64, context: &str) -> u64 {
    let size = claim
        .rest
        .split_once(" bytes")
        .and_then(|(n, _)| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no size in {claim:?}:\n{context}"));
    assert!(
        size > cap && size % unit == 0,
        "{size} bytes is not the size of a file of {unit}-byte lines over {cap}: {claim:?}:\n{context}"
    );
    let named = format!("over {var} ({cap} bytes per rank)");
    assert!(
        claim.rest.contains(&named),
        "no {named:?} in {claim:?}:\n{context}"
    );
    size
}

/// The case of `shape` (with its uninterrupted reference run if
/// `reference`), its job name, and its `cryo run` of 2 ranks on two nodes
/// with `env`, at step `CHECKPOINT_AT`.
fn started(shape: &str, reference: bool, env: &[(&str, &str)]) -> (Case, String, Job) {
    let case = Case::new(shape);
    if reference {
        case.reference(2, ITERS);
    }
    let job_name = job_name(shape);
    let mut job = case.start_with_env(&job_name, "a:1,b:1", 2, ITERS, env);
    job.wait_checkpoint_step();
    (case, job_name, job)
}

/// Checks, in the running job, that rank `claim.rank` holds `claim.path`
/// at `claim.fd`; returns the size of the file behind it now.
fn assert_rank_holds(case: &Case, claim: &FdClaim, said: &str) -> u64 {
    let pid = case.rank_pid(claim.rank).unwrap_or_else(|| {
        panic!(
            "no process of rank {} to check {claim:?}:\n{said}",
            claim.rank
        )
    });
    let fd = format!("/proc/{pid}/fd/{}", claim.fd);
    let link = fs::read_link(&fd).unwrap_or_else(|e| {
        panic!(
            "rank {} (pid {pid}) has no fd {} ({e}), yet the message names it:\n{said}",
            claim.rank, claim.fd
        )
    });
    assert_eq!(
        link.to_string_lossy(),
        claim.path,
        "rank {}'s fd {} is not the file the message names:\n{said}",
        claim.rank,
        claim.fd
    );
    fs::metadata(&fd).unwrap().len()
}

/// `name` under the case's `run/` folder, as the kernel names it.
fn run_file(case: &Case, name: &str) -> PathBuf {
    fs::canonicalize(case.path("run")).unwrap().join(name)
}

/// An unlinked scratch file bigger than `CRYO_UNLINKED_CAP` cannot be
/// saved, so a checkpoint could not restart: `cryo checkpoint` must fail,
/// naming the rank, the fd, the file, its size and the variable; no epoch
/// is committed; and the job computes on to an output identical to the
/// uninterrupted run's.
#[test]
fn an_unlinked_file_over_the_cap_refuses_the_epoch_and_the_job_goes_on() {
    if !have_mpi() {
        return;
    }
    // By step 10 each scratch file has at least 10 lines of 43 bytes: over
    // 100.
    let (case, job_name, mut job) = started("unlinked", true, &[("CRYO_UNLINKED_CAP", "100")]);
    let mut checkpoint = case.checkpoint(&job_name);
    let status = checkpoint.wait(Duration::from_secs(60));
    let said = checkpoint.said();
    let context = || {
        format!(
            "{said}\n{}\n{}",
            job.describe(),
            case.agent_logs(&format!("scratch-{job_name}"))
        )
    };
    assert!(
        !status.success(),
        "cryo checkpoint must fail ({status}):\n{}",
        context()
    );
    assert!(said.contains("epoch 1 aborted"), "{}", context());
    // Nothing was committed before it, so nothing is said to stand.
    assert!(
        said.contains("the job has no committed epoch yet"),
        "{}",
        context()
    );

    // Checked against the ranks themselves, stopped so that they cannot
    // finish meanwhile.
    case.stop_ranks();
    let claims = fd_claims(&said, " is an unlinked file of ");
    assert!(
        !claims.is_empty(),
        "the refusal names no rank, fd and file:\n{}",
        context()
    );
    for claim in &claims {
        assert!(claim.rank < 2, "{claim:?}:\n{}", context());
        assert!(
            claim.path.ends_with(" (deleted)"),
            "not an unlinked file: {claim:?}:\n{}",
            context()
        );
        let size = size_over_cap(claim, "CRYO_UNLINKED_CAP", 100, UNLINKED_LINE, &context());
        let now = assert_rank_holds(&case, claim, &said);
        assert!(
            size <= now,
            "the refusal says {size} bytes, the file has only {now} now: {claim:?}"
        );
    }
    for pid in case.ranks() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
    assert_eq!(
        case.committed(&job_name),
        Vec::<u64>::new(),
        "a refused epoch was committed:\n{}",
        context()
    );

    let status = job.wait_end(Duration::from_secs(60));
    let stdout = job.stdout_text();
    assert!(
        status.success() && stdout.ends_with("OK\n"),
        "the job did not go on to the end ({status}):\n{}",
        job.describe()
    );
    assert!(
        checkpointed_after(&stdout).is_empty(),
        "a rank reported a checkpoint that was refused:\n{stdout}"
    );
    assert_eq!(
        steps(&stdout),
        (1..=ITERS).collect::<Vec<_>>(),
        "every step, once"
    );
    case.assert_run_matches_reference("a checkpoint refused at about step 10, not killed");
}

/// Two checkpoints of the `unlinked` shape, `kill -9`, then every chunk
/// that epoch 2's unlinked files' contents use (and epoch 1 does not) is
/// corrupted: `cryo restart` must say epoch 2 fails verification, fall back
/// to epoch 1, resume after its step and end byte-identical to the
/// uninterrupted run.
#[test]
fn a_corrupt_unlinked_file_chunk_falls_back_to_the_previous_epoch() {
    if !have_mpi() {
        return;
    }
    let (case, job_name, mut job) = started("unlinked", true, &[]);
    let (first, mut checkpoint) = case.capture(&job_name, &job);
    case.committed_by(&job_name, &job, &mut checkpoint, 1);
    drop(checkpoint);
    job.wait_step(first + 2, "two steps past epoch 1");
    let (second, mut checkpoint) = case.capture(&job_name, &job);
    assert!(
        second > first,
        "epoch 2 after step {second}, epoch 1 after step {first}"
    );
    case.stop_at_past(&job_name, &mut job, second, ITERS, &mut checkpoint, 2);
    let (killed_at, _) = case.kill_unfinished(job, second);

    let store = case.job_store(&job_name);
    let older = store.load_manifest(1).unwrap();
    let newest = store.load_manifest(2).unwrap();
    for manifest in [&older, &newest] {
        for rank in &manifest.ranks {
            let unlinked: Vec<_> = rank
                .regions
                .iter()
                .filter_map(|r| match r.kind {
                    RegionKind::UnlinkedFile { fd } => Some((fd, r.name.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(
                unlinked.len(),
                3,
                "epoch {}, rank {}: the three scratch files' contents: {unlinked:?}",
                manifest.epoch,
                rank.rank
            );
            for (fd, name) in &unlinked {
                assert_eq!(*name, format!("cryo:fd:{fd}"));
            }
        }
    }
    let older_hashes: HashSet<_> = older.chunk_refs().map(|(_, _, c)| c.hash).collect();
    let mut victims: Vec<_> = newest
        .chunk_refs()
        .filter(|(_, region, _)| matches!(region.kind, RegionKind::UnlinkedFile { .. }))
        .map(|(_, _, c)| *c)
        .filter(|c| !older_hashes.contains(&c.hash))
        .collect();
    victims.sort_by_key(|c| c.hash.to_hex());
    victims.dedup_by_key(|c| c.hash);
    assert!(
        !victims.is_empty(),
        "epoch 2's unlinked files use no chunk of their own (epoch 1 after step {first}, epoch 2 after step {second})"
    );
    for chunk in &victims {
        // Bytes inside the payload: the start, the middle and the end.
        cryo_tests::damage_stored_chunk(
            &store,
            chunk,
            |len| {
                assert!(
                    len > HEADER_LEN as u64 + 2,
                    "chunk {} has no payload",
                    chunk.hash
                );
                vec![
                    HEADER_LEN as u64,
                    HEADER_LEN as u64 + (len - HEADER_LEN as u64) / 2,
                    len - 1,
                ]
            },
            0xff,
        );
    }

    // Asked for by number, the damaged epoch is refused, not swapped for
    // another.
    let asked = case
        .cryo()
        .args(["restart", &job_name, "--epoch", "2", "--nodes", "c:2"])
        .output()
        .unwrap();
    let refused = output_text(&asked);
    assert!(
        !asked.status.success()
            && refused.contains("epoch 2 of job")
            && refused.contains("fails verification"),
        "cryo restart --epoch 2 did not refuse the damaged epoch:\n{refused}"
    );
    assert!(!refused.contains("restarting job"), "{refused}");

    let said = case.assert_restart_matches_reference(&job_name, "c:2", 1, first, killed_at, ITERS);
    assert!(
        said.contains("epoch 2 fails verification") && said.contains("falling back"),
        "cryo restart did not say it fell back from epoch 2:\n{said}"
    );
}

/// A pipe (`STATE_HOLD_PIPE=1`, both ends held unused by every rank of
/// the `dup` shape) cannot be restored: when the checkpoint is taken,
/// `cryo checkpoint` and `cryo run` name each of its fds on each rank, and
/// `cryo describe` of the epoch lists it as not restored next to the dup'ed
/// fds' "dup2 from fd". The restart still ends byte-identical (the program
/// does not use the pipe after a restart).
#[test]
fn what_a_restart_cannot_restore_is_said_at_checkpoint_time() {
    let Some(run) = survives_kill_and_restart(
        "dup",
        ITERS,
        2,
        ("a:1,b:1", "c:2"),
        &[("STATE_HOLD_PIPE", "1")],
    ) else {
        return;
    };
    let case = &run.case;
    let job = &run.job;
    // "state: rank R holds a pipe: fds A and B (pipe:[INODE])"
    let mut pipes: Vec<(u32, i32, String)> = Vec::new();
    for line in run.run_log.lines() {
        let Some(rest) = line.strip_prefix("state: rank ") else {
            continue;
        };
        let (rank, rest) = rest.split_once(" holds a pipe: fds ").unwrap();
        let (a, rest) = rest.split_once(" and ").unwrap();
        let (b, path) = rest.split_once(' ').unwrap();
        let path = path.trim_start_matches('(').trim_end_matches(')');
        for fd in [a, b] {
            pipes.push((rank.parse().unwrap(), fd.parse().unwrap(), path.to_owned()));
        }
    }
    pipes.sort();
    assert_eq!(
        pipes.iter().map(|p| p.0).collect::<Vec<_>>(),
        [0, 0, 1, 1],
        "each rank must say which pipe it holds:\n{}",
        run.run_log
    );

    // cryo checkpoint: exactly those fds, nothing else, said lost.
    let mut named: Vec<(u32, i32, String)> = fd_claims(&run.checkpoint, " will not be restored: ")
        .into_iter()
        .map(|c| {
            assert_eq!(c.rest, "pipe", "{c:?}:\n{}", run.checkpoint);
            (c.rank, c.fd, c.path)
        })
        .collect();
    named.sort();
    assert_eq!(
        named, pipes,
        "cryo checkpoint must name every held pipe fd as not restored, and nothing else:\n{}",
        run.checkpoint
    );
    // Each line, as each of them says it.
    for (rank, fd, path) in &pipes {
        let lost = format!("rank {rank}: fd {fd} ({path}) will not be restored: pipe\n");
        for (who, prefix, text) in [
            (
                "cryo checkpoint",
                format!("job {job}: epoch 1: warning: "),
                &run.checkpoint,
            ),
            ("cryo run", "cryo: epoch 1: ".to_owned(), &run.run_log),
        ] {
            let line = format!("{prefix}{lost}");
            assert!(text.contains(&line), "{who} did not say {line:?}:\n{text}");
        }
    }

    // cryo describe of the epoch's manifest, rank by rank.
    let manifest = case.job_store(job).manifest_path(1);
    let out = case.cryo().arg("describe").arg(&manifest).output().unwrap();
    let described = output_text(&out);
    assert!(out.status.success(), "cryo describe failed:\n{described}");
    for rank in 0..2u32 {
        let lines = rank_section(&described, rank);
        for (_, fd, path) in pipes.iter().filter(|p| p.0 == rank) {
            let want = format!("fd {fd} ({path}): NOT RESTORED: pipe");
            assert!(
                lines.contains(&want),
                "cryo describe, rank {rank}: no {want:?}:\n{described}"
            );
        }
        let out_file = run_file(case, &format!("dup.{rank}.out"));
        let prefix = format!(" ({}): ", out_file.display());
        let dups: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&prefix) && l.contains(": dup2 from fd "))
            .collect();
        assert_eq!(
            dups.len(),
            2,
            "cryo describe, rank {rank}: the dup() and the dup2() of {} must each be a \"dup2 from fd\":\n{described}",
            out_file.display()
        );
        assert!(
            dups.iter().any(|l| l.starts_with("fd 200 (")),
            "cryo describe, rank {rank}: fd 200 (the dup2()) is not a dup2:\n{described}"
        );
        // Both from the one fd reopened by its path.
        let leaders: HashSet<&str> = dups
            .iter()
            .map(|l| {
                let from = &l[l.find(": dup2 from fd ").unwrap() + ": dup2 from fd ".len()..];
                from.split(' ').next().unwrap()
            })
            .collect();
        assert_eq!(leaders.len(), 1, "{dups:?}");
        let leader = leaders.into_iter().next().unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("fd {leader}{prefix}reopened by path"))),
            "cryo describe, rank {rank}: fd {leader} (the dups' leader) is not reopened by path:\n{described}"
        );
    }
}

/// The lines `cryo describe` gives rank `rank` of a manifest (those under
/// its "rank R on NODE (pid P): at restart"), trimmed.
fn rank_section(described: &str, rank: u32) -> Vec<String> {
    let head = format!("rank {rank} on ");
    described
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(&head))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("rank "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// A file open for writing in place that is bigger than
/// `CRYO_WRITABLE_CAP` is not saved: the checkpoint commits, and
/// `cryo checkpoint` and `cryo run` name the rank, the fd, the file and the
/// variable; the epoch holds no saved contents for it.
#[test]
fn a_file_written_in_place_over_the_cap_is_named() {
    if !have_mpi() {
        return;
    }
    // No reference: over the cap a restart cannot be exact.
    let (case, job_name, job) = started("rdwr", false, &[("CRYO_WRITABLE_CAP", "10")]);
    let (_, mut checkpoint) = case.capture(&job_name, &job);
    let said = case.committed_by(&job_name, &job, &mut checkpoint, 1);
    case.stop_ranks();
    let context = || format!("{said}\n{}", job.describe());

    let phrase = " is open for writing in place and is ";
    let mut claims = fd_claims(&said, phrase);
    claims.sort_by_key(|c| c.rank);
    assert_eq!(
        claims.iter().map(|c| c.rank).collect::<Vec<_>>(),
        [0, 1],
        "cryo checkpoint must name each rank's file once:\n{}",
        context()
    );
    for claim in &claims {
        let file = run_file(&case, &format!("rdwr.{}.out", claim.rank));
        assert_eq!(claim.path, file.display().to_string(), "{}", context());
        assert_rank_holds(&case, claim, &said);
        let size = size_over_cap(claim, "CRYO_WRITABLE_CAP", 10, RDWR_RECORD, &context());
        assert!(
            said.contains(&format!(
                "job {job_name}: epoch 1: warning: rank {}: fd {} ({}){phrase}",
                claim.rank, claim.fd, claim.path
            )),
            "{}",
            context()
        );
        assert_run_said(
            &job,
            &format!(
                "cryo: epoch 1: rank {}: fd {} ({}){phrase}{size} bytes, over CRYO_WRITABLE_CAP",
                claim.rank, claim.fd, claim.path
            ),
        );
    }
    let manifest = case.job_store(&job_name).load_manifest(1).unwrap();
    let saved: Vec<_> = manifest
        .ranks
        .iter()
        .flat_map(|r| r.regions.iter().map(move |g| (r.rank, g)))
        .filter(|(_, g)| matches!(g.kind, RegionKind::FileContents { .. }))
        .map(|(rank, g)| format!("rank {rank}: {}", g.name))
        .collect();
    assert!(
        saved.is_empty(),
        "files over CRYO_WRITABLE_CAP were saved anyway: {saved:?}"
    );
}

/// `cryo run`'s stderr comes to hold `line` (it is written as the epoch
/// commits, about when `cryo checkpoint` returns).
fn assert_run_said(job: &Job, line: &str) {
    let mut found = false;
    let start = std::time::Instant::now();
    while !found && start.elapsed() < Duration::from_secs(10) {
        found = job.log_text().contains(line);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(found, "cryo run did not say {line:?}:\n{}", job.describe());
}

/// The MPI library (or the launcher) of the restarted run opens more fds
/// before `cryo_init` than the checkpointed one did, as another node layout
/// or launcher may: the application's fds, kept above the runtime's fd
/// floor, are still free for the restart.
#[test]
fn a_restart_whose_library_opens_more_fds_first_still_restores() {
    let Some(survived) = cryo_tests::state::survives_with_restart_env(
        "dup",
        cryo_tests::state::ITERS,
        2,
        ("a:1,b:1", "c:2"),
        [&[], &[("STATE_PRE_INIT_FDS", "16")]],
    ) else {
        return;
    };
    // The application's fds were at or above the floor (64).
    let manifest = survived
        .case
        .job_store(&survived.job)
        .load_manifest(1)
        .unwrap();
    for rank in &manifest.ranks {
        let restored: Vec<i32> = rank
            .fds
            .iter()
            .filter(|f| f.restore == cryo_core::format::manifest::FdRestore::Restore)
            .map(|f| f.fd)
            .collect();
        assert!(
            !restored.is_empty() && restored.iter().all(|fd| *fd >= 64),
            "rank {}: the application's fds {restored:?} should be at or above the floor",
            rank.rank
        );
    }
}

/// A file held open for writing in place (the `rdwr` shape's record file)
/// and removed after the checkpoint: `cryo restart` names it before the
/// ranks start, says the restart makes it again, and the restarted run
/// ends byte-identical to the uninterrupted one.
#[test]
fn a_saved_file_removed_after_the_checkpoint_is_named_and_made_again() {
    if !have_mpi() {
        return;
    }
    let (case, job_name, mut job) = started("rdwr", true, &[]);
    let (captured, mut checkpoint) = case.capture(&job_name, &job);
    case.stop_at_past(&job_name, &mut job, captured, ITERS, &mut checkpoint, 1);
    let (killed_at, _) = case.kill_unfinished(job, captured);
    let gone = run_file(&case, "rdwr.0.out");
    fs::remove_file(&gone).unwrap();
    let said =
        case.assert_restart_matches_reference(&job_name, "c:2", 1, captured, killed_at, ITERS);
    let line = said
        .lines()
        .find(|l| l.contains(&format!("{} (rank 0 fd ", gone.display())))
        .unwrap_or_else(|| panic!("cryo restart did not name {}:\n{said}", gone.display()));
    assert!(
        line.contains("gone since epoch 1") && line.contains("makes it again"),
        "{line}"
    );
    // Rank 1's file is still there: not named.
    assert!(
        !said.contains(&format!("{} (", run_file(&case, "rdwr.1.out").display())),
        "{said}"
    );
}

/// An append-only log (not saved: only cut back at a restart) removed
/// after the checkpoint: `cryo restart` warns before the ranks start that
/// the rank cannot reopen it, and the rank's own error names it, even when
/// the application is slow to print it and the other rank, which learns
/// of the failure at once, ends the job (`MPI_Abort`) first.
#[test]
fn an_unsaved_file_removed_after_the_checkpoint_is_named_before_the_restart_fails() {
    if !have_mpi() {
        return;
    }
    let (case, job_name, mut job) = started("append", false, &[]);
    let (captured, mut checkpoint) = case.capture(&job_name, &job);
    case.stop_at_past(&job_name, &mut job, captured, ITERS, &mut checkpoint, 1);
    case.kill_unfinished(job, captured);
    let gone = run_file(&case, "append.1.out");
    fs::remove_file(&gone).unwrap();
    case.set_restart_env(&[("STATE_SLOW_FAILURE", "5")]);
    let out = case.restart(&job_name, "c:2");
    let said = output_text(&out);
    assert!(
        !out.status.success(),
        "the restart went on without {}:\n{said}",
        gone.display()
    );
    let warning = said
        .lines()
        .find(|l| l.contains(&format!("{} (rank 1 fd ", gone.display())))
        .unwrap_or_else(|| panic!("cryo restart did not name {}:\n{said}", gone.display()));
    assert!(
        warning.contains("warning")
            && warning.contains("not saved")
            && warning.contains("will fail"),
        "{warning}"
    );
    let restarting = said.find("restarting job").unwrap();
    assert!(said.find(warning).unwrap() > restarting, "{said}");
    let vanished = format!("file {} vanished since the checkpoint", gone.display());
    assert!(
        said.lines()
            .any(|l| l.starts_with("cryo: rank 1: ") && l.contains(&vanished)),
        "the rank's error does not name {}:\n{said}",
        gone.display()
    );
}

/// An append-only log (not saved) rotated away after the checkpoint and
/// begun again at its path by something else: the restart refuses to cut
/// back and append to that other file, naming it; with the job's log put
/// back (grown by the killed run's steps past the checkpoint) it restarts
/// to the uninterrupted run's output.
#[test]
fn an_unsaved_log_replaced_after_the_checkpoint_is_refused() {
    if !have_mpi() {
        return;
    }
    let (case, job_name, mut job) = started("append", true, &[]);
    let (captured, mut checkpoint) = case.capture(&job_name, &job);
    case.stop_at_past(&job_name, &mut job, captured, ITERS, &mut checkpoint, 1);
    let (killed_at, _) = case.kill_unfinished(job, captured);
    let log = run_file(&case, "append.1.out");
    let rotated = log.with_extension("out.1");
    fs::rename(&log, &rotated).unwrap();
    let other = vec![b'X'; usize::try_from(fs::metadata(&rotated).unwrap().len()).unwrap() + 100];
    fs::write(&log, &other).unwrap();
    let out = case.restart(&job_name, "c:2");
    let said = output_text(&out);
    assert!(
        !out.status.success(),
        "the restart took another file for its log:\n{said}"
    );
    assert!(
        said.contains(&format!("{} is not the file the rank held", log.display())),
        "the refusal does not name {}:\n{said}",
        log.display()
    );
    assert_eq!(fs::read(&log).unwrap(), other, "the other file was changed");
    fs::rename(&rotated, &log).unwrap();
    case.assert_restart_matches_reference(&job_name, "c:2", 1, captured, killed_at, ITERS);
}

/// A restart refused before anything starts says so alone, with no
/// "restarting job" line that reads as if it had begun: while the job
/// still runs, and onto nodes with too few slots for its ranks.
#[test]
fn a_refused_restart_does_not_say_it_is_restarting() {
    if !have_mpi() {
        return;
    }
    let (case, job_name, job) = started("dup", false, &[]);
    let (captured, mut checkpoint) = case.capture(&job_name, &job);
    case.committed_by(&job_name, &job, &mut checkpoint, 1);
    let refused = |nodes: &str, refusal: &str| {
        let out = case.restart(&job_name, nodes);
        let said = output_text(&out);
        assert!(
            !out.status.success() && said.contains(refusal),
            "a restart on {nodes} was not refused with {refusal:?}:\n{said}"
        );
        assert!(!said.contains("restarting job"), "{said}");
    };
    refused("c:2", "is already running");
    case.stop_ranks();
    case.kill_unfinished(job, captured);
    refused("c:1", "do not fit");
}
