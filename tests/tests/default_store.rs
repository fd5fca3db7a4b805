//! With no `--store` and no `CRYO_STORE`, every `cryo` command finds the
//! same store: `cryo-store` in the working directory, and says so.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cryo_tests::{assert_same_file, build_packages, lines, output_text, wait_until, write_input};

const WAIT: Duration = Duration::from_secs(60);

fn built() -> PathBuf {
    build_packages(&[
        "cryo-coordinator",
        "cryo-agent",
        "cryo-examples",
        "cryo-rank",
    ])
}

fn counter_args(dir: &Path, tag: &str) -> Vec<String> {
    [
        "--steps",
        "60",
        "--state-mb",
        "2",
        "--log",
        &dir.join(format!("{tag}.log")).display().to_string(),
        "--input",
        &dir.join("input.dat").display().to_string(),
        "--final",
        &dir.join(format!("{tag}.final")).display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// `cryo` in `cwd`, with no store named anywhere.
fn cryo(cwd: &Path) -> Command {
    let mut cmd = Command::new(built().join("cryo"));
    cmd.env_remove("CRYO_STORE")
        .env_remove("CRYO_FAULT")
        .env("CRYO_EXAMPLE_STEP_MS", "40")
        .current_dir(cwd);
    cmd
}

fn said(out: &Output) -> String {
    output_text(out)
}

#[test]
fn every_command_finds_the_default_store_in_the_working_directory() {
    let ok = Command::new("mpiexec")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "no mpiexec: install mpich (scripts/install-deps.sh)");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_input(&dir.join("input.dat"), 50_000);
    // The uninterrupted run, as `cryo run` starts it.
    let reference = Command::new("mpiexec")
        .args(["-n", "1"])
        .arg(built().join("cryo-counter"))
        .args(counter_args(dir, "reference"))
        .env_remove("CRYO_AGENT_SOCKET")
        .env("CRYO_EXAMPLE_STEP_MS", "0")
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", said(&reference));

    let stderr = dir.join("run.stderr");
    let mut run = cryo(dir)
        .args(["run", "--job", "dflt", "--nodes", "a:1", "-n", "1"])
        .arg("--scratch")
        .arg(dir.join("scratch"))
        .arg("--")
        .arg(built().join("cryo-counter"))
        .args(counter_args(dir, "run"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    wait_until("the job to compute", WAIT, || {
        lines(&dir.join("run.log")) >= 5
    });
    let store = dir.join("cryo-store");
    let announced = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        announced.contains(&format!("store {} (the default", store.display())),
        "{announced}"
    );

    let status = cryo(dir).args(["status", "dflt"]).output().unwrap();
    assert!(status.status.success(), "{}", said(&status));
    let checkpoint = cryo(dir).args(["checkpoint", "dflt"]).output().unwrap();
    assert!(
        said(&checkpoint).contains("epoch 1 committed"),
        "{}",
        said(&checkpoint)
    );
    assert!(
        store.join("dflt").is_dir(),
        "the store is where it was said"
    );

    // From another directory there is no store, and the error says where
    // it looked.
    let elsewhere = tempfile::tempdir().unwrap();
    let lost = cryo(elsewhere.path())
        .args(["status", "dflt"])
        .output()
        .unwrap();
    assert!(!lost.status.success());
    let text = said(&lost);
    assert!(
        text.contains("cryo-store") && text.contains("CRYO_STORE"),
        "{text}"
    );

    let preempt = cryo(dir).args(["preempt", "dflt"]).output().unwrap();
    assert!(preempt.status.success(), "{}", said(&preempt));
    // It returns once the job's cryo run has exited: the job's nodes are
    // free, and the restart right after it is not refused.
    let exit = run.try_wait().unwrap().unwrap_or_else(|| {
        panic!(
            "cryo preempt returned while the job's cryo run still ran:\n{}",
            said(&preempt)
        )
    });
    assert_eq!(exit.code(), Some(75), "preempted after a checkpoint");
    assert!(
        said(&preempt).contains("job dflt: stopped;"),
        "{}",
        said(&preempt)
    );

    let restart = cryo(dir)
        .args(["restart", "dflt", "--scratch"])
        .arg(dir.join("scratch-restart"))
        .env("CRYO_EXAMPLE_STEP_MS", "0")
        .output()
        .unwrap();
    assert!(restart.status.success(), "{}", said(&restart));
    assert!(
        said(&restart).contains("from epoch 2"),
        "{}",
        said(&restart)
    );
    assert_same_file(&dir.join("reference.final"), &dir.join("run.final"));
    assert_same_file(&dir.join("reference.log"), &dir.join("run.log"));
}

/// The agents' sockets and logs of `cryo run` live in the user's own
/// folder of the temporary one: a folder there that another user made
/// first (open to all) is refused by name rather than used, and a run
/// that went well leaves nothing behind in it.
#[test]
fn the_agents_scratch_is_private_and_goes_with_a_run_that_went_well() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_input(&dir.join("input.dat"), 50_000);
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let users = tmp.join(format!("cryo-{}", nix::unistd::geteuid()));
    std::fs::create_dir(&users).unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = |tag: &str| {
        let mut args = counter_args(dir, tag);
        args[1] = "5".into();
        cryo(dir)
            .args(["run", "--job", tag, "--nodes", "a:1", "-n", "1", "--store"])
            .arg(dir.join("store"))
            .arg("--")
            .arg(built().join("cryo-counter"))
            .args(args)
            .env("TMPDIR", &tmp)
            .output()
            .unwrap()
    };
    let out = run("squatted");
    assert!(!out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("writable by others (mode 777)"),
        "{}",
        said(&out)
    );
    assert!(
        said(&out).contains(&users.display().to_string()),
        "{}",
        said(&out)
    );

    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run("private");
    assert!(out.status.success(), "{}", said(&out));
    let left: Vec<_> = std::fs::read_dir(&users).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The longest name a job may have still gives its agent a socket path
    // short enough to bind (at most 107 bytes).
    let longest = "l".repeat(cryo_core::names::MAX_JOB_NAME);
    let out = run(&longest);
    assert!(out.status.success(), "{}", said(&out));
    let left: Vec<_> = std::fs::read_dir(&users).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A store another user made, closed to others (the first user's job made
/// it 0700), is refused by name with the fix, not with a bare "permission
/// denied". Run as `nobody` through `setpriv`, which needs root.
#[test]
fn a_store_closed_to_the_user_is_named_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running cryo as another user needs root");
        return;
    }
    // Found before the second run's PATH hides it.
    let setpriv = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("setpriv"))
                .find(|p| p.is_file())
        })
        .expect("setpriv (util-linux) on PATH");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Nobody must reach the binary and the store: the build tree may be
    // private to root.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cryo_copy = dir.join("cryo");
    std::fs::copy(built().join("cryo"), &cryo_copy).unwrap();
    let store = dir.join("site-store");
    std::fs::create_dir(&store).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody_tmp = dir.join("tmp");
    std::fs::create_dir(&nobody_tmp).unwrap();
    std::fs::set_permissions(&nobody_tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // `cryo` as nobody, in its own folder.
    let nobody = |args: &[&str]| {
        let mut cmd = Command::new(&setpriv);
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&cryo_copy)
            .args(args)
            .arg(&store)
            .env_remove("CRYO_STORE")
            .env("HOME", &nobody_tmp)
            .env("TMPDIR", &nobody_tmp);
        cmd.current_dir(&nobody_tmp);
        cmd
    };
    let as_nobody = || {
        let mut cmd = nobody(&[
            "run", "--job", "closed", "--nodes", "a:1", "-n", "1", "--store",
        ]);
        cmd.args(["--", "/bin/true"]);
        cmd
    };
    let out = as_nobody().output().unwrap();
    let text = said(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "store {} is another user's (uid 0, mode 0755)",
            store.display()
        )) && text.contains(&format!("chmod 1777 {}", store.display())),
        "{text}"
    );
    assert!(!store.join("closed").exists());
    // Opened to every user as the README says, the same run gets past it.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = as_nobody()
        // Past the store it stops quickly at the launcher or the agent.
        .env("PATH", &nobody_tmp)
        .output()
        .unwrap();
    assert!(!said(&out).contains("another user's"), "{}", said(&out));
    assert!(
        store.join("closed").join("epochs").is_dir(),
        "{}",
        said(&out)
    );
    // A job of another user's (root's, its folder 0700) is named by the
    // commands over every job, not passed over in silence.
    let theirs = store.join("theirs");
    std::fs::create_dir_all(theirs.join("epochs")).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    for command in ["ls", "gc"] {
        let out = nobody(&[command]).output().unwrap();
        let text = said(&out);
        assert!(out.status.success(), "cryo {command}: {text}");
        assert!(
            text.contains(&format!(
                "1 job in {} belongs to other users and is passed over (closed to you): theirs",
                store.display()
            )),
            "cryo {command}: {text}"
        );
    }
}

