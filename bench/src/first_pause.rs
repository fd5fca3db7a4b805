//! `cryo-bench first-pause`: the pause of a job's first checkpoint, taken
//! as soon as its ranks compute (a preemption soon after a start, with the
//! agents' copy budgets not yet warm: `CRYO_PREFAULT_EARLY=off`, since the
//! agents otherwise start warming them then), with the copy-on-write snapshot and
//! without, beside a memcpy of the node's state into warm memory measured
//! in the same run.
//!
//! Each run is `quiesce-bench` under `cryo run` with three checkpoints (the
//! suite's quiesce step); the policies alternate, so that a drift of the
//! machine touches both.

use cryo_coordinator::human;
use serde::Serialize;

use crate::quiesce_jobs::{JobBenchError, JobPlace};
use crate::suite::QuiesceJob;

/// `cryo-bench first-pause` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FirstPauseArgs {
    /// State per rank, e.g. 256MiB,1GiB.
    #[arg(long, value_delimiter = ',', value_parser = human::parse_size, default_value = "256MiB,1GiB")]
    pub sizes: Vec<u64>,
    /// Ranks.
    #[arg(long, default_value_t = 2)]
    pub ranks: u32,
    /// Emulated nodes (1 or 2). One by default: on a machine of a few
    /// cores, one emulated node's chunk compression after its ranks resume
    /// would take the cores another emulated node's ranks pause on, which
    /// on a real cluster are another host's.
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// CPU µs per iteration.
    #[arg(long, default_value_t = 20_000)]
    pub iter_us: u64,
    /// `CRYO_SNAPSHOT` policies to compare, run in turn.
    #[arg(long, value_delimiter = ',', default_value = "off,auto,on")]
    pub policies: Vec<String>,
    /// Share of its state each rank writes every iteration (one byte per
    /// page), so that the faults after a checkpoint's resume show: 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub write_share: f64,
    /// Runs of each policy per size.
    #[arg(long, default_value_t = 2)]
    pub repeat: u32,
    /// Where it runs.
    #[command(flatten)]
    pub place: JobPlace,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PauseRun {
    /// State per rank.
    pub state_bytes: u64,
    /// `CRYO_SNAPSHOT` of the run.
    pub snapshot: String,
    /// The longest rank pause the agents measured, per checkpoint.
    pub agent_pause_ms: Vec<f64>,
    /// The parking safe point's length as the application saw it, the
    /// longest over the ranks, per checkpoint.
    pub app_pause_ms: Vec<f64>,
    /// The time the application lost to each checkpoint, the pause and the
    /// faults after it included.
    pub app_lost_ms: Vec<Option<f64>>,
    /// memcpy of the fuller node's state into warm memory, in the same run.
    pub node_memcpy_ms: f64,
}

/// Runs every size under each policy, in turn.
pub fn run_first_pause(args: &FirstPauseArgs) -> Result<Vec<PauseRun>, JobBenchError> {
    let runner = args.place.runner("first-pause")?;
    let mut runs = Vec::new();
    for &state_bytes in &args.sizes {
        for _ in 0..args.repeat.max(1) {
            for snapshot in &args.policies {
                eprintln!(
                    "== first pause: {} ranks x {}, snapshot {snapshot} ==",
                    args.ranks,
                    human::bytes(state_bytes)
                );
                let job = QuiesceJob {
                    ranks: args.ranks,
                    slack: "auto",
                    iter_us: args.iter_us,
                    state_bytes,
                    // The budget cold at the request: not warmed as soon
                    // as the ranks compute, which is when it comes.
                    env: vec![
                        ("CRYO_SNAPSHOT", snapshot.as_str()),
                        (cryo_core::env::ENV_PREFAULT_EARLY, "off"),
                    ],
                    nodes: args.nodes,
                    bench_args: vec!["--write-share".into(), args.write_share.to_string()],
                    first_at_start: false,
                };
                let run = runner.run(&job)?;
                runs.push(PauseRun {
                    state_bytes,
                    snapshot: snapshot.clone(),
                    agent_pause_ms: run.pause_ms,
                    app_pause_ms: run.app_pause_ms,
                    app_lost_ms: run.app_lost_ms,
                    node_memcpy_ms: run.node_memcpy_ms,
                });
            }
        }
    }
    Ok(runs)
}

/// The figures as text: per size and policy, the first checkpoint's pause
/// and the later ones, and their ratio to the memcpy.
pub fn render_first_pause(runs: &[PauseRun], ranks: u32, nodes: u32) -> String {
    let mut policies: Vec<&str> = Vec::new();
    for run in runs {
        if !policies.contains(&run.snapshot.as_str()) {
            policies.push(&run.snapshot);
        }
    }
    let mut out = format!(
        "First checkpoint's pause, taken as soon as the ranks compute ({ranks} ranks on {nodes} node(s))\n"
    );
    let mut sizes: Vec<u64> = runs.iter().map(|r| r.state_bytes).collect();
    sizes.dedup();
    for size in sizes {
        out.push_str(&format!("  {} per rank:\n", human::bytes(size)));
        let memcpy = runs
            .iter()
            .filter(|r| r.state_bytes == size)
            .map(|r| r.node_memcpy_ms)
            .fold(f64::INFINITY, f64::min);
        for &policy in &policies {
            let of: Vec<&PauseRun> = runs
                .iter()
                .filter(|r| r.state_bytes == size && r.snapshot == policy)
                .collect();
            let app_first = firsts(&of, |r| &r.app_pause_ms);
            let worst = app_first.iter().copied().fold(0.0, f64::max);
            out.push_str(&format!(
                "    snapshot {policy:>4}: first pause {} ms as the application saw it ({} ms in the agent), later {} ms; worst first / memcpy {:.2}x\n",
                list(&app_first),
                list(&firsts(&of, |r| &r.agent_pause_ms)),
                list(&laters(&of, |r| &r.app_pause_ms)),
                worst / memcpy.max(1e-9),
            ));
            out.push_str(&format!(
                "                   time lost, faults after the resume included: first {} ms, later {} ms\n",
                list(&firsts(&of, |r| &r.app_lost_ms)),
                list(&laters(&of, |r| &r.app_lost_ms)),
            ));
        }
        out.push_str(&format!(
            "    memcpy of the node's state into warm memory: {memcpy:.1} ms (best of the runs)\n"
        ));
    }
    out
}

/// Each run's figure of its first checkpoint.
fn firsts<T: Copy>(runs: &[&PauseRun], pick: fn(&PauseRun) -> &Vec<T>) -> Vec<T> {
    runs.iter()
        .filter_map(|r| pick(r).first().copied())
        .collect()
}

/// Every run's figures of its later checkpoints.
fn laters<T: Copy>(runs: &[&PauseRun], pick: fn(&PauseRun) -> &Vec<T>) -> Vec<T> {
    runs.iter()
        .flat_map(|r| pick(r).iter().skip(1).copied())
        .collect()
}

/// Milliseconds as `[1.0, 2.5]`, a figure not measured as `–`.
fn list<T: Copy + Into<Option<f64>>>(values: &[T]) -> String {
    let parts: Vec<String> = values
        .iter()
        .map(|&v| v.into().map_or("–".to_owned(), |ms| format!("{ms:.1}")))
        .collect();
    format!("[{}]", parts.join(", "))
}
