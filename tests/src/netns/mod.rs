//! Nodes that are separate hosts, on one machine: a cluster of Linux
//! network namespaces.
//!
//! [`Cluster::up`] builds, as root:
//! * a fabric namespace holding a bridge, and for each node (plus `head`,
//!   where the coordinator runs) a network namespace joined to the bridge
//!   by a veth pair. Inside its namespace a node's end is `eth0` with its
//!   own address in `10.231.0.0/24`, and `lo`. The addresses exist only in
//!   these namespaces: there is no route out, and the host's own network
//!   is never touched;
//! * a UTS namespace per node, kept alive by a bind mount, so `hostname`
//!   says the node's name;
//! * a mount namespace per process entered (made by [`Cluster::command`] and
//!   by the `enter` script): `/etc/hosts` lists the cluster's nodes,
//!   `/tmp/cryo-<uid>` (where agents keep their node-local sockets) is the
//!   node's own folder, `/proc/sys/kernel/random/boot_id` is the node's
//!   own, as each real host has one, and [`Cluster::node_scratch`] is a
//!   tmpfs of the node's own, as a host's `/tmp` or local scratch often is.
//!   Everything else, the store included, is shared, like a cluster's
//!   parallel filesystem.
//!
//! MPI crosses the bridge: `enter` is an ssh stand-in (`enter [-x] NODE
//! COMMAND`) that MPICH's Hydra uses as its ssh launcher
//! (`HYDRA_LAUNCHER=ssh`, `HYDRA_LAUNCHER_EXEC`) and Open MPI as its rsh
//! agent (`OMPI_MCA_plm_rsh_agent`), so the launchers' daemons and the
//! ranks start inside their nodes. Like sshd it starts the command with a
//! fresh environment, so only what a launcher carries reaches a node. UCX tells hosts apart by their boot id:
//! with one boot id for all it would pass messages between namespaces
//! through shared memory. With a boot id per node it uses shared memory
//! within a node and TCP between nodes, over `eth0` and the bridge, which
//! [`Cluster::count_traffic`] measures.
//!
//! Faults are real packets ([`faults`]): a partition drops every packet
//! between two nodes with nftables in one of them; loss and delay use tc
//! netem when the kernel has it, else nftables' random drop and a tbf rate
//! limit; a lost node is every process in its namespace killed at once.
//!
//! Everything is removed on drop, and a cluster left by a test process that
//! died is removed by the next [`Cluster::up`].

pub mod faults;
pub mod slurm;

pub use faults::Impairment;

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The node the coordinator (and Slurm's controller) runs in.
pub const HEAD: &str = "head";

const SUBNET: [u8; 3] = [10, 231, 0];

/// One node of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct Node {
    /// Its host name.
    pub name: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
    /// Its network namespace (`ip netns` name).
    pub netns: String,
}

/// A cluster of namespace nodes; torn down on drop.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    dir: PathBuf,
    nodes: Vec<Node>,
}

/// Why the cluster cannot be built here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces need root".to_owned());
    }
    for tool in ["ip", "nsenter", "unshare", "mount", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps.sh installs iproute2, util-linux and nftables)"
            ));
        }
    }
    None
}

/// Whether namespace tests can run; `false` only when skipping was asked
/// for (`CRYO_SKIP_NETNS=1`), else a missing piece fails the test.
pub fn available() -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("CRYO_SKIP_NETNS").is_some() => {
            eprintln!("\n*** SKIPPED: the namespace cluster tests did not run: {why} ***\n");
            false
        }
        Some(why) => panic!(
            "the namespace cluster tests cannot run: {why}. Set CRYO_SKIP_NETNS=1 to skip them knowingly."
        ),
    }
}