/// `cryo run` of one job started several times at once: exactly one runs
/// and keeps its job reachable; the others are refused before they write
/// anything (a second token would lock `cryo status` and the agents out).
#[test]
fn runs_of_one_job_started_at_once_leave_one_running_and_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let store = dir.join("store");
    let start = || {
        cryo(dir)
            .args([
                "run", "--job", "twice", "--nodes", "a:1", "-n", "1", "--store",
            ])
            .arg(&store)
            .args(["--", "sleep", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let runs: Vec<_> = (0..4).map(|_| start()).collect();
    // While the one that won runs, `cryo status` reaches it.
    std::thread::sleep(Duration::from_millis(1500));
    let status = cryo(dir)
        .args(["status", "twice", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let outs: Vec<Output> = runs
        .into_iter()
        .map(|r| r.wait_with_output().unwrap())
        .collect();
    let refused: Vec<&Output> = outs
        .iter()
        .filter(|o| {
            let text = said(o);
            text.contains("is already running") || text.contains("is being started or stopped")
        })
        .collect();
    let all: Vec<String> = outs.iter().map(said).collect();
    assert_eq!(refused.len(), 3, "{all:#?}");
    assert!(refused.iter().all(|o| !o.status.success()), "{all:#?}");
    assert!(
        said(&status).contains("twice"),
        "cryo status: {}\nruns: {all:#?}",
        said(&status)
    );
    assert!(!said(&status).contains("not running"), "{}", said(&status));
    // It never checkpointed: a restart says there is nothing to resume.
    let restart = cryo(dir)
        .args(["restart", "twice", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(!restart.status.success(), "{}", said(&restart));
    assert!(
        said(&restart).contains("no checkpoint of it was ever completed"),
        "{}",
        said(&restart)
    );
}
