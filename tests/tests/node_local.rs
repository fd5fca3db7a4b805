//! Files on a filesystem in the node's memory (a tmpfs mounted for the job,
//! as `/tmp` or a local scratch often is), and a restart on another node,
//! where that tmpfs is not: the logs the ranks write (one held open, one
//! opened and closed at every step, in a run directory they hold open)
//! come back from the checkpoint, byte-identical, as does an empty output
//! directory they hold open, with its mode, and an input they only
//! read and a table they mapped, with their modes and the ranks' umask.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cryo_tests::node_tmpfs::{cryo, preempted_on_tmpfs, setup, Job, Setup};
use cryo_tests::{lines, output_text, Agent, Program, Rank, RankFiles, RankSpec};

const RANKS: u32 = 2;
const STEPS: &str = "120";

/// The OpenMP stencil (`omp_stencil STEPS 20 [INPUT]`).
fn stencil<'a>(s: &Setup, name: &'a str, input: Option<&Path>) -> Job<'a> {
    let mut command: Vec<OsString> = vec![s.program.clone().into(), STEPS.into(), "20".into()];
    command.extend(input.map(OsString::from));
    Job {
        name,
        command,
        env: vec![("OMP_NUM_THREADS", "2".into())],
        progress: "omp-0.log",
    }
}

fn named_in_memory(said: &str, path: &Path) -> bool {
    said.lines().any(|l| {
        l.contains(&format!(
            " ({}) is in this node's memory (tmpfs): ",
            path.display()
        )) && l.contains("a restart on another node, or after a reboot, will not find it")
    })
}

#[test]
fn a_log_written_in_node_memory_comes_back_on_another_node() {
    let Some(s) = setup("tests/programs/omp_stencil.c", &["-fopenmp"]) else {
        return;
    };
    let reference = s.dir.path().join("reference");
    fs::create_dir_all(&reference).unwrap();
    let plain = cryo(&s)
        .args(["run", "--job", "plain", "-n", "2", "--"])
        .arg(&s.program)
        .args([STEPS, "1"])
        .current_dir(&reference)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", output_text(&plain));

    let said = preempted_on_tmpfs(&s, &stencil(&s, "logs", None), "umask 027");
    assert!(
        !named_in_memory(&said, &s.work.join("steps")),
        "the run directory holds the working directory, so it is made again, not lost:\n{said}"
    );
    assert!(
        !named_in_memory(&said, &s.work.join("steps/out")),
        "a directory of the node held open is made again, even empty, not lost:\n{said}"
    );
    for rank in 0..RANKS {
        let log = s.work.join(format!("omp-{rank}.log"));
        assert!(
            !named_in_memory(&said, &log),
            "its contents are saved, so it must not be named as lost:\n{said}"
        );
        let closed = s.work.join(format!("steps/closed-{rank}.log"));
        assert!(
            !said.contains(&format!("{} was written and closed", closed.display())),
            "its contents are saved, so it must not be named as lost:\n{said}"
        );
    }
    let restart = cryo(&s)
        .args(["restart", "logs", "--nodes", "c:2"])
        .current_dir(&s.work)
        .output()
        .unwrap();
    assert!(restart.status.success(), "{}", output_text(&restart));
    // The logs opened with O_APPEND (and held open) come back from the
    // checkpoint, as do those opened, appended to and closed at each step
    // by a relative name, in the directory the ranks moved to at their
    // first start, made again with the rank's working directory.
    let logs = |r| [format!("omp-{r}.log"), format!("steps/closed-{r}.log")];
    for name in (0..RANKS).flat_map(logs) {
        let (want, got) = (
            fs::read(reference.join(&name)).unwrap(),
            fs::read(s.work.join(&name)).unwrap(),
        );
        assert!(
            want == got,
            "{name} differs from the uninterrupted run's\n{}",
            output_text(&restart)
        );
    }
    // The empty output directory they held open came back with its mode
    // (0750 under the job's umask 027, whatever the restart's), and they
    // wrote their results into it through that fd.
    let out = s.work.join("steps/out");
    let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750, "steps/out made again with mode {mode:o}");
    for rank in 0..RANKS {
        let done = fs::read_to_string(out.join(format!("done-{rank}"))).unwrap();
        assert_eq!(done, "done\n");
    }
}

