//! A rank's log on a filesystem in the node's memory (a tmpfs mounted for
//! the job, as `/tmp` or a local scratch often is): the checkpoint names the
//! file when it is taken, and once that node's tmpfs is gone the restart
//! fails naming it, instead of restarting without it.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cryo_tests::heat2d::{built, compile_mpich_program_with};
use cryo_tests::state::{have_mpi, wait_child};
use cryo_tests::{lines, output_text, wait_until};

const RANKS: u32 = 2;

#[test]
fn a_file_in_node_memory_is_named_at_checkpoint_and_by_the_restart() {
    // A mount namespace of its own, as the namespace cluster tests use
    // (root, unshare): they run or are skipped together (CRYO_SKIP_NETNS).
    if !have_mpi() || !cryo_tests::netns::available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cryo-node-local-")
        .tempdir()
        .unwrap();
    let program = dir.path().join("omp_stencil");
    compile_mpich_program_with("tests/programs/omp_stencil.c", &["-fopenmp"], &program);
    let store = dir.path().join("store");
    let work = dir.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let cryo = |cwd: &Path| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=64m cryo-scratch "$0" && cd "$0" && exec "$@""#)
            .arg(cwd)
            .arg(built().join("cryo"))
            .env("CRYO_STORE", &store)
            .env("OMP_NUM_THREADS", "2")
            .stdin(Stdio::null());
        cmd
    };

    // The job runs with its working directory on a tmpfs only its mount
    // namespace sees.
    let log = dir.path().join("run.log");
    let mut child = cryo(&work)
        .args([
            "run", "--job", "scratch", "--nodes", "a:1,b:1", "-n", "2", "--",
        ])
        .arg(&program)
        .args(["400", "20"])
        .stdout(fs::File::create(dir.path().join("run.out")).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let seen =
        Path::new(&format!("/proc/{}/root", child.id())).join(work.strip_prefix("/").unwrap());
    wait_until("20 steps logged", Duration::from_secs(60), || {
        lines(&seen.join("omp-0.log")) >= 20
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(75), "{said}");
    for rank in 0..RANKS {
        let file = work.join(format!("omp-{rank}.log"));
        let warning = format!(
            "rank {rank}: fd {{}} ({}) is in this node's memory (tmpfs): a restart on another node, or after a reboot, will not find it",
            file.display()
        );
        let (before, after) = warning.split_once("{}").unwrap();
        assert!(
            said.lines()
                .any(|l| l.contains(before) && l.contains(after) && l.contains("epoch 1")),
            "cryo run did not name rank {rank}'s log on tmpfs at the checkpoint:\n{said}"
        );
    }

    // That tmpfs went with its namespace: the restart, in an empty
    // directory at the same path, names the log it cannot find.
    let restart = Command::new(built().join("cryo"))
        .args(["restart", "scratch", "--nodes", "c:2"])
        .env("CRYO_STORE", &store)
        .current_dir(&work)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = output_text(&restart);
    assert!(!restart.status.success(), "{text}");
    assert!(
        text.contains(&format!("file {}/omp-", work.display())) && text.contains("vanished"),
        "the failed restart must name the missing log:\n{text}"
    );
}
