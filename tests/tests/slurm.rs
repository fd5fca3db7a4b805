//! End-to-end tests on a real Slurm: slurmctld, slurmd and munged from
//! Debian's packages, on this machine, with a private `slurm.conf` on free
//! ports (tests/slurm/slurm-up.sh), and cryo's SPANK plugin in the plugin
//! stack. Each test submits the heat2d example with the shipped template
//! `slurm/cryo.sbatch`, interrupts it the way Slurm users meet it, lets
//! Slurm start it again, and requires the final grid and the residual log
//! to be byte-identical to an uninterrupted run.
//!
//! Without Slurm these tests fail, loudly: set `CRYO_SKIP_SLURM=1` to skip
//! them on a machine that cannot run it (they then print SKIPPED).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryo_tests::slurm_jobs::{
    path_with_built, slurm_available, submit, submit_heat2d, wait_done, SlurmJobs,
};
use cryo_tests::{build_packages, lines, output_text, Heat2dFiles};

const RANKS: u32 = 4;

/// One Slurm at a time: the jobs share the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn built() -> PathBuf {
    build_packages(&[
        "cryo-coordinator",
        "cryo-agent",
        "cryo-heat2d",
        "cryo-rank",
        "cryo-slurm",
    ])
}

/// A private single-node Slurm, stopped on drop.
struct Slurm {
    dir: tempfile::TempDir,
}

impl Slurm {
    /// A Slurm with `plugin` in its plugin stack, or none.
    fn up(plugin: Option<&Path>) -> Slurm {
        Self::up_with(plugin, "")
    }