/// Runs `program args`; panics with its output unless it succeeds.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        crate::output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program args` and ignores how it went (teardown).
fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Cluster {
    /// Builds a cluster of `head` and `nodes`.
    pub fn up(nodes: &[&str]) -> Cluster {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        remove_abandoned();
        let prefix = format!(
            "cryo{}c{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("{prefix}-cluster"));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["uts", "boot_id"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir.join(sub))
                .unwrap();
        }
        let names: Vec<&str> = std::iter::once(HEAD).chain(nodes.iter().copied()).collect();
        let nodes: Vec<Node> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Node {
                name: (*name).to_owned(),
                addr: Ipv4Addr::new(
                    SUBNET[0],
                    SUBNET[1],
                    SUBNET[2],
                    if i == 0 {
                        254
                    } else {
                        u8::try_from(i).unwrap()
                    },
                ),
                netns: format!("{prefix}-{name}"),
            })
            .collect();
        let cluster = Cluster { prefix, dir, nodes };
        cluster.build();
        cluster
    }

    fn fabric(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    fn build(&self) {
        let fabric = self.fabric();
        run("ip", &["netns", "add", &fabric]);
        run(
            "ip",
            &["-n", &fabric, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &fabric, "link", "set", "br0", "up"]);
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        let local_root = self.dir.join("local");
        for node in &self.nodes {
            let ns = &node.netns;
            run("ip", &["netns", "add", ns]);
            // eth0 inside the node; its peer, named after the node, on the
            // bridge.
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &node.name,
                    "netns", &fabric,
                ],
            );
            run(
                "ip",
                &[
                    "-n", &fabric, "link", "set", &node.name, "master", "br0", "up",
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", node.addr),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            let uts = self.uts_file(&node.name);
            fs::write(&uts, b"").unwrap();
            run(
                "unshare",
                &[&format!("--uts={}", uts.display()), "hostname", &node.name],
            );
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(local_root.join(&node.name))
                .unwrap();
            // The node's own memory, seen at `node_scratch()` inside it.
            let scratch = self.scratch_of(&node.name);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&scratch)
                .unwrap();
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=64m,mode=1777",
                    "cryo-node-scratch",
                    &scratch.display().to_string(),
                ],
            );
            fs::write(
                self.boot_id_file(&node.name),
                format!("{}\n", random_uuid()),
            )
            .unwrap();
            writeln!(hosts, "{} {}", node.addr, node.name).unwrap();
        }
        fs::write(self.dir.join("hosts"), hosts).unwrap();
        fs::create_dir_all(self.node_scratch()).unwrap();
        // The mount point for each node's private agent folder.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(node_local_root())
            .unwrap();
        let script = format!(
            "#!/bin/sh\n\
             # ssh stand-in for Hydra and Open MPI: enter [-opts] NODE COMMAND...\n\
             # runs COMMAND (one shell string, as ssh passes it) in NODE's namespaces,\n\
             # in a session of its own as sshd would: a signal to the caller's\n\
             # process group reaches this script, not the remote command.\n\
             # Like sshd, it gives COMMAND a fresh environment: what a launcher\n\
             # does not carry by its own means does not reach the node.\n\
             while [ \"${{1#-}}\" != \"$1\" ]; do shift; done\n\
             node=\"$1\"; shift\n\
             exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\\n\
             \x20 HOME=\"$HOME\" USER=\"$USER\" LOGNAME=\"$LOGNAME\" SHELL=/bin/sh \\\n\
             \x20 setsid -w nsenter --net=/run/netns/{prefix}-\"$node\" --uts={dir}/uts/\"$node\" \\\n\
             \x20 unshare --mount --propagation private \\\n\
             \x20 sh -c '{mounts} && exec sh -c \"$0\"' \"$*\"\n",
            prefix = self.prefix,
            dir = self.dir.display(),
            mounts = self.mounts("'\"$node\"'"),
        );
        let enter = self.enter_script();
        fs::write(&enter, script).unwrap();
        fs::set_permissions(&enter, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The shell commands that give a process entering `node` (a name, or
    /// a shell expression for one) the node's own files.
    fn mounts(&self, node: &str) -> String {
        format!(
            "mount --bind {dir}/hosts /etc/hosts && \
             mount --bind {dir}/local/{node} {local} && \
             mount --bind {dir}/boot_id/{node} /proc/sys/kernel/random/boot_id && \
             mount --bind {dir}/scratch/{node} {scratch}",
            dir = self.dir.display(),
            local = node_local_root().display(),
            scratch = self.node_scratch().display(),
        )
    }

    /// Where each node sees a tmpfs of its own (its memory, as a host's
    /// `/tmp` or local scratch): one path, on every node another
    /// filesystem.
    pub fn node_scratch(&self) -> PathBuf {
        self.dir.join("node-scratch")
    }

    /// The tmpfs `node` sees at [`Cluster::node_scratch`], as this
    /// machine's own namespace sees it.
    pub fn scratch_of(&self, node: &str) -> PathBuf {
        self.dir.join("scratch").join(node)
    }

    fn boot_id_file(&self, node: &str) -> PathBuf {
        self.dir.join("boot_id").join(node)
    }

    fn uts_file(&self, node: &str) -> PathBuf {
        self.dir.join("uts").join(node)
    }

    /// The ssh stand-in (`enter [-x] NODE COMMAND`).
    pub fn enter_script(&self) -> PathBuf {
        self.dir.join("enter")
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this cluster"))
    }

    /// Every node, `head` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// `program` (arguments to be added) to run inside `node`: its network,
    /// its host name, its `/etc/hosts` and its node-local folder.
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let node = self.node(node);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.netns))
            .arg(format!("--uts={}", self.uts_file(&node.name).display()))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{} && exec \"$@\"", self.mounts(&node.name)))
            .arg("enter")
            .arg(program);
        cmd
    }

    /// `command` as it would run inside `node`: the same program, arguments,
    /// environment and working directory.
    pub fn wrap(&self, node: &str, command: &Command) -> Command {
        let mut cmd = self.command(node, command.get_program());
        cmd.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// The environment under which MPICH's `mpiexec` and Open MPI's
    /// `mpirun` (run in a node) launch into the cluster's nodes, over the
    /// nodes' `eth0`.
    pub fn mpi_env(&self) -> Vec<(String, String)> {
        let enter = self.enter_script().display().to_string();
        vec![
            ("HYDRA_LAUNCHER".into(), "ssh".into()),
            ("HYDRA_LAUNCHER_EXEC".into(), enter.clone()),
            ("OMPI_MCA_plm_rsh_agent".into(), enter),
            ("OMPI_MCA_oob_tcp_if_include".into(), "eth0".into()),
            ("OMPI_MCA_btl_tcp_if_include".into(), "eth0".into()),
        ]
    }

    /// Starts counting the bytes `from` sends to `to` (an nftables counter
    /// in `from`); [`Cluster::traffic`] reads it. Between two compute nodes
    /// that is MPI's traffic alone: agents and launchers talk to the head.
    pub fn count_traffic(&self, from: &str, to: &str) {
        let to = self.node(to).addr.to_string();
        let spec = "{ type filter hook output priority 0; policy accept; }";
        assert!(
            self.nft(from, &["add", "table", "inet", "cryo_count"])
                && self.nft(from, &["add", "chain", "inet", "cryo_count", "out", spec])
                && self.nft(
                    from,
                    &[
                        "add",
                        "rule",
                        "inet",
                        "cryo_count",
                        "out",
                        "ip",
                        "daddr",
                        &to,
                        "counter"
                    ]
                ),
            "nft counter in {from}"
        );
    }

    /// Bytes counted since [`Cluster::count_traffic`] in `from`.
    pub fn traffic(&self, from: &str) -> u64 {
        let ns = &self.node(from).netns;
        let listing = run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "nft",
                "list",
                "table",
                "inet",
                "cryo_count",
            ],
        );
        listing
            .split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte counter in {listing}"))
    }

    /// The processes inside `node`'s network namespace.
    pub fn pids(&self, node: &str) -> Vec<Pid> {
        netns_pids(&self.node(node).netns)
    }

    /// Panics unless every process on `nodes` has ended within `within`:
    /// a finished job leaves nothing behind on the hosts it ran on.
    pub fn assert_nothing_left(&self, nodes: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left: Vec<String> = nodes
                .iter()
                .flat_map(|node| {
                    self.pids(node)
                        .into_iter()
                        .map(move |pid| format!("{node}: {}", process_line(pid)))
                })
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "processes left {:.0} s after the job ended:\n{}",
                within.as_secs_f64(),
                left.join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills every process inside `node` (SIGKILL), like a node losing
    /// power, and waits until none is left.
    pub fn kill_node(&self, node: &str) {
        let ns = self.node(node).netns.clone();
        kill_netns(&ns);
    }

    /// Runs `nft` inside `node`.
    pub(crate) fn nft(&self, node: &str, args: &[&str]) -> bool {
        let ns = &self.node(node).netns;
        let mut all = vec!["netns", "exec", ns, "nft"];
        all.extend_from_slice(args);
        try_run("ip", &all)
    }

    /// Runs `tc` inside `node`.
    pub(crate) fn tc(&self, node: &str, args: &[&str]) -> bool {
        let ns = &self.node(node).netns;
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        try_run("tc", &all)
    }
}

