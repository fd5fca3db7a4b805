//! Starting and stopping one node's `cryo-agent` from slurmstepd.
//!
//! slurmstepd runs as root; the agent must run as the job's user, with the
//! job's groups, in a private node-local folder, and must not outlive the
//! step. It stays a child of slurmstepd (so the step's process tracking
//! sees it) and is stopped by the plugin's `exit` callback; on its own it
//! also exits when it loses the job's coordinator.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid};

/// How long the plugin waits for the agent's socket before failing the step.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping agent gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The `cryo-agent` binary.
    pub binary: PathBuf,
    /// Its node-local socket (from `CRYO_AGENT_SOCKET`).
    pub socket: PathBuf,
    /// The step's environment, which carries the agent's settings.
    pub env: Vec<(OsString, OsString)>,
    /// The job's user.
    pub uid: u32,
    /// The job's group.
    pub gid: u32,
    /// The job's supplementary groups.
    pub groups: Vec<u32>,
}

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The socket path is unusable.
    #[error("the agent socket {} has no folder", .0.display())]
    NoFolder(PathBuf),
    /// The private folder is not private.
    #[error("{} exists but is {what}; remove it or fix its owner", path.display())]
    UnsafeFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file-system step failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// The step.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The process did not start.
    #[error("cannot run {}: {source}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// It started and exited.
    #[error("it exited ({status}) before listening; its log ({}) ends with:\n{tail}", log.display())]
    Exited {
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// It did not listen in time.
    #[error("its socket {} did not appear within {} s (log: {})", socket.display(), START_TIMEOUT.as_secs(), log.display())]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// Its log.
        log: PathBuf,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits until its socket exists.
    pub fn start(spec: &AgentSpec) -> Result<AgentProcess, StartError> {
        let dir = spec
            .socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| StartError::NoFolder(spec.socket.clone()))?;
        private_dir(dir, spec.uid, spec.gid)?;
        remove_stale_socket(&spec.socket)?;
        let log_path = dir.join("agent.log");
        let log = open_log(&log_path, spec.uid, spec.gid)?;
        let err_log = log.try_clone().map_err(|source| StartError::Io {
            step: "duplicating",
            path: log_path.clone(),
            source,
        })?;

        let mut command = Command::new(&spec.binary);
        command
            .arg("serve")
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        let (uid, gid, groups) = (spec.uid, spec.gid, spec.groups.clone());
        let drop_privileges = nix::unistd::geteuid().is_root();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (setsid, setgroups,
        // setresgid, setresuid); `groups` was allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                // Out of slurmstepd's process group: signals meant for the
                // step's tasks are not the agent's.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if drop_privileges {
                    let gids: Vec<libc::gid_t> = groups.clone();
                    if libc::setgroups(gids.len(), gids.as_ptr()) != 0
                        || libc::setresgid(gid, gid, gid) != 0
                        || libc::setresuid(uid, uid, uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| StartError::Spawn {
            binary: spec.binary.clone(),
            source,
        })?;

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartError::Exited {
                    status: status.to_string(),
                    tail: tail(&log_path, 12),
                    log: log_path,
                });
            }
            if is_socket(&spec.socket) {
                return Ok(AgentProcess {
                    child,
                    socket: spec.socket.clone(),
                    log: log_path,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::Timeout {
                    socket: spec.socket.clone(),
                    log: log_path,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the agent: SIGTERM, then SIGKILL after a grace period. Returns
    /// what happened, for the log.
    pub fn stop(mut self) -> String {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        // `clean`: nothing to investigate, so its log goes too.
        let (outcome, clean) = match self.child.try_wait() {
            // It ended by itself (its coordinator gone at the job's end),
            // or Slurm's process tracking killed it with the step's last
            // task: nothing to investigate if its log says nothing amiss.
            Ok(Some(status)) => (
                format!("cryo: agent {pid} had already exited ({status})"),
                status.success()
                    || (status.signal() == Some(libc::SIGKILL) && log_is_quiet(&self.log)),
            ),
            _ => self.terminate(pid),
        };
        let _ = fs::remove_file(&self.socket);
        if clean {
            // Leave no clutter in /tmp. A failed agent keeps its log.
            let _ = fs::remove_file(&self.log);
            if let Some(dir) = self.socket.parent() {
                let _ = fs::remove_dir(dir);
            }
        }
        outcome
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]: what happened, and
    /// whether it stopped when asked.
    fn terminate(&mut self, pid: Pid) -> (String, bool) {
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break (format!("cryo: agent {pid} stopped ({status})"), true),
                // Reaped by slurmstepd's own wait: it is gone.
                Err(_) => break (format!("cryo: agent {pid} stopped"), true),
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break (
                        format!(
                            "cryo: agent {pid} did not stop within {} s and was killed (log: {})",
                            STOP_GRACE.as_secs(),
                            self.log.display()
                        ),
                        false,
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Whether the agent's log at `path` holds no warning and no error: an
/// agent killed at the step's end with such a log leaves nothing to keep.
fn log_is_quiet(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string(path) else {
        return false;
    };
    !text.lines().any(|line| {
        line.split_whitespace()
            .take(2)
            .any(|word| matches!(word, "WARN" | "ERROR"))
    })
}

/// Creates `dir` (and missing parents) owned by the job's user, mode 0700,
/// and refuses a `dir` that exists but is a symlink, someone else's or
/// open to others, as well as such a folder on the way to it below the
/// shared temporary folder: another user who made `/tmp/cryo-<uid>` first
/// could otherwise move the job's folder away and put theirs in its place.
fn private_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), StartError> {
    private_folder(dir, uid, gid, 0o077)
}

/// [`private_dir`], refusing a folder with any of `closed` in its mode: a
/// folder on the way need only be closed to others' writes.
fn private_folder(dir: &Path, uid: u32, gid: u32, closed: u32) -> Result<(), StartError> {
    if let Some(parent) = dir.parent().filter(|p| below_shared_place(p)) {
        private_folder(parent, uid, gid, 0o022)?;
    }
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            let what = if meta.file_type().is_symlink() {
                Some("a symbolic link".to_owned())
            } else if !meta.is_dir() {
                Some("not a folder".to_owned())
            } else if meta.uid() != uid {
                Some(format!(
                    "owned by uid {}, not the job's uid {uid}",
                    meta.uid()
                ))
            } else if meta.mode() & closed != 0 {
                Some(format!("open to others (mode {:o})", meta.mode() & 0o7777))
            } else {
                None
            };
            match what {
                Some(what) => Err(StartError::UnsafeFolder {
                    path: dir.to_owned(),
                    what,
                }),
                None => Ok(()),
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.exists()) {
                private_folder(parent, uid, gid, closed)?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|source| StartError::Io {
                    step: "creating",
                    path: dir.to_owned(),
                    source,
                })?;
            chown(dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|errno| {
                StartError::Io {
                    step: "handing over",
                    path: dir.to_owned(),
                    source: errno.into(),
                }
            })
        }
        Err(source) => Err(StartError::Io {
            step: "inspecting",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Whether `dir` is strictly below a place every user may create names in.
fn below_shared_place(dir: &Path) -> bool {
    let temp = std::env::temp_dir();
    [
        temp.as_path(),
        Path::new("/tmp"),
        Path::new("/var/tmp"),
        Path::new("/dev/shm"),
    ]
    .iter()
    .any(|place| dir.starts_with(place) && dir != *place)
}

/// A socket left by an agent that was killed with its allocation would make
/// the wait below succeed at once; remove it unless something answers.
fn remove_stale_socket(socket: &Path) -> Result<(), StartError> {
    if fs::symlink_metadata(socket).is_err() || UnixStream::connect(socket).is_ok() {
        return Ok(());
    }
    fs::remove_file(socket).map_err(|source| StartError::Io {
        step: "removing the stale socket",
        path: socket.to_owned(),
        source,
    })
}

fn open_log(path: &Path, uid: u32, gid: u32) -> Result<File, StartError> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StartError::Io {
            step: "opening the agent log",
            path: path.to_owned(),
            source,
        })?;
    nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
    .map_err(|errno| StartError::Io {
        step: "handing over the agent log",
        path: path.to_owned(),
        source: errno.into(),
    })?;
    Ok(file)
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    // The end of the log is what explains an exit.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_with_a_warning_or_an_error_is_not_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        assert!(!log_is_quiet(&log), "a missing log is kept track of");
        let info = "2026-12-06T09:34:45.764593Z  INFO cryo_agent::server: rank.registered job=j\n";
        fs::write(&log, info).unwrap();
        assert!(log_is_quiet(&log));
        for level in ["WARN", "ERROR"] {
            let line = format!("2026-12-06T09:34:46.1Z  {level} cryo_agent::server: x\n");
            fs::write(&log, format!("{info}{line}")).unwrap();
            assert!(!log_is_quiet(&log), "{level}");
        }
        // A message that mentions the word is not a level.
        fs::write(
            &log,
            format!("{info}2026-12-06T09:34:46Z  INFO a: no ERROR here\n"),
        )
        .unwrap();
        assert!(log_is_quiet(&log));
    }

    fn me() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    fn spec(dir: &Path, binary: &str, args_env: &[(&str, &str)]) -> AgentSpec {
        let (uid, gid) = me();
        AgentSpec {
            binary: binary.into(),
            socket: dir.join("run/job/agent.sock"),
            env: args_env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            uid,
            gid,
            groups: vec![gid],
        }
    }

    #[test]
    fn private_folder_is_created_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let (uid, gid) = me();
        let dir = tmp.path().join("a/b");
        private_dir(&dir, uid, gid).unwrap();
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        // Someone else's link where the folder should be is refused.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = private_dir(&link, uid, gid).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = private_dir(&open, uid, gid).unwrap_err().to_string();
        assert!(err.contains("open to others"), "{err}");
        // A folder on the way that another user made open is refused too,
        // and nothing is made inside it.
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let squatted = open.join("slurm-1");
        let err = private_dir(&squatted, uid, gid).unwrap_err().to_string();
        assert!(err.contains("open to others"), "{err}");
        assert!(!squatted.exists());
    }

    #[test]
    fn an_agent_that_exits_is_reported_with_its_log() {
        let tmp = tempfile::tempdir().unwrap();
        // `sh serve` fails: sh cannot open a script called "serve".
        let err = AgentProcess::start(&spec(tmp.path(), "/bin/sh", &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited"), "{err}");
        assert!(
            err.contains("serve"),
            "the log tail names the problem: {err}"
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = AgentProcess::start(&spec(tmp.path(), "/nonexistent/cryo-agent", &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/cryo-agent"), "{err}");
    }

    #[test]
    fn starts_waits_for_the_socket_and_stops() {
        let tmp = tempfile::tempdir().unwrap();
        // A stand-in "agent" that binds the socket named in its
        // environment, then sleeps until it is stopped.
        let script = tmp.path().join("fake-agent");
        fs::write(
            &script,
            "#!/usr/bin/env python3\nimport os, socket, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(os.environ['CRYO_AGENT_SOCKET'])\ns.listen(1)\ntime.sleep(600)\n",
        )
        .unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut spec = spec(tmp.path(), script.to_str().unwrap(), &[]);
        spec.env = vec![
            (
                "CRYO_AGENT_SOCKET".into(),
                spec.socket.clone().into_os_string(),
            ),
            ("PATH".into(), std::env::var_os("PATH").unwrap()),
        ];
        let started = AgentProcess::start(&spec);
        let agent = started.unwrap();
        let pid = agent.pid();
        assert!(is_socket(&spec.socket));
        let report = agent.stop();
        assert!(report.contains("stopped"), "{report}");
        assert!(
            kill(Pid::from_raw(i32::try_from(pid).unwrap()), None).is_err(),
            "no stray process"
        );
        assert!(!spec.socket.exists(), "the socket is removed");
        assert!(
            !spec.socket.parent().unwrap().exists(),
            "a clean stop leaves no folder behind"
        );
    }

    /// An agent that ended by itself before the step's end (its
    /// coordinator gone) leaves nothing behind either when it ended well,
    /// and keeps its log when it did not.
    #[test]
    fn an_agent_that_already_exited_is_cleaned_up_as_it_ended() {
        for (code, clean) in [(0, true), (3, false)] {
            let tmp = tempfile::tempdir().unwrap();
            let script = tmp.path().join("fake-agent");
            fs::write(
                &script,
                format!(
                    "#!/usr/bin/env python3\nimport os, socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(os.environ['CRYO_AGENT_SOCKET'])\ns.listen(1)\ntime.sleep(0.3)\nsys.exit({code})\n"
                ),
            )
            .unwrap();
            fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let mut spec = spec(tmp.path(), script.to_str().unwrap(), &[]);
            spec.env = vec![
                (
                    "CRYO_AGENT_SOCKET".into(),
                    spec.socket.clone().into_os_string(),
                ),
                ("PATH".into(), std::env::var_os("PATH").unwrap()),
            ];
            let agent = AgentProcess::start(&spec).unwrap();
            let pid = Pid::from_raw(i32::try_from(agent.pid()).unwrap());
            let start = Instant::now();
            // Exited (a zombie until reaped), or gone.
            while fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
            {
                assert!(start.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(20));
            }
            let report = agent.stop();
            assert!(report.contains("already exited"), "{report}");
            assert!(!spec.socket.exists(), "the socket is removed");
            let dir = spec.socket.parent().unwrap();
            assert_eq!(!dir.exists(), clean, "exit {code}: {report}");
        }
    }
}