    /// A Slurm whose plugin stack holds `plugin` with the arguments `args`.
    fn up_with(plugin: Option<&Path>, args: &str) -> Slurm {
        let dir = tempfile::Builder::new()
            .prefix("cryo-slurm-")
            .tempdir()
            .unwrap();
        let mut up = Command::new("bash");
        up.arg(root().join("tests/slurm/slurm-up.sh"))
            .arg(dir.path().join("cluster"));
        if let Some(plugin) = plugin {
            let plugstack = dir.path().join("plugstack.conf");
            fs::write(
                &plugstack,
                format!("required {} {args}\n", plugin.display()),
            )
            .unwrap();
            up.arg(&plugstack);
        }
        let out = up.output().unwrap();
        assert!(
            out.status.success(),
            "slurm-up.sh failed:\n{}",
            output_text(&out)
        );
        Slurm { dir }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("cluster/slurm.conf")
    }

    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl SlurmJobs for Slurm {
    /// `JobState` and `Restarts` from `scontrol show job`.
    fn job_state(&self, id: &str) -> (String, u32) {
        let out = self.run("scontrol", &["show", "job", id]);
        let field = |name: &str| {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or("")
                .to_owned()
        };
        (field("JobState"), field("Restarts").parse().unwrap_or(0))
    }

    fn release(&self, id: &str) {
        let _ = self
            .cmd("scontrol")
            .args(["update", &format!("JobId={id}"), "StartTime=now"])
            .output();
    }

    /// Whether a slurmstepd of the job's previous start is still cleaning
    /// up: the next start reuses its step ids, so it must be gone first.
    fn previous_start_alive(&self, id: &str) -> bool {
        Command::new("pgrep")
            .args(["-f", &format!("slurmstepd: \\[{id}\\.")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn logs(&self) -> String {
        String::new()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let cluster = self.dir.path().join("cluster");
        let _ = Command::new("bash")
            .arg(root().join("tests/slurm/slurm-down.sh"))
            .arg(&cluster)
            .output();
        if std::thread::panicking() {
            // Keep the daemons' logs of a failed test.
            let kept = self.dir.path().with_extension("kept");
            if fs::rename(self.dir.path(), &kept).is_ok() {
                eprintln!("Slurm's logs are in {}", kept.join("cluster/log").display());
            }
        }
    }
}

/// The heat2d job's files.
struct Case {
    files: Heat2dFiles,
}

impl Case {
    fn new() -> Case {
        let heat2d = built().join("heat2d");
        let files = Heat2dFiles::new("cryo-slurm-job-", &heat2d);
        // The uninterrupted reference, without cryo or Slurm.
        files.reference(&heat2d, RANKS);
        Case { files }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }

    fn app_args(&self, tag: &str, step_ms: u32) -> Vec<String> {
        self.files.app_args(tag, step_ms)
    }

    /// Submits heat2d with slurm/cryo.sbatch; the command line's options
    /// override the template's `#SBATCH` lines where a test needs it.
    fn submit(&self, slurm: &Slurm, options: &[&str], step_ms: u32) -> String {
        self.submit_with_env(slurm, options, step_ms, &[])
    }

    fn submit_with_env(
        &self,
        slurm: &Slurm,
        options: &[&str],
        step_ms: u32,
        env: &[(&str, &str)],
    ) -> String {
        let ranks = format!("--ntasks={RANKS}");
        let mut all = vec!["--nodes=1", ranks.as_str(), "--overcommit"];
        all.extend_from_slice(options);
        let mut sbatch = slurm.cmd("sbatch");
        sbatch.envs(env.iter().copied());
        submit_heat2d(sbatch, &self.files, &all, step_ms)
    }

    fn job_out(&self) -> String {
        fs::read_to_string(self.path("job.out")).unwrap_or_default()
    }

    fn wait_for_iterations(&self, count: usize) {
        let start = Instant::now();
        while lines(&self.path("run.log")) < count {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the job did not reach iteration {count}; its output:\n{}",
                self.job_out()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_identical(&self) {
        self.files.assert_matches_reference("run");
    }
}

fn setup() -> Option<(std::sync::MutexGuard<'static, ()>, Slurm, Case)> {
    setup_with(true)
}

/// A Slurm with cryo's plugin (or without any), and a heat2d case.
fn setup_with(plugin: bool) -> Option<(std::sync::MutexGuard<'static, ()>, Slurm, Case)> {
    if !slurm_available() {
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let plugin = plugin.then(|| built().join("libspank_cryo.so"));
    let case = Case::new();
    Some((guard, Slurm::up(plugin.as_deref()), case))
}

/// `scancel --signal=USR1 --batch` (what Slurm sends before the time limit
/// or at a preemption): the job checkpoints, requeues itself, and the next
/// start resumes from the checkpoint.
#[test]
fn usr1_checkpoints_requeues_and_resumes_identically() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let id = case.submit(&slurm, &[], 300);
    case.wait_for_iterations(20);
    slurm.run("scancel", &["--signal=USR1", "--batch", &id]);
    let restarts = wait_done(&slurm, &id, Duration::from_secs(240), &case.path("job.out"));
    let out = case.job_out();
    assert!(restarts >= 1, "the job was not requeued:\n{out}");
    assert!(
        out.contains("requested (SIGUSR1: checkpoint and requeue)"),
        "{out}"
    );
    assert!(out.contains("requeueing Slurm job"), "{out}");
    assert!(out.contains("resuming job"), "{out}");
    assert!(out.contains("heat2d: restarted from epoch"), "{out}");
    case.assert_identical();
    assert_no_stray_agent();
}

/// A plain `scancel` of a `--requeue` job sends SIGTERM to `cryo run` and
/// to every rank (and agent), as Slurm does for every stop it gives no
/// warning of: the ranks compute on to a safe point, the job is
/// checkpointed and stopped, and it stays cancelled. (cryo requeued it, and
/// it ran again from its checkpoint; the ranks died before they parked,
/// and no checkpoint was taken.)
#[test]
fn scancel_cancels_a_requeue_job_for_good() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let id = case.submit(&slurm, &[], 300);
    case.wait_for_iterations(20);
    slurm.run("scancel", &[&id]);
    let start = Instant::now();
    let mut ended_at: Option<Instant> = None;
    // Ended, and still ended (not back in the queue) 10 s later.
    loop {
        let (state, restarts) = slurm.job_state(&id);
        assert_eq!(
            restarts,
            0,
            "the cancelled job was requeued ({state}):\n{}",
            case.job_out()
        );
        match state.as_str() {
            "RUNNING" | "COMPLETING" | "PENDING" | "REQUEUED" => ended_at = None,
            _ => {
                let at = *ended_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(10) {
                    assert_eq!(state, "CANCELLED", "{}", case.job_out());
                    break;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "job {id} did not end ({state}):\n{}",
            case.job_out()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = case.job_out();
    assert!(out.contains("cryo does not requeue the job"), "{out}");
    assert!(!out.contains("requeueing Slurm job"), "{out}");
    assert!(out.contains("preempted after committing epoch 1"), "{out}");
    assert_no_stray_agent();
}

/// The agents stopped with their steps: no stray daemon. (The agents' own
/// command lines are `cryo-agent serve` with settings in the environment.)
fn assert_no_stray_agent() {
    let leftover = Command::new("pgrep")
        .args(["-af", "cryo-agent serve$"])
        .output()
        .unwrap();
    assert!(
        !leftover.status.success(),
        "a cryo-agent outlived its step: {}",
        output_text(&leftover)
    );
}

/// An admin's `scontrol requeue` kills the running job outright; the next
/// start resumes from the newest periodic checkpoint (`--cryo-interval`).
#[test]
fn scontrol_requeue_resumes_from_the_last_interval_checkpoint() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let id = case.submit(&slurm, &["--cryo-interval=2"], 300);
    let start = Instant::now();
    while !case.job_out().contains("committed") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no interval checkpoint committed:\n{}",
            case.job_out()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    case.wait_for_iterations(30);
    slurm.run("scontrol", &["requeue", &id]);
    let restarts = wait_done(&slurm, &id, Duration::from_secs(240), &case.path("job.out"));
    let out = case.job_out();
    assert!(restarts >= 1, "the job was not requeued:\n{out}");
    assert!(out.contains("resuming job"), "{out}");
    case.assert_identical();
}

/// The time-limit path: `--time=1` with `--signal=B:USR1@50`: Slurm warns
/// the job before its minute is up, the job checkpoints and requeues, and
/// it finishes in a later allocation.
#[test]
fn time_limit_job_finishes_across_allocations() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    // 100 iterations of 700 ms cannot fit in one minute.
    let id = case.submit(&slurm, &["--time=1", "--signal=B:USR1@50"], 700);
    let restarts = wait_done(&slurm, &id, Duration::from_secs(420), &case.path("job.out"));
    let out = case.job_out();
    assert!(restarts >= 1, "the job finished without a requeue:\n{out}");
    assert!(out.contains("checkpoint and requeue"), "{out}");
    assert!(out.contains("resuming job"), "{out}");
    case.assert_identical();
}

/// An agent that cannot start fails the step, and the plugin says why in
/// the job's output, in plain words.
#[test]
fn an_agent_that_cannot_start_fails_the_step_with_its_reason() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let id = case.submit_with_env(&slurm, &[], 0, &[("CRYO_AGENT_BIN", "/bin/false")]);
    let start = Instant::now();
    loop {
        let (state, _) = slurm.job_state(&id);
        if matches!(state.as_str(), "COMPLETED" | "FAILED" | "CANCELLED") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} still {state}:\n{}",
            case.job_out()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = case.job_out();
    assert!(
        out.contains("cryo: the node agent could not start on"),
        "{out}"
    );
    assert!(out.contains("before listening"), "{out}");
    assert!(
        !case.path("run.out").exists(),
        "the ranks must not have run"
    );
    // The failed agent's log is kept for whoever looks into it; this test
    // has read its reason, so it takes the folder away.
    let kept = agent_folders(&id);
    assert!(
        kept.iter().any(|dir| dir.join("agent.log").is_file()),
        "no agent log kept for job {id}: {kept:?}"
    );
    for dir in kept {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The node-local agent folders of the Slurm job `id` on this host
/// (`/tmp/cryo-<uid>/slurm-<id>.<store key>`), or with `id` empty, of
/// every Slurm job.
fn agent_folders(id: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/tmp/cryo-{}", nix::unistd::getuid()));
    let prefix = if id.is_empty() {
        "slurm-".to_owned()
    } else {
        format!("slurm-{id}.")
    };
    (fs::read_dir(&root).into_iter().flatten().flatten())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect()
}

/// An admin's `cryo preempt <slurm job id>` from outside the job, from a
/// directory of its own and naming no store: the job's store is found as
/// the site's `store=` in the plugin stack. The job checkpoints, stops,
/// requeues itself (`--requeue`) and resumes exactly.
#[test]
fn cryo_preempt_with_a_slurm_job_id_requeues_and_resumes() {
    if !slurm_available() {
        return;
    }
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let case = Case::new();
    let site_store = format!("store={}", case.path("store").display());
    let plugin = built().join("libspank_cryo.so");
    let slurm = Slurm::up_with(Some(&plugin), &site_store);
    // A store that can never hold checkpoints stops the submission.
    let file = case.path("not-a-folder");
    fs::write(&file, "x").unwrap();
    let refused = slurm
        .cmd("sbatch")
        .arg(format!("--cryo={}", file.display()))
        .args(["--wrap", "true"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("this is a file, not a folder"),
        "{}",
        output_text(&refused)
    );
    let id = case.submit(&slurm, &[], 300);
    case.wait_for_iterations(20);
    let elsewhere = tempfile::tempdir().unwrap();
    let out = slurm
        .cmd(built().join("cryo").to_str().unwrap())
        .arg("preempt")
        .arg(&id)
        .env_remove("CRYO_STORE")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "cryo preempt {id}: {text}");
    assert!(
        text.contains(&format!("job slurm-{id}: epoch 1 committed")),
        "{text}"
    );
    assert!(text.contains("the Slurm plugin's store="), "{text}");
    assert!(
        text.contains(&format!("stopped; Slurm job {id} goes back in the queue")),
        "{text}"
    );
    let restarts = wait_done(&slurm, &id, Duration::from_secs(240), &case.path("job.out"));
    let log = case.job_out();
    assert!(restarts >= 1, "the job was not requeued:\n{log}");
    assert!(log.contains("requested (cryo preempt)"), "{log}");
    assert!(log.contains("resuming job"), "{log}");
    case.assert_identical();
}

/// Slurm's warning sent to the job's tasks rather than its batch script
/// (`--signal=USR1@T` without `B:`, or `scancel --signal=USR1` without
/// `--batch`): it reaches the ranks, whose runtime passes it through their
/// agent to `cryo run`. The job checkpoints, requeues and resumes exactly,
/// as with the warning sent to the batch script.
#[test]
fn a_warning_sent_to_the_ranks_checkpoints_and_requeues_the_job() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let id = case.submit(&slurm, &[], 300);
    case.wait_for_iterations(20);
    slurm.run("scancel", &["--signal=USR1", &id]);
    let restarts = wait_done(&slurm, &id, Duration::from_secs(240), &case.path("job.out"));
    let log = case.job_out();
    assert!(restarts >= 1, "the job was not requeued:\n{log}");
    assert!(log.contains("taken as a SIGUSR1 to cryo run"), "{log}");
    assert!(log.contains("resuming job"), "{log}");
    case.assert_identical();
}

/// Without the plugin (a site that has not installed it), `cryo run`
/// starts one agent per node as a Slurm step of its own, and the
/// preemption flow works the same.
#[test]
fn without_the_plugin_cryo_run_starts_its_agents_as_a_slurm_step() {
    let Some((_guard, slurm, case)) = setup_with(false) else {
        return;
    };
    let script = format!(
        "exec cryo run --requeue -- {} {}",
        built().join("heat2d").display(),
        case.app_args("run", 300).join(" ")
    );
    let mut sbatch = slurm.cmd("sbatch");
    sbatch
        .env("PATH", path_with_built())
        .env("CRYO_STORE", case.path("store"));
    let log = requeued_once(&slurm, &case, sbatch, &script);
    assert!(log.contains("agent(s) as a step of Slurm srun"), "{log}");
}

/// Submits heat2d's `script` with `sbatch` (its environment and options
/// given), one node of 4 tasks, requeueable; once it computed 20
/// iterations, SIGUSR1 to its batch script: it checkpoints, requeues and
/// resumes, byte-identical, leaving no agent behind. Returns its output.
fn requeued_once(slurm: &Slurm, case: &Case, sbatch: Command, script: &str) -> String {
    requeued_once_checking(slurm, case, sbatch, script, |_| {})
}

/// [`requeued_once`], calling `while_running` with the job id once it has
/// computed 20 iterations, before the signal.
fn requeued_once_checking(
    slurm: &Slurm,
    case: &Case,
    mut sbatch: Command,
    script: &str,
    while_running: impl FnOnce(&str),
) -> String {
    sbatch
        .arg("--parsable")
        .args(["--nodes=1", &format!("--ntasks={RANKS}"), "--overcommit"])
        .args(["--requeue", "--open-mode=append"])
        .arg(format!("--output={}", case.path("job.out").display()))
        .arg(format!("--chdir={}", case.files.dir().display()))
        .arg("--wrap")
        .arg(script);
    // Job ids start again with each Slurm: a folder another test left
    // under this id is not this job's.
    let before = agent_folders("");
    let id = submit(sbatch);
    case.wait_for_iterations(20);
    while_running(&id);
    slurm.run("scancel", &["--signal=USR1", "--batch", &id]);
    let restarts = wait_done(slurm, &id, Duration::from_secs(240), &case.path("job.out"));
    let log = case.job_out();
    assert!(restarts >= 1, "the job was not requeued:\n{log}");
    assert!(log.contains("resuming job"), "{log}");
    case.assert_identical();
    assert_no_stray_agent();
    // The agents' scratch (socket, log) goes with a job that went well.
    let left: Vec<PathBuf> = (agent_folders(&id).into_iter())
        .filter(|dir| !before.contains(dir))
        .collect();
    assert!(left.is_empty(), "{left:?} left behind");
    log
}

/// A job submitted with `--export=NONE`: Slurm leaves `SLURM_EXPORT_ENV=NONE`
/// in the batch script, so every srun in it starts its tasks with Slurm's
/// variables only. `cryo run` still gets its own to its agents' step and
/// to the ranks; the job checkpoints, requeues and resumes identically.
#[test]
fn a_job_submitted_with_export_none_still_reaches_its_agents_and_ranks() {
    submitted_with_export_none(false);
}

/// The same with the plugin and `--cryo=STORE --cryo-interval`: Slurm
/// carries the options to the batch script only in its SPANK environment
/// (`SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo`), where the plugin finds
/// them, so `cryo run` gets the store and the interval and the plugin's
/// agents serve the job.
#[test]
fn the_cryo_options_reach_a_job_submitted_with_export_none() {
    submitted_with_export_none(true);
}

fn submitted_with_export_none(plugin: bool) {
    let Some((_guard, slurm, case)) = setup_with(plugin) else {
        return;
    };
    let store = case.path("store").display().to_string();
    let exported = if plugin {
        String::new()
    } else {
        format!(" CRYO_STORE={store}")
    };
    let script = format!(
        "echo \"export: $SLURM_EXPORT_ENV store: $CRYO_STORE interval: $CRYO_INTERVAL\"; export PATH={path}{exported}; \
         exec cryo run --requeue -- {heat2d} {args}",
        path = path_with_built(),
        heat2d = built().join("heat2d").display(),
        args = case.app_args("run", 300).join(" ")
    );
    let mut sbatch = slurm.cmd("sbatch");
    sbatch.arg("--export=NONE").env_remove("CRYO_STORE");
    if plugin {
        sbatch
            .arg(format!("--cryo={store}"))
            .arg("--cryo-interval=3600");
    }
    let log = requeued_once(&slurm, &case, sbatch, &script);
    let seen = if plugin {
        format!("store: {store} interval: 3600")
    } else {
        "store:  interval: ".to_owned()
    };
    assert!(
        log.contains(&format!("export: NONE {seen}\n")),
        "not a clean environment, or the options lost:\n{log}"
    );
}

/// A bare `--cryo` (no store named: the submission directory's
/// `cryo-store`) reaches the job's own sruns as the text "(null)", which
/// the plugin refused as a relative store, failing every step. The job
/// runs under the plugin's agents, checkpoints, requeues and resumes.
#[test]
fn a_bare_cryo_option_runs_the_job_with_the_default_store() {
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let script = format!(
        "export PATH={path}; exec cryo run --requeue -- {heat2d} {args}",
        path = path_with_built(),
        heat2d = built().join("heat2d").display(),
        args = case.app_args("run", 300).join(" ")
    );
    let mut sbatch = slurm.cmd("sbatch");
    // The store is resolved where sbatch runs.
    sbatch
        .arg("--cryo")
        .env_remove("CRYO_STORE")
        .current_dir(case.files.dir());
    // `cryo status ID` from elsewhere, naming no store, finds the job's
    // in its working directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let status = |id: &str| {
        let out = slurm
            .cmd(built().join("cryo").to_str().unwrap())
            .args(["status", id])
            .env_remove("CRYO_STORE")
            .current_dir(elsewhere.path())
            .output()
            .unwrap();
        let text = output_text(&out);
        assert!(out.status.success(), "cryo status {id}: {text}");
        assert!(text.contains(&format!("slurm-{id}")), "{text}");
        assert!(text.contains("the Slurm job's working directory"), "{text}");
    };
    let log = requeued_once_checking(&slurm, &case, sbatch, &script, status);
    let store = case.files.dir().join("cryo-store");
    assert!(
        log.contains(&format!("store {}", store.display())),
        "not the default store:\n{log}"
    );
}

/// An Open MPI program under srun on a site that chose no MPI plugin
/// (`MpiDefault=none`, Debian's): Debian's Open MPI has no Slurm PMI-2,
/// so `cryo run` asks srun for PMIx, which it lists here. The C heat2d
/// built with Open MPI checkpoints, requeues and resumes byte-identically.
#[test]
fn an_open_mpi_program_runs_under_srun_where_the_site_chose_no_plugin() {
    use cryo_tests::heat2d::{c_heat2d, openmpi_available, Mpi};
    if !openmpi_available() {
        return;
    }
    let Some((_guard, slurm, case)) = setup() else {
        return;
    };
    let program = c_heat2d(Mpi::OpenMpi);
    let script = format!(
        "export PATH={path}; exec cryo run --requeue -- {program} {args}",
        path = path_with_built(),
        program = program.display(),
        args = case.app_args("run", 300).join(" ")
    );
    let mut sbatch = slurm.cmd("sbatch");
    sbatch
        .arg(format!("--cryo={}", case.path("store").display()))
        .env_remove("SLURM_MPI_TYPE");
    requeued_once(&slurm, &case, sbatch, &script);
}
