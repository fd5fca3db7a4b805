//! Files on a filesystem in the node's memory (a tmpfs mounted for the
//! job, as `/tmp` or a local scratch often is) that the ranks hold closed
//! at the checkpoint, and a restart on another node, where that tmpfs is
//! not: logs opened, appended to and closed at every step; a control file
//! read at every step; snapshots written from the start and closed. Each
//! comes back from the checkpoint, byte-identical with an uninterrupted
//! run's, in C (stdio and `close`) and in Python (`open`, `np.save`,
//! `os.replace`).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::ffi::OsString;
use std::fs;
use std::path::Path;

use cryo_tests::heat2d::{openmpi_flavour, repo_root};
use cryo_tests::node_tmpfs::{
    cryo, preempted_on_tmpfs, python_available, setup, setup_dirs, Job, Setup,
};
use cryo_tests::output_text;

const RANKS: u32 = 2;

/// The files of `got` are those of `want`, with the same bytes.
fn same_files(want: &Path, got: &Path, text: &str) {
    let names = |dir: &Path| {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(got), names(want), "{text}");
    for name in names(want) {
        let (want, got) = (
            fs::read(want.join(&name)).unwrap(),
            fs::read(got.join(&name)).unwrap(),
        );
        assert!(
            want == got,
            "{name} differs from the uninterrupted run's:\n{}\n{}\n{text}",
            String::from_utf8_lossy(&want),
            String::from_utf8_lossy(&got)
        );
    }
}

/// Runs `plain` (the job's command with a short step) uninterrupted in a
/// directory of its own, then `job` preempted on the tmpfs and restarted
/// on another node, both with the control file `params` staged beside
/// them: the directories hold the same files, byte for byte, `last` among
/// them.
fn closed_files_come_back(s: &Setup, job: &Job, plain: &[OsString], last: &str) {
    let reference = s.dir.path().join("reference");
    fs::create_dir_all(&reference).unwrap();
    fs::write(reference.join("params"), "scale 3\n").unwrap();
    let plain = cryo(s)
        .args([
            "run",
            "--job",
            &format!("plain-{}", job.name),
            "-n",
            "2",
            "--",
        ])
        .args(plain)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&reference)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", output_text(&plain));
    let text = restarted_elsewhere(s, job, "echo 'scale 3' > params");
    assert!(fs::exists(reference.join(last)).unwrap());
    same_files(&reference, &s.work, &text);
}

/// Preempts `job` on the tmpfs (see `preempted_on_tmpfs`), checks that no
/// file closed there is named as lost, restarts it on another node and
/// returns what the restart said.
fn restarted_elsewhere(s: &Setup, job: &Job, prepare: &str) -> String {
    let said = preempted_on_tmpfs(s, job, prepare);
    assert!(
        !said.contains("and closed, and"),
        "their contents are saved, so none may be named as lost:\n{said}"
    );
    let restart = cryo(s)
        .args(["restart", job.name, "--nodes", "c:2"])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&s.work)
        .output()
        .unwrap();
    let text = output_text(&restart);
    assert!(restart.status.success(), "{text}");
    text
}

/// A code that holds none of its node files open at the checkpoint: a
/// control file it reads at every step (`fopen` "r", `fclose`), snapshots
/// it writes every 5 steps (`fopen` "w", `fclose`) and a file it rewrites
/// at every step (`open`, `write`, `close`). On another node each is there
/// again after the restart: the run reads the control file on, and finds
/// every snapshot at its end, as the uninterrupted run does.
#[test]
fn files_read_or_written_and_closed_in_node_memory_come_back_on_another_node() {
    let Some(s) = setup("tests/programs/node_outputs.c", &[]) else {
        return;
    };
    let command = |step_ms: &str| -> Vec<OsString> {
        let args = [
            s.program.as_os_str(),
            "60".as_ref(),
            step_ms.as_ref(),
            "params".as_ref(),
        ];
        args.into_iter().map(OsString::from).collect()
    };
    let job = Job {
        name: "outputs",
        command: command("40"),
        env: Vec::new(),
        progress: "prog-0.log",
    };
    closed_files_come_back(&s, &job, &command("1"), "snap-1-0060.dat");
}

/// A Python program (mpi4py, Open MPI) that reopens its logs with "a" at
/// every step and closes them: at the checkpoint no log is open, and on
/// another node none is there. Each comes back whole, then goes on.
#[test]
fn python_logs_appended_and_closed_in_node_memory_come_back_on_another_node() {
    const ITERS: usize = 150;
    let Some(s) = setup_dirs() else {
        return;
    };
    if !python_available() {
        return;
    }
    let job = Job {
        name: "python",
        command: vec![
            "/usr/bin/python3".into(),
            repo_root().join("tests/programs/append_log.py").into(),
            ".".into(),
            ITERS.to_string().into(),
            "40".into(),
        ],
        env: python_env(),
        progress: "append.0.log",
    };
    let text = restarted_elsewhere(&s, &job, "true");
    for rank in 0..RANKS {
        let want: String = (1..=ITERS)
            .map(|step| format!("rank {rank} step {step:04}\n"))
            .collect();
        assert_eq!(
            fs::read_to_string(s.work.join(format!("append.{rank}.log"))).unwrap_or_default(),
            want,
            "rank {rank}'s log\n{text}"
        );
    }
    let mut shared: Vec<String> = fs::read_to_string(s.work.join("shared.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    shared.sort();
    let mut want: Vec<String> = (0..RANKS)
        .flat_map(|rank| (1..=ITERS).map(move |step| format!("shared rank {rank} step {step:04}")))
        .collect();
    want.sort();
    assert_eq!(shared, want, "the shared log\n{text}");
}

/// The same in Python: a control file read with `open`, snapshots saved
/// with `np.save` under a temporary name, moved into place with
/// `os.replace`, and loaded back with `np.load` at the end.
#[test]
fn python_files_read_or_saved_and_closed_in_node_memory_come_back_on_another_node() {
    let Some(s) = setup_dirs() else {
        return;
    };
    if !python_available() {
        return;
    }
    let script = repo_root().join("tests/programs/node_outputs.py");
    let command = |step_ms: &str| -> Vec<OsString> {
        let args = [
            "/usr/bin/python3".as_ref(),
            script.as_os_str(),
            "60".as_ref(),
        ];
        (args.into_iter().map(OsString::from))
            .chain([step_ms.into(), "params".into()])
            .collect()
    };
    let job = Job {
        name: "py-outputs",
        command: command("40"),
        env: python_env(),
        progress: "prog.0.log",
    };
    closed_files_come_back(&s, &job, &command("1"), "snap.1.0060.npy");
}

/// What a Python job needs: Open MPI's runtime, and the package.
fn python_env() -> Vec<(&'static str, OsString)> {
    vec![
        ("CRYO_RANK_LIB", openmpi_flavour().into_os_string()),
        ("PYTHONPATH", repo_root().join("python").into_os_string()),
    ]
}
