//! Where a running job's coordinator can be found, and what it ran.
//!
//! ```text
//! STORE/<job>/run/token          the job's secret token (0600)
//! STORE/<job>/run/coordinator    address and pid of the live coordinator
//! STORE/<job>/run/command.json   program, arguments, world size: for restart
//! STORE/<job>/run/run.lock       flock held by the job's one cryo run or restart
//! ```
//!
//! The store is the one place every node and every later allocation shares,
//! so `cryo checkpoint JOB` on a login node and `cryo restart JOB` in the
//! next Slurm allocation both find what they need there.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::fs::File;

use anyhow::{bail, Context, Result};
use cryo_core::store::durable::{self, create_dir_all, read_capped};
use cryo_core::store::JobStore;
use cryo_core::token::JobToken;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// What `cryo run` launched, kept for `cryo restart`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCommand {
    /// The program, as bytes (paths need not be UTF-8).
    pub program: Vec<u8>,
    /// Its arguments.
    pub args: Vec<Vec<u8>>,
    /// The working directory.
    pub cwd: Vec<u8>,
    /// MPI world size.
    pub world_size: u32,
    /// The launcher `cryo run` was told to use (`--launcher`), which
    /// `cryo restart` uses again unless told otherwise. Absent in the
    /// commands of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<Vec<u8>>,
    /// The job's newest committed epoch when this run started from the
    /// beginning: the epochs up to it are an earlier run's (the same name
    /// reused, a Slurm job id given again), so a resume never picks them.
    /// Absent: every epoch is this run's. Carried on by its restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_after: Option<u64>,
}

impl JobCommand {
    /// Captures a command. The program is recorded by its absolute path, so
    /// that `cryo restart` runs the same binary whatever its `PATH`.
    pub fn new(program: &OsString, args: &[OsString], cwd: &Path, world_size: u32) -> JobCommand {
        let program = resolve_program(program, cwd);
        JobCommand {
            program: program.as_bytes().to_vec(),
            args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
            cwd: cwd.as_os_str().as_bytes().to_vec(),
            world_size,
            launcher: None,
            fresh_after: None,
        }
    }

    /// Whether it runs the same program with the same arguments in the
    /// same directory as `other`.
    pub fn same_program(&self, other: &JobCommand) -> bool {
        (&self.program, &self.args, &self.cwd) == (&other.program, &other.args, &other.cwd)
    }

    /// One line for people: the program, its arguments and where it ran.
    pub fn describe(&self) -> String {
        let mut words = vec![String::from_utf8_lossy(&self.program).into_owned()];
        words.extend(
            self.args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        );
        format!(
            "{} (in {})",
            words.join(" "),
            String::from_utf8_lossy(&self.cwd)
        )
    }

    /// Records the launcher `cryo run` was told to use.
    pub fn with_launcher(mut self, launcher: Option<&Path>) -> JobCommand {
        self.launcher = launcher.map(|l| l.as_os_str().as_bytes().to_vec());
        self
    }

    /// The launcher `cryo run` was told to use, if any.
    pub fn launcher(&self) -> Option<PathBuf> {
        self.launcher
            .as_ref()
            .map(|l| PathBuf::from(OsString::from_vec(l.clone())))
    }

    /// The program.
    pub fn program(&self) -> OsString {
        OsString::from_vec(self.program.clone())
    }

    /// The arguments.
    pub fn args(&self) -> Vec<OsString> {
        self.args
            .iter()
            .map(|a| OsString::from_vec(a.clone()))
            .collect()
    }

    /// The working directory.
    pub fn cwd(&self) -> PathBuf {
        PathBuf::from(OsString::from_vec(self.cwd.clone()))
    }
}

/// `prog` through `PATH`, `./prog` against `cwd`; left as it is when it
/// cannot be found (the launcher will say so).
fn resolve_program(program: &OsString, cwd: &Path) -> OsString {
    use std::os::unix::fs::PermissionsExt;
    let path = Path::new(program);
    if path.is_absolute() {
        return program.clone();
    }
    if program.as_bytes().contains(&b'/') {
        return cwd.join(path).into_os_string();
    }
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(path))
        .find(|candidate| candidate.is_absolute() && executable(candidate))
        .map_or_else(|| program.clone(), PathBuf::into_os_string)
}

