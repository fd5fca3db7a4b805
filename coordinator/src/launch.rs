//! Placing ranks on nodes and building the MPI launcher's command line.
//!
//! `--nodes a:2,b:2` names the nodes and their slots. On one machine the
//! nodes are emulated: every node gets its own agent, socket and scratch
//! directory, and the launcher is given one MPMD block per node, so ranks
//! `0..2` talk to agent `a` and ranks `2..4` to agent `b`. On a cluster every
//! node has its own agent at the same node-local socket path, so one block
//! with one environment serves every rank.
//!
//! `--hosts a:2,b:2` names real hosts that the MPI launcher reaches itself
//! (Hydra over ssh, Open MPI's rsh agent): the launcher is told the hosts and
//! their ranks (`-hosts a:2,b:2`, `--host a:2,b:2`), and the agents are one
//! launcher job of one process per host ([`agent_step_command`]).

use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Command;

use cryo_core::format::fds::SharedNodeFile;
use thiserror::Error;

pub use crate::launcher_choice::{classify, detect, LauncherError};

/// One node and how many ranks it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node name (also the agent's name).
    pub name: String,
    /// Ranks it takes; `None` means "share the rest evenly".
    pub slots: Option<u32>,
}

/// A bad `--nodes` value or placement.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    /// Empty spec.
    #[error("--nodes is empty")]
    Empty,
    /// A node name that is not a plain word.
    #[error("node name {0:?} must be 1-64 characters of letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// A slot count that is not a positive number.
    #[error("node {node:?}: slot count {text:?} is not a positive number")]
    BadSlots {
        /// The node.
        node: String,
        /// The text.
        text: String,
    },
    /// A node named twice.
    #[error("node {0:?} is named twice")]
    Duplicate(String),
    /// More ranks than slots.
    #[error("{ranks} ranks do not fit on {slots} slots ({spec})")]
    TooFewSlots {
        /// Ranks asked for.
        ranks: u32,
        /// Slots available.
        slots: u32,
        /// The nodes.
        spec: String,
    },
    /// Zero ranks.
    #[error("the job needs at least one rank")]
    NoRanks,
    /// Two ranks placed on one node that held different files at one path
    /// on their nodes' own filesystems (`node_file_clashes`).
    #[error("{0}: give the restart more nodes, or place them on different ones")]
    // Not `#[from]`, which would make the refusal the error's source too,
    // and print it twice in the chain.
    SharedNodeFile(SharedNodeFile),
    /// The same, for nodes emulated on this machine (`--nodes`), which
    /// share its filesystems.
    #[error(
        "{0}: nodes given with --nodes run on this machine and share its filesystems; restart \
         these ranks on separate hosts (--hosts)"
    )]
    EmulatedSharedNodeFile(SharedNodeFile),
}

/// Refuses a `placement` of a restart from `manifest` that puts two ranks
/// that held different files of their own nodes at one path on one node,
/// before anything is launched (the agents refuse it too, later, where
/// the launcher places the ranks itself). Nodes `emulated` on this machine
/// share its filesystems: as far as files of the node go, they are one.
pub fn check_restart_placement(
    manifest: &cryo_core::Manifest,
    placement: &[NodePlacement],
    emulated: bool,
) -> Result<(), PlacementError> {
    let clashes = cryo_core::format::fds::node_file_clashes(&manifest.ranks);
    let was = |rank: u32| {
        (manifest.ranks.iter())
            .find(|record| record.rank == rank)
            .map_or_else(String::new, |record| record.node.clone())
    };
    if emulated {
        let names: Vec<&str> = placement.iter().map(|p| p.node.as_str()).collect();
        let node = format!("this machine (nodes {})", names.join(", "));
        let ranks = || placement.iter().flat_map(|placed| placed.ranks.clone());
        return match clashes
            .iter()
            .find_map(|clash| clash.refuse(ranks(), &node, was))
        {
            Some(refusal) => Err(PlacementError::EmulatedSharedNodeFile(refusal)),
            None => Ok(()),
        };
    }
    for placed in placement {
        if let Some(refusal) =
            (clashes.iter()).find_map(|clash| clash.refuse(placed.ranks.clone(), &placed.node, was))
        {
            return Err(PlacementError::SharedNodeFile(refusal));
        }
    }
    Ok(())
}

