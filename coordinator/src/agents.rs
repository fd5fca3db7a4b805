//! Starting the node agents: as children of `cryo run` (one per emulated
//! node), or as a launcher step of one agent per node (`srun` on every node
//! of the Slurm allocation, an MPI launcher on each of `--hosts`); and
//! waiting until each has said hello.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cryo_core::env::ENV_COORDINATOR;
use cryo_core::private_dir;
use cryo_core::protocol::{JobResponse, ENV_AGENT_SOCKET, ENV_JOB, ENV_TOKEN};
use cryo_core::token::JobToken;

use crate::agent_links::AgentHandle;
use crate::launch::{self, LaunchBlock, Launcher};
use crate::peers::Event;
use crate::registry::Registry;
use crate::running::Coordinator;
use crate::session::RunOptions;

pub(crate) fn agent_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("cryo-agent");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("cryo-agent")
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn spawn_agent(
    opts: &RunOptions,
    node: &str,
    coordinator: &str,
    token_file: &Path,
) -> Result<(Child, PathBuf, PathBuf)> {
    let dir = opts.scratch.join(node);
    let socket = dir.join("agent.sock");
    crate::agent_paths::check_socket_path(&socket)?;
    // Private: the agent's socket and log are the job's user's alone, and
    // no folder on the way may be another user's.
    private_dir::make_private(&dir, private_dir::Owner::current())?;
    let log = dir.join("agent.log");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new(agent_binary(opts.agent_bin.as_deref()));
    command
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--store")
        .arg(&opts.store)
        .arg("--job")
        .arg(&opts.job)
        .arg("--node")
        .arg(node)
        .arg("--coordinator")
        .arg(coordinator)
        .arg("--token-file")
        .arg(token_file)
        .arg("--chunk-size")
        .arg(opts.chunk_size.to_string())
        .arg("--park-timeout")
        .arg(opts.park_timeout.as_secs().max(1).to_string())
        .arg("--log-format")
        .arg("json");
    if let Some(budget) = &opts.copy_budget {
        command.arg("--copy-budget").arg(budget);
    }
    if let Some(epoch) = opts.restart_from {
        command.arg("--restart-from").arg(epoch.to_string());
    }
    let log_file =
        private_dir::create_file(&log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Settings meant for external agents must not leak into these.
        .env_remove(cryo_core::env::ENV_RESTART_FROM)
        .env_remove("CRYO_COPY_BUDGET")
        .env_remove(cryo_core::env::ENV_NODE)
        .env(
            "CRYO_LOG",
            std::env::var("CRYO_LOG").unwrap_or_else(|_| "info".into()),
        );
    crate::session::ends_with_us(&mut command);
    let child = command.spawn().with_context(|| {
        format!(
            "starting the agent for node {node} ({})",
            agent_binary(opts.agent_bin.as_deref()).display()
        )
    })?;
    Ok((child, socket, log))
}

/// How long `cryo run` waits for a first external agent before it warns.
pub(crate) const NO_AGENT_WARNING: Duration = Duration::from_secs(60);

/// What external agents need to start: `cryo-agent serve` reads every
/// setting from these variables, which the launcher carries to each node
/// and Slurm's plugin finds in the step's environment.
pub(crate) fn external_agent_env(
    opts: &RunOptions,
    socket: &Path,
    addr: &str,
) -> Vec<(String, String)> {
    let store = std::path::absolute(&opts.store).unwrap_or_else(|_| opts.store.clone());
    let mut env = vec![
        (ENV_COORDINATOR.to_owned(), addr.to_owned()),
        (
            ENV_AGENT_SOCKET.to_owned(),
            socket.to_string_lossy().into_owned(),
        ),
        (
            "CRYO_STORE".to_owned(),
            store.to_string_lossy().into_owned(),
        ),
        ("CRYO_CHUNK_SIZE".to_owned(), opts.chunk_size.to_string()),
        (
            "CRYO_PARK_TIMEOUT".to_owned(),
            opts.park_timeout.as_secs_f64().to_string(),
        ),
        (
            cryo_core::env::ENV_AGENT_BIN.to_owned(),
            agent_binary(opts.agent_bin.as_deref())
                .to_string_lossy()
                .into_owned(),
        ),
    ];
    if let Some(budget) = &opts.copy_budget {
        env.push(("CRYO_COPY_BUDGET".to_owned(), budget.clone()));
    }
    // Agents on other hosts see only what is passed on.
    for key in [
        cryo_core::env::ENV_SNAPSHOT,
        cryo_core::env::ENV_PACK_SIZE,
        cryo_core::env::ENV_ZSTD_LEVEL,
    ] {
        if let Ok(value) = std::env::var(key) {
            env.push((key.to_owned(), value));
        }
    }
    // The store and the epoch are already there; the ranks' prefetch also
    // needs the job, which the launcher may not carry to other hosts.
    let missing: Vec<_> = rank_env(opts)
        .into_iter()
        .filter(|(key, _)| !env.iter().any(|(k, _)| k == key))
        .collect();
    env.extend(missing);
    env
}

/// Starts one agent per emulated node and waits until each has said hello;
/// returns the launcher blocks that point each node's ranks at its agent.
pub(crate) fn spawn_agents_and_wait(
    c: &mut Coordinator,
    addr: &str,
    rx: &Receiver<Event>,
) -> Result<Vec<LaunchBlock>> {
    let token_file = Registry::of(&c.job).token_path();
    let mut sockets = BTreeMap::new();
    for placement in c.opts.placement.clone() {
        let (child, socket, log) = spawn_agent(&c.opts, &placement.node, addr, &token_file)?;
        sockets.insert(placement.node.clone(), socket);
        c.agents.insert(
            placement.node.clone(),
            AgentHandle::unconnected(Some(child), log),
        );
    }
    let expected = c.agents.len();
    wait_for_agents(c, rx, expected, None)?;
    // Launch the job: one MPMD block per node, each naming its agent.
    Ok(c.opts
        .placement
        .iter()
        .map(|p| {
            let mut env = vec![(
                ENV_AGENT_SOCKET.to_owned(),
                sockets[&p.node].to_string_lossy().into_owned(),
            )];
            env.extend(rank_env(&c.opts));
            LaunchBlock {
                ranks: p.ranks.end - p.ranks.start,
                env,
            }
        })
        .collect())
}

/// What the ranks need beyond their agent: the store, whose filesystem
/// tells a rank which files it writes lie on a filesystem of its own node
/// (`rank/src/held.rs`), and on a restart the job and the epoch, to read
/// its chunks while it starts, before its agent tells it what to restore
/// (`rank/src/prefetch.rs`).
pub(crate) fn rank_env(opts: &RunOptions) -> Vec<(String, String)> {
    let store = std::path::absolute(&opts.store).unwrap_or_else(|_| opts.store.clone());
    let mut env = vec![(
        cryo_core::env::ENV_STORE.to_owned(),
        store.to_string_lossy().into_owned(),
    )];
    if let Some(epoch) = opts.restart_from {
        env.push((ENV_JOB.to_owned(), opts.job.clone()));
        env.push((
            cryo_core::env::ENV_RESTART_FROM.to_owned(),
            epoch.to_string(),
        ));
    }
    env
}

/// Waits until `expected` agents have said hello, failing early when one of
/// the processes that should run them exits first.
pub(crate) fn wait_for_agents(
    c: &mut Coordinator,
    rx: &Receiver<Event>,
    expected: usize,
    step_log: Option<&Path>,
) -> Result<()> {
    let timeout = Duration::from_secs(60);
    let deadline = Instant::now() + timeout;
    while c.agents.values().filter(|a| a.writer.is_some()).count() < expected {
        for (node, agent) in &mut c.agents {
            if let Some(child) = agent.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "the agent for node {node} exited ({status}) before connecting:\n{}",
                        tail(&agent.log, 15)
                    );
                }
            }
        }
        if let (Some(step), Some(log)) = (c.agent_step.as_mut(), step_log) {
            if let Ok(Some(status)) = step.try_wait() {
                bail!(
                    "the agents' step ended ({status}) before every agent connected:\n{}",
                    tail(log, 15)
                );
            }
        }
        if Instant::now() > deadline {
            // What the launcher said of the hosts (ssh could not resolve
            // or reach one) is the reason, when it said anything.
            let said = step_log.map(|log| tail(log, 15)).unwrap_or_default();
            let connected: Vec<&str> = (c.agents.iter())
                .filter(|(_, a)| a.writer.is_some())
                .map(|(node, _)| node.as_str())
                .collect();
            let named: Vec<&str> = c.opts.hosts.iter().map(|h| h.node.as_str()).collect();
            bail!(
                "only {} of {expected} agents connected within {} s (from {}{}){}",
                connected.len(),
                timeout.as_secs(),
                if connected.is_empty() {
                    "no host".to_string()
                } else {
                    connected.join(", ")
                },
                if named.is_empty() {
                    String::new()
                } else {
                    format!("; --hosts named {}", named.join(", "))
                },
                if said.trim().is_empty() {
                    String::new()
                } else {
                    format!("; the agents' launcher said:\n{said}")
                }
            );
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::AgentConnected {
                node,
                writer,
                version,
                link,
            }) => c.on_agent_connected(node, writer, version, link),
            Ok(Event::AgentLost { node, why, link }) => {
                // An agent that dialed again is already back.
                if !c.is_replaced_link(&node, link) {
                    bail!("the agent on node {node} disconnected while starting ({why})")
                }
            }
            Ok(Event::Agent { node, msg }) => c.on_agent_message(&node, msg),
            Ok(Event::Request { reply, .. }) => {
                let _ = reply.send(JobResponse::Refused {
                    reason: "the job is still starting".into(),
                });
            }
            Ok(Event::Committed { epoch, result }) => c.on_committed(epoch, result),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("the coordinator's listener stopped"),
        }
    }
    Ok(())
}

