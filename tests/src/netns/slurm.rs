//! A Slurm cluster of namespace nodes: slurmctld in the head, one slurmd
//! per node (each with its own `NodeName`, address and host name), and the
//! machine's munged shared by all (its socket is a file every node sees).
//!
//! Debian's slurmd is not built with `--enable-multiple-slurmd`, and needs
//! not be: each slurmd has its node's network namespace (so the same port)
//! and UTS name, and `-N NAME` names it; its spool, pid and log files carry
//! the node's name (`%n`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Cluster, HEAD};
use crate::output_text;

/// A running Slurm cluster; its daemons are stopped on drop (and anything
/// left dies with the namespace cluster).
#[derive(Debug)]
pub struct SlurmCluster {
    cluster: Rc<Cluster>,
    dir: tempfile::TempDir,
    nodes: Vec<String>,
}

impl SlurmCluster {
    /// Starts slurmctld in the head and a slurmd in each of `nodes`, with
    /// `plugin` (a SPANK plugin) in the plug stack when given, and waits
    /// until every node is idle.
    pub fn up(cluster: &Rc<Cluster>, nodes: &[&str], plugin: Option<&Path>) -> SlurmCluster {
        let munge = Command::new("bash")
            .arg(crate::heat2d::repo_root().join("tests/slurm/munge-up.sh"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            munge.status.success(),
            "munge-up.sh: {}",
            output_text(&munge)
        );
        let dir = tempfile::Builder::new()
            .prefix("cryo-nslurm-")
            .tempdir()
            .unwrap();
        for sub in ["state", "log", "tmp"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let slurm = SlurmCluster {
            cluster: Rc::clone(cluster),
            dir,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        };
        slurm.write_conf(plugin);
        slurm.daemon(HEAD, "slurmctld", &["-c"]);
        for node in nodes {
            slurm.daemon(node, "slurmd", &["-c", "-N", node]);
        }
        let start = Instant::now();
        loop {
            let states = slurm.run("sinfo", &["-h", "-N", "-o", "%N %T"]);
            let idle = states.lines().filter(|l| l.ends_with(" idle")).count();
            if idle == nodes.len() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the Slurm nodes did not become idle: {states}\n{}",
                slurm.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        slurm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `slurm.conf`.
    pub fn conf(&self) -> PathBuf {
        self.path("slurm.conf")
    }

    fn write_conf(&self, plugin: Option<&Path>) {
        let d = self.dir.path().display();
        let head = self.cluster.node(HEAD);
        let mut conf = format!(
            "ClusterName=cryons\n\
             SlurmctldHost={head}({addr})\n\
             SlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nCredType=cred/munge\n\
             SlurmctldPort=6817\nSlurmdPort=6818\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool-%n\n\
             TmpFS={d}/tmp\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             ReturnToService=2\nJobRequeue=1\nMpiDefault=none\n\
             SchedulerType=sched/backfill\n\
             SlurmctldTimeout=30\nSlurmdTimeout=30\nInactiveLimit=0\n\
             KillWait=5\nMinJobAge=300\n",
            head = head.name,
            addr = head.addr,
        );
        for name in &self.nodes {
            let node = self.cluster.node(name);
            conf.push_str(&format!(
                "NodeName={} NodeAddr={} CPUs=2 RealMemory=1000 State=UNKNOWN\n",
                node.name, node.addr
            ));
        }
        conf.push_str(&format!(
            "PartitionName=debug Nodes={} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n",
            self.nodes.join(",")
        ));
        if let Some(plugin) = plugin {
            let stack = self.path("plugstack.conf");
            fs::write(&stack, format!("required {}\n", plugin.display())).unwrap();
            conf.push_str(&format!("PlugStackConfig={}\n", stack.display()));
        }
        fs::write(self.conf(), conf).unwrap();
    }

    /// Starts `daemon args` in `node` (it daemonizes itself).
    fn daemon(&self, node: &str, daemon: &str, args: &[&str]) {
        let status = self
            .cluster
            .command(node, daemon)
            .args(args)
            .env("SLURM_CONF", self.conf())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{daemon} in {node} failed to start ({status}):\n{}",
            self.logs()
        );
    }

    /// `program` in the head, with this cluster's `SLURM_CONF`.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = self.cluster.command(HEAD, program);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    /// Runs `program args` in the head; panics unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A field of `scontrol show job ID` (`JobState`, `NodeList`,
    /// `Restarts`, ...).
    pub fn job_field(&self, id: &str, field: &str) -> String {
        let out = self.run("scontrol", &["show", "job", id]);
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .unwrap_or("")
            .to_owned()
    }

    /// The end of every daemon's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(self.path("log")) {
            for entry in entries.flatten() {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "== {}\n{}\n",
                    entry.path().display(),
                    lines[lines.len().saturating_sub(15)..].join("\n")
                ));
            }
        }
        out
    }
}

impl crate::slurm_jobs::SlurmJobs for SlurmCluster {
    fn job_state(&self, id: &str) -> (String, u32) {
        (
            self.job_field(id, "JobState"),
            self.job_field(id, "Restarts").parse().unwrap_or(0),
        )
    }

    fn release(&self, id: &str) {
        let _ = self
            .cmd("scontrol")
            .args(["update", &format!("JobId={id}"), "StartTime=now"])
            .output();
    }

    fn logs(&self) -> String {
        SlurmCluster::logs(self)
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        let _ = self
            .cmd("scancel")
            .args(["--user=root", "--full"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let mut pidfiles = vec![self.path("slurmctld.pid")];
        pidfiles.extend(
            self.nodes
                .iter()
                .map(|n| self.path(&format!("slurmd-{n}.pid"))),
        );
        for pidfile in pidfiles {
            let pid = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
