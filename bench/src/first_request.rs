//! `cryo-bench first-request`: safe points from a checkpoint request to
//! the park when the request comes before the job's first safe point (a
//! preemption right after the start), beside the same job with the old
//! first floor forced (`CRYO_QUIESCE_SLACK` set to the guess from the
//! number of ranks, 2 + 4 log2(ranks)) in the same run.
//!
//! Each run is `quiesce-bench` under `cryo run` (the suite's quiesce
//! step), asked for its first checkpoint as soon as every rank has
//! registered with its agent and for two more later; the two settings take
//! turns, so that a drift of the machine touches both.

use serde::Serialize;

use crate::quiesce_jobs::{JobBenchError, JobPlace};
use crate::suite::QuiesceJob;

/// State per rank: small, so that the copy does not matter.
const STATE_BYTES: u64 = 8 << 20;

/// The first floor of earlier runtimes, before they had measured anything:
/// 2 + 4 log2(ranks), the baseline forced through `CRYO_QUIESCE_SLACK`.
fn first_slack_floor(ranks: u32) -> u64 {
    2 + 4 * u64::from(ranks.max(1).ilog2())
}

/// `cryo-bench first-request` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FirstRequestArgs {
    /// Rank counts.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,64")]
    pub ranks: Vec<u32>,
    /// Wall-clock µs per iteration (`quiesce-bench --work clock`, so that
    /// an iteration keeps its length however many ranks share the cores).
    #[arg(long, default_value_t = 200_000)]
    pub iter_us: u64,
    /// Emulated nodes (1 or 2).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// Runs of each setting per rank count.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Where it runs.
    #[command(flatten)]
    pub place: JobPlace,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRun {
    /// Ranks.
    pub ranks: u32,
    /// `CRYO_QUIESCE_SLACK` of the run: `auto`, or the guess forced.
    pub slack: String,
    /// Safe points from the request to the park, the most any rank passed,
    /// per checkpoint (the first requested before the first safe point).
    pub points_to_park: Vec<u32>,
    /// Request to every rank parked, per checkpoint.
    pub quiesce_ms: Vec<f64>,
}

/// Runs every rank count with the runtime's own slack and with the guess
/// forced, in turn.
pub fn run_first_request(args: &FirstRequestArgs) -> Result<Vec<RequestRun>, JobBenchError> {
    let runner = args.place.runner("first-request")?;
    let mut runs = Vec::new();
    for &ranks in &args.ranks {
        let guess = first_slack_floor(ranks).to_string();
        for _ in 0..args.repeat.max(1) {
            for slack in ["auto", guess.as_str()] {
                eprintln!("== first request: {ranks} ranks, slack {slack} ==");
                let job = QuiesceJob {
                    ranks,
                    slack,
                    iter_us: args.iter_us,
                    state_bytes: STATE_BYTES,
                    env: Vec::new(),
                    nodes: args.nodes,
                    bench_args: vec!["--work".into(), "clock".into()],
                    first_at_start: true,
                };
                let run = runner.run(&job)?;
                runs.push(RequestRun {
                    ranks,
                    slack: slack.to_owned(),
                    points_to_park: run.points_to_park,
                    quiesce_ms: run.quiesce_ms,
                });
            }
        }
    }
    Ok(runs)
}

/// The figures as text: per rank count, the first request's safe points to
/// park and the later ones', with the runtime's slack and with the guess.
pub fn render_first_request(runs: &[RequestRun], iter_us: u64, nodes: u32) -> String {
    let mut out = format!(
        "Safe points from a request made before the first safe point to the park ({:.0} ms iterations, {nodes} node(s))\n",
        iter_us as f64 / 1e3
    );
    let mut counts: Vec<u32> = runs.iter().map(|r| r.ranks).collect();
    counts.dedup();
    for ranks in counts {
        out.push_str(&format!(
            "  {ranks} ranks (the guess, 2 + 4 log2(ranks): {}):\n",
            first_slack_floor(ranks)
        ));
        for forced in [false, true] {
            let of: Vec<&RequestRun> = runs
                .iter()
                .filter(|r| r.ranks == ranks && (r.slack != "auto") == forced)
                .collect();
            let label = if forced {
                "guess forced"
            } else {
                "auto        "
            };
            let firsts: Vec<String> = of
                .iter()
                .filter_map(|r| {
                    Some(format!(
                        "{} ({:.0} ms)",
                        r.points_to_park.first()?,
                        r.quiesce_ms.first()?
                    ))
                })
                .collect();
            let laters: Vec<String> = of
                .iter()
                .flat_map(|r| r.points_to_park.iter().skip(1).map(u32::to_string))
                .collect();
            out.push_str(&format!(
                "    {label}: first request {}; later requests {}\n",
                firsts.join(", "),
                laters.join(", ")
            ));
        }
    }
    out
}