/// Starts one agent on every node as a launcher job of its own (the agents'
/// step: every node of the Slurm allocation with `srun`, or each of
/// `--hosts` with an MPI launcher), and waits for all of them to say hello.
/// `exported` is what the ranks' launch carries by name (`export.rs`).
pub(crate) fn start_agent_step(
    c: &mut Coordinator,
    launcher: &Launcher,
    rx: &Receiver<Event>,
    env: &[(String, String)],
    token: &JobToken,
    exported: &[String],
) -> Result<()> {
    let hosts: Vec<String> = c.opts.hosts.iter().map(|h| h.node.clone()).collect();
    let nodes: usize = match launcher {
        Launcher::Srun(_) => ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
            .context("--agents srun needs a Slurm allocation (no SLURM_JOB_NUM_NODES)")?,
        _ if hosts.is_empty() => {
            bail!("--agents launcher starts one agent per host of --hosts, and none was given")
        }
        _ => hosts.len(),
    };
    private_dir::make_private(&c.opts.scratch, private_dir::Owner::current())?;
    let log = c.opts.scratch.join("agents-step.log");
    let log_file =
        private_dir::create_file(&log).with_context(|| format!("creating {}", log.display()))?;
    // What the ranks' launch carries, and what is set here for the agents.
    let mut names = exported.to_vec();
    names.extend(env.iter().map(|(key, _)| key.clone()));
    names.push(cryo_core::env::ENV_LOG.to_owned());
    names.sort();
    names.dedup();
    let mut command = launch::agent_step_command(launcher, &hosts, nodes, &names);
    command
        .arg(agent_binary(c.opts.agent_bin.as_deref()))
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(ENV_JOB, &c.opts.job)
        .env(ENV_TOKEN, token.expose())
        .env(
            "CRYO_LOG",
            std::env::var("CRYO_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    crate::session::ends_with_us(&mut command);
    let step = command
        .spawn()
        .with_context(|| format!("starting the agents' step with {launcher}"))?;
    cryo_core::say!(
        "cryo: starting {nodes} agent(s) as a step of {launcher} (pid {}){}",
        step.id(),
        if hosts.is_empty() {
            String::new()
        } else {
            format!(" on {}", hosts.join(", "))
        }
    );
    c.agent_step = Some(step);
    wait_for_agents(c, rx, nodes, Some(&log))
}