/// The live coordinator's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorAddr {
    /// `host:port`.
    pub addr: String,
    /// Its pid.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// The Slurm job it puts back in the queue when it is preempted
    /// (`cryo run --requeue` inside one); `None` when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeues: Option<String>,
}

/// How long `cryo run` or `cryo restart` waits for another run of the job
/// that is starting or stopping.
pub const RUN_LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// The job's run lock, held by its one running `cryo run` (or restart)
/// until that process exits (`None` on a filesystem without `flock`).
#[derive(Debug)]
pub struct RunLock {
    _lock: Option<Flock<File>>,
}

/// The `run/` directory of a job.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// The registry of `job`.
    pub fn of(job: &JobStore) -> Registry {
        Registry {
            dir: job.dir().join("run"),
        }
    }

    /// Path of the token file.
    pub fn token_path(&self) -> PathBuf {
        self.dir.join("token")
    }

    /// Creates the directory and a fresh token.
    pub fn create_token(&self) -> Result<JobToken> {
        create_dir_all(&self.dir)?;
        let token = JobToken::generate()?;
        token.write(&self.token_path())?;
        durable::sync_dir(&self.dir)?;
        Ok(token)
    }

    /// Takes the job's run lock before anything of the run is written: two
    /// `cryo run` or `cryo restart` of one job started
    /// at once would otherwise both pass the check for a running
    /// coordinator, and the second would replace the first's token and
    /// entry, leaving a running job no command reaches. The file is opened
    /// close-on-exec, so the job's processes do not hold it.
    ///
    /// A run still stopping (its coordinator has left the registry) or
    /// starting (it has not entered it yet) is waited for, up to
    /// [`RUN_LOCK_PATIENCE`]: `cryo restart` right after `cryo preempt`,
    /// or a requeued job's next run, goes ahead once the old one exits.
    pub fn lock_run(&self, job: &str) -> Result<RunLock> {
        create_dir_all(&self.dir)?;
        let path = self.run_lock_path();
        let deadline = Instant::now() + RUN_LOCK_PATIENCE;
        let mut told = false;
        let mut file = cryo_core::private_dir::create_file(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(RunLock { _lock: Some(lock) }),
                Err((back, Errno::EWOULDBLOCK)) => {
                    file = back;
                    if let Ok(existing) = self.coordinator(job) {
                        bail!(
                            "job {job:?} is already running (coordinator pid {} on {})",
                            existing.pid,
                            existing.host
                        );
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "job {job:?} is being started or stopped by another cryo run or \
                             cryo restart (it has held {} for {} s); try again once that one \
                             has started or exited",
                            path.display(),
                            RUN_LOCK_PATIENCE.as_secs()
                        );
                    }
                    if !told {
                        cryo_core::say!(
                            "cryo: job {job:?} is being started or stopped by another cryo run \
                             or cryo restart: waiting for it (up to {} s)",
                            RUN_LOCK_PATIENCE.as_secs()
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, errno)) => {
                    tracing::debug!(job, path = %path.display(), error = %errno, "run_lock.unsupported");
                    return Ok(RunLock { _lock: None });
                }
            }
        }
    }

    /// Waits until no `cryo run` or `cryo restart` of the job holds its run
    /// lock (its last run has exited); whether that came within `patience`.
    /// `true` where the lock cannot be taken at all (no `flock`).
    pub fn wait_run_released(&self, patience: Duration) -> bool {
        let path = self.run_lock_path();
        let deadline = Instant::now() + patience;
        loop {
            let Ok(file) = File::open(&path) else {
                // Never locked.
                return true;
            };
            // Shared, and dropped at once: a run starting meanwhile waits
            // for it rather than failing.
            match Flock::lock(file, FlockArg::LockSharedNonblock) {
                Ok(_probe) => return true,
                Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, Errno::EWOULDBLOCK)) => return false,
                Err(_) => return true,
            }
        }
    }

    fn run_lock_path(&self) -> PathBuf {
        self.dir.join("run.lock")
    }

    /// Reads the token.
    pub fn token(&self) -> Result<JobToken> {
        JobToken::read(&self.token_path()).with_context(|| {
            format!(
                "no usable job token in {} (is the job running, and are you its owner?)",
                self.token_path().display()
            )
        })
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        create_dir_all(&self.dir)?;
        let text = serde_json::to_vec_pretty(value)?;
        durable::write_replace(&self.dir.join(name), &[&text])?;
        durable::sync_dir(&self.dir)?;
        Ok(())
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T> {
        let path = self.dir.join(name);
        let bytes =
            read_capped(&path, 1 << 20).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is malformed", path.display()))
    }

    /// Records the command for restarts.
    pub fn write_command(&self, command: &JobCommand) -> Result<()> {
        self.write_json("command.json", command)
    }

    /// The command the job ran.
    pub fn command(&self) -> Result<JobCommand> {
        self.read_json("command.json")
            .context("this job was not started by `cryo run`, so its command is unknown")
    }

    /// Publishes the coordinator's address.
    pub fn write_coordinator(&self, addr: &CoordinatorAddr) -> Result<()> {
        self.write_json("coordinator", addr)
    }

    /// The coordinator's address, if one is registered, its process is
    /// alive (when it runs on this host) and it accepts connections.
    pub fn coordinator(&self, job: &str) -> Result<CoordinatorAddr> {
        let entry = self.dir.join("coordinator");
        if !entry.exists() {
            bail!(
                "job {job:?} is not running (no coordinator is registered: {} is missing)",
                entry.display()
            );
        }
        let addr: CoordinatorAddr = self
            .read_json("coordinator")
            .with_context(|| format!("job {job:?} has no running coordinator"))?;
        if addr.host == hostname() && !pid_alive(addr.pid) {
            bail!(
                "job {job:?} is not running (its coordinator, pid {} on {}, has exited)",
                addr.pid,
                addr.host
            );
        }
        // A coordinator killed outright leaves its entry behind. On another
        // node nothing here can see its pid; on this one the pid may since
        // be another process's (reused after a requeue onto the same node,
        // or a zombie its parent has not reaped): only one that still
        // answers counts.
        if !answers(&addr.addr) {
            if addr.host != hostname() {
                // From another host, a coordinator that does not answer
                // may be running behind a network that does not reach it.
                bail!(
                    "job {job:?}: its coordinator at {} (pid {} on {}) does not answer from this \
                     host ({}): it has stopped, or {} cannot be reached from here",
                    addr.addr,
                    addr.pid,
                    addr.host,
                    hostname(),
                    addr.host
                );
            }
            bail!(
                "job {job:?} is not running (its coordinator at {}, pid {} on {}, does not answer)",
                addr.addr,
                addr.pid,
                addr.host
            );
        }
        Ok(addr)
    }

    /// Removes the coordinator's address (the job ended).
    pub fn clear_coordinator(&self) {
        let _ = std::fs::remove_file(self.dir.join("coordinator"));
    }

    /// Notes whether the job's last run finished (its launcher exited 0),
    /// for a restart to say it runs a finished job again.
    pub fn set_finished(&self, finished: bool) {
        let marker = self.dir.join("finished");
        let _ = if finished {
            // Mode 0600, as every file of the job's.
            cryo_core::private_dir::create_file(&marker).map(drop)
        } else {
            std::fs::remove_file(marker)
        };
    }

    /// Whether the job's last run finished.
    pub fn finished(&self) -> bool {
        self.dir.join("finished").exists()
    }
}