/// Parses `a:2,b:2` (or `a,b` for an even split).
pub fn parse_nodes(spec: &str) -> Result<Vec<NodeSpec>, PlacementError> {
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, slots) = match part.split_once(':') {
            Some((name, slots)) => {
                let count = slots
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| PlacementError::BadSlots {
                        node: name.to_owned(),
                        text: slots.to_owned(),
                    })?;
                (name, Some(count))
            }
            None => (part, None),
        };
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !name.starts_with('.');
        if !valid {
            return Err(PlacementError::BadName(name.to_owned()));
        }
        if nodes.iter().any(|n| n.name == name) {
            return Err(PlacementError::Duplicate(name.to_owned()));
        }
        nodes.push(NodeSpec {
            name: name.to_owned(),
            slots,
        });
    }
    if nodes.is_empty() {
        return Err(PlacementError::Empty);
    }
    Ok(nodes)
}

/// The ranks one node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlacement {
    /// Node name.
    pub node: String,
    /// Consecutive ranks on it.
    pub ranks: Range<u32>,
}

/// Places `ranks` ranks in blocks: nodes with a slot count take up to that
/// many in order; nodes without one share what is left evenly. Nodes left
/// with no rank are dropped.
pub fn place(nodes: &[NodeSpec], ranks: u32) -> Result<Vec<NodePlacement>, PlacementError> {
    if ranks == 0 {
        return Err(PlacementError::NoRanks);
    }
    let fixed: u32 = nodes.iter().filter_map(|n| n.slots).sum();
    let flexible =
        u32::try_from(nodes.iter().filter(|n| n.slots.is_none()).count()).unwrap_or(u32::MAX);
    if flexible == 0 && fixed < ranks {
        return Err(PlacementError::TooFewSlots {
            ranks,
            slots: fixed,
            spec: render_nodes(nodes),
        });
    }
    let rest = ranks.saturating_sub(fixed);
    let mut flexible_seen = 0;
    let mut next = 0u32;
    let mut out = Vec::new();
    for node in nodes {
        let want = match node.slots {
            Some(slots) => slots,
            None => {
                // Even split of the remainder, earlier nodes taking the extra.
                let share = rest / flexible + u32::from(flexible_seen < rest % flexible);
                flexible_seen += 1;
                share
            }
        };
        let take = want.min(ranks - next);
        if take > 0 {
            out.push(NodePlacement {
                node: node.name.clone(),
                ranks: next..next + take,
            });
            next += take;
        }
    }
    Ok(out)
}

/// Renders a node list back to `a:2,b:2` form.
pub fn render_nodes(nodes: &[NodeSpec]) -> String {
    nodes
        .iter()
        .map(|n| match n.slots {
            Some(slots) => format!("{}:{slots}", n.name),
            None => n.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The MPI launcher family, which decides the MPMD syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// MPICH's Hydra `mpiexec`.
    Hydra(PathBuf),
    /// Open MPI's `mpirun`.
    OpenMpi(PathBuf),
    /// Slurm's `srun` (ranks are the step's tasks; MPI wires up over PMI).
    Srun(PathBuf),
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Launcher::Hydra(path) => write!(f, "MPICH Hydra ({})", path.display()),
            Launcher::OpenMpi(path) => write!(f, "Open MPI ({})", path.display()),
            Launcher::Srun(path) => write!(f, "Slurm srun ({})", path.display()),
        }
    }
}

/// One MPMD block: consecutive ranks sharing an environment.
#[derive(Debug, Clone)]
pub struct LaunchBlock {
    /// How many ranks.
    pub ranks: u32,
    /// Extra environment for them.
    pub env: Vec<(String, String)>,
}