/// A random version-4 UUID, as the kernel writes boot ids.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    let mut urandom = fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut urandom, &mut bytes).unwrap();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Where every node's private agent folder is mounted: `/tmp/cryo-<uid>`,
/// the folder of the agents' node-local sockets.
fn node_local_root() -> PathBuf {
    PathBuf::from(format!("/tmp/cryo-{}", nix::unistd::getuid()))
}

/// `pid` and its command line, for a message.
fn process_line(pid: Pid) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    format!("{pid} {}", cmdline.trim_end())
}

fn netns_pids(ns: &str) -> Vec<Pid> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

fn kill_netns(ns: &str) {
    for _ in 0..100 {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn teardown(prefix: &str, dir: &Path) {
    let names: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    for ns in &names {
        kill_netns(ns);
    }
    if let Ok(entries) = fs::read_dir(dir.join("uts")) {
        for entry in entries.flatten() {
            let _ = try_run("umount", &[&entry.path().display().to_string()]);
        }
    }
    if let Ok(entries) = fs::read_dir(dir.join("scratch")) {
        for entry in entries.flatten() {
            let _ = try_run("umount", &["-l", &entry.path().display().to_string()]);
        }
    }
    for ns in &names {
        try_run("ip", &["netns", "del", ns]);
    }
    let _ = fs::remove_dir_all(dir);
}

fn list_netns() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the clusters of test processes that are gone (a test killed
/// before its drop ran).
fn remove_abandoned() {
    let mut seen = std::collections::BTreeSet::new();
    for ns in list_netns() {
        let Some(rest) = ns.strip_prefix("cryo") else {
            continue;
        };
        let Some((prefix_tail, _)) = rest.split_once('-') else {
            continue;
        };
        let Some((pid, _)) = prefix_tail.split_once('c') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let alive = pid == i32::try_from(std::process::id()).unwrap_or(0)
            || kill(Pid::from_raw(pid), None).is_ok();
        if !alive && seen.insert(prefix_tail.to_owned()) {
            let prefix = format!("cryo{prefix_tail}");
            teardown(
                &prefix,
                &std::env::temp_dir().join(format!("{prefix}-cluster")),
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        teardown(&self.prefix, &self.dir);
    }
}

/// Where a test's `cryo` commands run and what their node option means:
/// this machine with emulated nodes (`--nodes`), or the head node of a
/// namespace [`Cluster`] whose nodes are hosts (`--hosts`).
#[derive(Debug, Clone, Default)]
pub enum Site {
    /// This machine; nodes are emulated.
    #[default]
    Local,
    /// A namespace cluster; `cryo` runs in its head node.
    Cluster(Rc<Cluster>),
}

impl Site {
    /// `command` (a `cryo` command, arguments to be added) where this
    /// site runs it.
    pub fn cryo(&self, command: Command) -> Command {
        match self {
            Site::Local => command,
            Site::Cluster(cluster) => {
                let mut cmd = cluster.wrap(HEAD, &command);
                cmd.envs(cluster.mpi_env());
                // Debian's MPICH over UCX's TCP transport hangs in
                // MPI_Finalize about one run in ten (openucx/ucx#8738, also
                // on one host without namespaces): the job's work is done
                // by then, so its launcher is stopped.
                cmd.env("CRYO_FINALIZE_TIMEOUT", "10");
                cmd
            }
        }
    }

    /// The option naming the job's nodes.
    pub fn nodes_flag(&self) -> &'static str {
        match self {
            Site::Local => "--nodes",
            Site::Cluster(_) => "--hosts",
        }
    }
}