fn answers(addr: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok())
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// This host's name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launcher_is_remembered_and_older_commands_still_read() {
        let cwd = Path::new("/work/job");
        let command = JobCommand::new(&"/bin/app".into(), &[], cwd, 4)
            .with_launcher(Some(Path::new("mpirun.openmpi")));
        let json = serde_json::to_string(&command).expect("encodes");
        let back: JobCommand = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back.launcher(), Some(PathBuf::from("mpirun.openmpi")));
        // A command written before the launcher was recorded.
        let older = r#"{"program":[47],"args":[],"cwd":[47],"world_size":2}"#;
        let older: JobCommand = serde_json::from_str(older).expect("an older command decodes");
        assert_eq!(older.launcher(), None);
        assert_eq!(older.world_size, 2);
    }

    #[test]
    fn a_run_holding_the_lock_is_waited_for_until_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry {
            dir: dir.path().join("run"),
        };
        // Never locked: nothing to wait for.
        assert!(registry.wait_run_released(Duration::ZERO));
        let held = registry.lock_run("job").expect("locks");
        assert!(!registry.wait_run_released(Duration::from_millis(100)));
        let waiter = {
            let registry = registry.clone();
            std::thread::spawn(move || registry.wait_run_released(Duration::from_secs(20)))
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        assert!(waiter.join().expect("joins"), "the run's exit was noticed");
        // A run starting while another stops (no coordinator registered)
        // waits for it, then takes the lock.
        let held = registry.lock_run("job").expect("locks");
        let starter = {
            let registry = registry.clone();
            std::thread::spawn(move || {
                registry
                    .lock_run("job")
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!starter.is_finished(), "the second run did not wait");
        drop(held);
        starter
            .join()
            .expect("joins")
            .expect("the second run takes the lock once the first exits");
    }

    #[test]
    fn a_leftover_entry_whose_pid_lives_on_in_another_process_is_not_a_running_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry {
            dir: dir.path().join("run"),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let entry = CoordinatorAddr {
            addr: listener.local_addr().expect("addr").to_string(),
            // A live pid: this test's own.
            pid: std::process::id(),
            host: hostname(),
            requeues: None,
        };
        let err = format!("{:#}", registry.coordinator("j").expect_err("none"));
        assert!(
            err.contains("is not running") && err.contains("is missing"),
            "{err}"
        );
        registry.write_coordinator(&entry).expect("writes");
        assert_eq!(registry.coordinator("j").expect("answers"), entry);
        // The coordinator is gone, its pid still names a live process.
        drop(listener);
        let err = format!("{:#}", registry.coordinator("j").expect_err("stale"));
        assert!(
            err.contains("is not running") && err.contains("does not answer"),
            "{err}"
        );
        // A pid that has exited.
        let gone = CoordinatorAddr {
            pid: u32::MAX - 1,
            ..entry
        };
        registry.write_coordinator(&gone).expect("writes");
        let err = format!("{:#}", registry.coordinator("j").expect_err("exited"));
        assert!(err.contains("has exited"), "{err}");
        // On another host, silence may be the network's: not "not running".
        let elsewhere = CoordinatorAddr {
            host: format!("{}-elsewhere", hostname()),
            ..gone
        };
        registry.write_coordinator(&elsewhere).expect("writes");
        let err = format!("{:#}", registry.coordinator("j").expect_err("silent"));
        assert!(
            err.contains("does not answer from this host")
                && err.contains("cannot be reached from here")
                && !err.contains("is not running"),
            "{err}"
        );
    }

    #[test]
    fn programs_are_recorded_by_absolute_path() {
        let cwd = Path::new("/work/job");
        let command = JobCommand::new(&"./app".into(), &[], cwd, 1);
        assert_eq!(command.program(), OsString::from("/work/job/./app"));
        let command = JobCommand::new(&"sh".into(), &[], cwd, 1);
        assert!(
            Path::new(&command.program()).is_absolute(),
            "{:?}",
            command.program()
        );
        let command = JobCommand::new(&"no-such-program-here".into(), &[], cwd, 1);
        assert_eq!(command.program(), OsString::from("no-such-program-here"));
    }
}