/// `a:2,b:2`: the hosts and their ranks, as Hydra's `-hosts` and Open
/// MPI's `--host` take them.
fn host_list(hosts: &[NodePlacement]) -> String {
    hosts
        .iter()
        .map(|h| format!("{}:{}", h.node, h.ranks.end - h.ranks.start))
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the launcher's command line for `blocks` of `program args`, on
/// `hosts` when given (empty: the launcher's own choice of hosts).
/// `exported` names the variables of the launcher's environment that must
/// reach every rank on every host (see `export.rs`); Hydra and srun carry
/// the whole environment anyway.
pub fn build_command(
    launcher: &Launcher,
    hosts: &[NodePlacement],
    blocks: &[LaunchBlock],
    program: &OsString,
    args: &[OsString],
    exported: &[String],
) -> Command {
    match launcher {
        Launcher::Hydra(path) => {
            let mut command = Command::new(path);
            if !hosts.is_empty() {
                command.arg("-hosts").arg(host_list(hosts));
            }
            for (index, block) in blocks.iter().enumerate() {
                if index > 0 {
                    command.arg(":");
                }
                command.arg("-n").arg(block.ranks.to_string());
                for (key, value) in &block.env {
                    command.arg("-env").arg(key).arg(value);
                }
                command.arg(program).args(args);
            }
            command
        }
        Launcher::Srun(path) => {
            // srun gives every task one environment, so blocks (used on a
            // cluster, where every node's agent sits at the same path) are
            // merged: their sizes add up and their variables are exported.
            let mut command = Command::new(path);
            let ranks: u32 = blocks.iter().map(|b| b.ranks).sum();
            command
                .arg(format!("--ntasks={ranks}"))
                .arg("--kill-on-bad-exit=1");
            let mut names = exported.to_vec();
            for block in blocks {
                for (key, value) in &block.env {
                    command.env(key, value);
                    names.push(key.clone());
                }
            }
            // The site's MPI plugin (else PMI-2), and cryo's variables.
            crate::srun::add_site_args(&mut command, path, program, &names);
            command.arg(program).args(args);
            command
        }
        Launcher::OpenMpi(path) => {
            let mut command = Command::new(path);
            command.arg("--oversubscribe");
            if nix::unistd::geteuid().is_root() {
                command.arg("--allow-run-as-root");
            }
            if !hosts.is_empty() {
                command.arg("--host").arg(host_list(hosts));
            }
            for (index, block) in blocks.iter().enumerate() {
                if index > 0 {
                    command.arg(":");
                }
                command.arg("-np").arg(block.ranks.to_string());
                for (key, value) in &block.env {
                    command.arg("-x").arg(format!("{key}={value}"));
                }
                export_by_name(&mut command, exported, &block.env);
                command.arg(program).args(args);
            }
            command
        }
    }
}

/// The launcher job that starts one process on each of `nodes` nodes: the
/// agents' step. Under Slurm that is every node of the allocation (`srun
/// --overlap`, so it takes no CPUs from the ranks' step); with an MPI
/// launcher, each of `hosts`. One agent that fails must not take the
/// others down (`--kill-on-bad-exit=0`, Hydra's `-disable-auto-cleanup`):
/// the coordinator reports it and aborts only the epoch it was part of.
///
/// `exported` names what the agents need from the launcher's environment
/// (see [`build_command`]).
pub fn agent_step_command(
    launcher: &Launcher,
    hosts: &[String],
    nodes: usize,
    exported: &[String],
) -> Command {
    let one_each = || {
        hosts
            .iter()
            .map(|h| format!("{h}:1"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match launcher {
        Launcher::Srun(path) => {
            let mut command = Command::new(path);
            command
                .arg("--overlap")
                .arg(format!("--nodes={nodes}"))
                .arg(format!("--ntasks={nodes}"))
                .arg("--ntasks-per-node=1")
                .arg("--kill-on-bad-exit=0")
                .arg("--mpi=none")
                .arg("--job-name=cryo-agents");
            crate::srun::add_export(&mut command, exported);
            command
        }
        Launcher::Hydra(path) => {
            let mut command = Command::new(path);
            command
                .arg("-disable-auto-cleanup")
                .arg("-hosts")
                .arg(one_each())
                .arg("-n")
                .arg(hosts.len().to_string());
            command
        }
        Launcher::OpenMpi(path) => {
            let mut command = Command::new(path);
            if nix::unistd::geteuid().is_root() {
                command.arg("--allow-run-as-root");
            }
            command
                .arg("--host")
                .arg(one_each())
                .arg("-np")
                .arg(hosts.len().to_string());
            export_by_name(&mut command, exported, &[]);
            command
        }
    }
}

/// Open MPI's `-x NAME` for each of `names` not already given a value in
/// `given`: the launcher reads the value from its own environment.
fn export_by_name(command: &mut Command, names: &[String], given: &[(String, String)]) {
    for name in names {
        if !given.iter().any(|(key, _)| key == name) {
            command.arg("-x").arg(name);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "launch_tests.rs"]
mod tests;