/// An input staged into node memory that the ranks hold open for
/// reading, and a table there they mapped and closed: saved with the
/// checkpoint, not named as lost, and made again on another node, so the
/// ranks read the same bytes after the restart.
#[test]
fn an_input_read_and_a_table_mapped_in_node_memory_come_back_on_another_node() {
    let Some(s) = setup("tests/programs/omp_stencil.c", &["-fopenmp"]) else {
        return;
    };
    // Under a umask of 077, with modes of their own for the staged files.
    const STAGE: &str = "umask 077 && head -c 300000 /dev/urandom > input.mesh && \
                         head -c 70000 /dev/urandom > table.bin && \
                         chmod 640 input.mesh && chmod 751 table.bin";
    let (input, table) = (s.work.join("input.mesh"), s.work.join("table.bin"));
    let mut job = stencil(&s, "input", Some(&input));
    job.command.push(table.clone().into());
    // The staged files, kept for the uninterrupted run.
    let kept = s.dir.path().join("reference");
    fs::create_dir_all(&kept).unwrap();
    let said = preempted_on_tmpfs(
        &s,
        &job,
        &format!("{} && cp input.mesh table.bin {}", STAGE, kept.display()),
    );
    for path in [&input, &table] {
        assert!(
            !named_in_memory(&said, path)
                && !said.contains(&format!("mapped file {}", path.display())),
            "its contents are saved, so it must not be named as lost:\n{said}"
        );
    }
    // What the checkpoint recorded: the umask, and of each saved file its
    // mode, that it is the node's and whether a rank wrote it. Both ranks'
    // emulated nodes share this machine's tmpfs, so each path is one file:
    // no two ranks are kept apart at a restart.
    let job = cryo_core::Store::open(&s.store)
        .and_then(|store| store.existing_job("input"))
        .unwrap();
    let manifest = job
        .load_manifest(job.latest_committed().unwrap().unwrap())
        .unwrap();
    for rank in &manifest.ranks {
        let process = &rank.process;
        assert_eq!(process.umask, Some(0o077));
        assert!(!process.machine.is_empty());
        let file = |path: &Path| process.saved_file(path.to_str().unwrap()).unwrap();
        let log = s.work.join(format!("omp-{}.log", rank.rank));
        assert!(file(&log).on_node && file(&log).written, "{process:?}");
        assert_eq!(file(&log).mode, Some(0o600));
        assert!(file(&input).on_node && !file(&input).written, "{process:?}");
        assert_eq!(file(&input).mode, Some(0o640));
        assert!(file(&table).on_node && !file(&table).written, "{process:?}");
    }
    assert_eq!(
        cryo_core::format::fds::node_file_clashes(&manifest.ranks),
        []
    );
    let plain = cryo(&s)
        .args(["run", "--job", "plain-input", "-n", "2", "--"])
        .arg(&s.program)
        .args([STEPS, "1", "input.mesh", "table.bin"])
        .current_dir(&kept)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", output_text(&plain));

    // The restart, in an empty directory at the same path, launched with
    // another umask.
    let mut restart = cryo(&s);
    restart
        .args(["restart", "input", "--nodes", "c:2"])
        .current_dir(&s.work);
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        restart.pre_exec(|| {
            nix::libc::umask(0o022);
            Ok(())
        });
    }
    let restart = restart.output().unwrap();
    let text = output_text(&restart);
    assert!(restart.status.success(), "{text}");
    for name in ["input.mesh", "table.bin"] {
        assert!(
            fs::read(kept.join(name)).unwrap() == fs::read(s.work.join(name)).unwrap(),
            "{name} was not made again as it was\n{text}"
        );
    }
    // Each file made again has its own mode, and what the ranks make
    // (their run directory) gets the umask they ran with, not the
    // launcher's.
    let mode = |name: &str| {
        fs::metadata(s.work.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let modes = [
        ("input.mesh", 0o640),
        ("table.bin", 0o751),
        ("omp-0.log", 0o600),
        ("steps", 0o700),
        ("steps/closed-1.log", 0o600),
    ];
    for (name, want) in modes {
        assert_eq!(mode(name), want, "the mode of {name}\n{text}");
    }
    for rank in 0..RANKS {
        let name = format!("omp-{rank}.log");
        let (want, got) = (
            fs::read_to_string(kept.join(&name)).unwrap(),
            fs::read_to_string(s.work.join(&name)).unwrap(),
        );
        assert!(want.lines().count() > 20, "{want}");
        assert!(want
            .lines()
            .all(|l| l.contains(" input 300000 head ") && l.contains(" table ")));
        assert!(
            want == got,
            "{name} differs from the uninterrupted run's\n{text}"
        );
    }
}

/// A tmpfs mounted at a directory for the life of the value (detached
/// when dropped, a failed test included).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        let at_text = at.to_str().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "cryo-input", at_text])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The bytes of region `name`'s chunks in epoch `epoch` of rank 0.
fn stored_region(job: &cryo_core::store::JobStore, epoch: u64, path: &Path) -> Vec<u8> {
    let manifest = job.load_manifest(epoch).unwrap();
    let rank = &manifest.ranks[0];
    let fd = (rank.fds.iter())
        .find(|fd| Path::new(&fd.path) == path)
        .unwrap_or_else(|| panic!("no fd of {} in {:?}", path.display(), rank.fds));
    let region = (rank.regions.iter())
        .find(|r| r.kind == cryo_core::format::manifest::RegionKind::FileContents { fd: fd.fd })
        .unwrap_or_else(|| panic!("no region saves {}", path.display()));
    let mut bytes = vec![0u8; usize::try_from(region.len).unwrap()];
    for chunk in &region.chunks {
        let start = usize::try_from(chunk.offset).unwrap();
        let end = start + usize::try_from(chunk.len).unwrap();
        job.read_chunk_into(chunk, &mut bytes[start..end]).unwrap();
    }
    bytes
}

/// An input in node memory that a rank holds open for reading and nothing
/// writes is read from the file at the first checkpoint only: later ones
/// take its chunks as they were (the copy figure leaves it out), and the
/// checkpoint still holds its bytes. One written since is read again.
#[test]
fn an_input_unchanged_since_the_last_checkpoint_is_not_read_again() {
    if !cryo_tests::netns::available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-node-input-")
        .tempdir()
        .unwrap();
    let scratch = dir.path().join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let _tmpfs = Tmpfs::mount(&scratch);
    let mesh = scratch.join("mesh.bin");
    const MESH: usize = 8 << 20;
    cryo_tests::write_input(&mesh, MESH);
    // Its last change is over a second old at the first checkpoint, so
    // its stamp is trusted at the next (`agent/src/inputs.rs`).
    std::thread::sleep(Duration::from_millis(1500));
    let mapped = dir.path().join("input.dat");
    cryo_tests::write_input(&mapped, 100_000);
    let agent = Agent::start(dir.path(), "mesh", &["--copy-budget", "64MiB"]);
    let files = RankFiles::new(dir.path(), "run-0", &mapped);
    let program = Program::Rust;
    let spec = RankSpec {
        program: &program,
        rank: 0,
        agent: Some(&agent),
        steps: 100_000,
        state_mb: 1,
        step_ms: 10,
    };
    let store = dir.path().join("store");
    let env = [
        ("CRYO_EXAMPLE_READS", mesh.to_str().unwrap()),
        ("CRYO_STORE", store.to_str().unwrap()),
    ];
    let mut rank = Rank::start_with_env(&spec, &files, &env);
    let checkpoint = |rank: &mut Rank| {
        rank.wait_lines(lines(&files.log) + 5);
        let report = agent.checkpoint();
        (report.epoch, report.ranks[0].clone())
    };
    let (first, r1) = checkpoint(&mut rank);
    let (second, r2) = checkpoint(&mut rank);
    let (_, r2b) = checkpoint(&mut rank);
    let job = cryo_core::Store::open(&store)
        .and_then(|store| store.existing_job("mesh"))
        .unwrap();
    let original = fs::read(&mesh).unwrap();
    assert!(r1.copied_bytes >= MESH as u64, "{r1:?}");
    // The rank maps the file anew at each checkpoint, at an address of the
    // kernel's choosing: the input is known by its region's name.
    for r in [&r2, &r2b] {
        assert!(
            r.bytes >= MESH as u64 && r.copied_bytes < (MESH / 2) as u64,
            "the unchanged input was read again: {r:?}"
        );
    }
    for epoch in [first, second] {
        assert!(
            stored_region(&job, epoch, &mesh) == original,
            "epoch {epoch}"
        );
    }
    // Rewritten in place by another process: read again, and saved as it
    // is now.
    let rewritten: Vec<u8> = original.iter().map(|b| b ^ 0x5a).collect();
    fs::OpenOptions::new()
        .write(true)
        .open(&mesh)
        .unwrap()
        .write_all_at(&rewritten, 0)
        .unwrap();
    let (third, r3) = checkpoint(&mut rank);
    assert!(r3.copied_bytes >= MESH as u64, "{r3:?}");
    assert!(stored_region(&job, third, &mesh) == rewritten);
    let log = fs::read_to_string(&files.log).unwrap();
    assert!(log.lines().all(|l| l.contains(" reads ")), "{log}");
    rank.kill9();
}
