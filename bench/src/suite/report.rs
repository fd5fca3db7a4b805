//! What the suite reports (`report.json`), and the least-squares fits of
//! how each figure grows with state size and rank count.

use serde::{Deserialize, Serialize};

use super::MIB;
use crate::figures::AgentRun;
use crate::store::StoreBenchReport;

/// The safe point's cost at one rank count (`quiesce-bench --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafePointRun {
    /// Ranks.
    pub ranks: u32,
    /// What an iteration's work counts: `cpu` (the rank's CPU time) or
    /// `clock` (wall clock; reports written before `cpu` existed).
    #[serde(default = "clock_work")]
    pub work: String,
    /// One iteration's work.
    pub iter_ns: f64,
    /// Fastest block without safe points, per iteration.
    pub plain_min_ns: f64,
    /// Fastest block with safe points, per iteration.
    pub with_min_ns: f64,
    /// Difference of the minima.
    pub safe_point_ns: f64,
    /// Difference of the medians.
    pub safe_point_median_ns: f64,
    /// Spread of the two fastest plain blocks.
    pub noise_floor_ns: f64,
    /// The A/A control: the difference of the minima of two sides that both
    /// run without safe points (0 in reports made before it existed).
    #[serde(default)]
    pub control_ns: f64,
    /// The safe point's own CPU time, most of any rank (0 in reports made
    /// before it was measured).
    #[serde(default)]
    pub cpu_ns: f64,
}

fn clock_work() -> String {
    "clock".into()
}

impl SafePointRun {
    /// The safe point's cost as a share of the iteration as it ran without
    /// safe points: with more ranks than cores a CPU-time iteration takes
    /// longer than its work, and this is what the application slows down by.
    pub fn share_percent(&self) -> f64 {
        self.share_of_iteration(self.safe_point_ns)
    }

    /// `ns` as a share of the iteration as it ran, in percent.
    pub fn share_of_iteration(&self, ns: f64) -> f64 {
        ns / self.plain_min_ns.max(self.iter_ns) * 100.0
    }

    /// What of the difference noise alone cannot explain: the part beyond
    /// the A/A control's difference, as a share of the iteration.
    pub fn beyond_noise_percent(&self) -> f64 {
        self.share_of_iteration((self.safe_point_ns - self.control_ns.abs()).max(0.0))
    }

    /// The safe point's own CPU time as a share of the iteration.
    pub fn cpu_percent(&self) -> f64 {
        self.share_of_iteration(self.cpu_ns)
    }
}

/// Quiesce latency under `cryo run` at one rank count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuiesceRun {
    /// Ranks (two emulated nodes).
    pub ranks: u32,
    /// State per rank.
    pub state_bytes: u64,
    /// Request to last rank parked, per checkpoint.
    pub quiesce_ms: Vec<f64>,
    /// Longest rank pause, per checkpoint.
    pub pause_ms: Vec<f64>,
    /// CPU time of one iteration (`quiesce-bench --iter-us`); 0 in reports
    /// made before the suite counted safe points.
    #[serde(default)]
    pub iter_us: u64,
    /// Safe points from the request to the park, the most any rank
    /// passed, per checkpoint (target <= 3).
    #[serde(default)]
    pub points_to_park: Vec<u32>,
    /// The parking safe point's length as the application saw it, the
    /// longest over the ranks, per checkpoint.
    #[serde(default)]
    pub app_pause_ms: Vec<f64>,
    /// The time the application lost to each checkpoint: the longest gap
    /// between successive safe points from the parking one to two
    /// iterations later, less the usual gap, the most over the ranks (none
    /// where a rank's log ends before those iterations).
    #[serde(default)]
    pub app_lost_ms: Vec<Option<f64>>,
    /// memcpy of the state of the node with the most ranks into warm
    /// memory, in the same run.
    #[serde(default)]
    pub node_memcpy_ms: f64,
}

/// A least-squares line `y = slope * x + intercept`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fit {
    /// What is fitted.
    pub name: String,
    /// Unit of x.
    pub x_unit: String,
    /// Unit of y.
    pub y_unit: String,
    /// Slope.
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// Coefficient of determination.
    pub r2: f64,
    /// Points fitted.
    pub points: usize,
}

/// The whole report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteReport {
    /// Preset: "quick" or "full".
    pub preset: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// Host name.
    pub host: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// One rank, each state size.
    pub sizes: Vec<AgentRun>,
    /// Each rank count, fixed state per rank.
    pub ranks: Vec<AgentRun>,
    /// Store-level incremental checkpoint per state size.
    pub incremental: Vec<StoreBenchReport>,
    /// `CRYO_QUIESCE_SLACK` of the MPI figures (empty in reports made
    /// before the agreement replaced periodic rounds).
    #[serde(default)]
    pub quiesce_slack: String,
    /// Safe point cost per rank count.
    pub safe_point: Vec<SafePointRun>,
    /// Quiesce latency per rank count.
    pub quiesce: Vec<QuiesceRun>,
    /// Least-squares slopes.
    pub fits: Vec<Fit>,
    /// Steps that could not run, and why.
    pub skipped: Vec<String>,
}

/// Least squares over `(x, y)` points; `None` with fewer than two distinct x.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - mean_y).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - slope * p.0 - intercept).powi(2))
        .sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some((slope, intercept, r2))
}

/// The least-squares fit of every figure against state size and rank count.
pub(super) fn fits(report: &SuiteReport) -> Vec<Fit> {
    let mib = |b: u64| b as f64 / MIB as f64;
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut out = Vec::new();
    let mut add = |name: &str, x_unit: &str, y_unit: &str, points: Vec<(f64, f64)>| {
        if let Some((slope, intercept, r2)) = fit(&points) {
            out.push(Fit {
                name: name.to_owned(),
                x_unit: x_unit.to_owned(),
                y_unit: y_unit.to_owned(),
                slope,
                intercept,
                r2,
                points: points.len(),
            });
        }
    };
    let s = &report.sizes;
    add(
        "pause vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.worst_pause_ns())))
            .collect(),
    );
    add(
        "memcpy vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.node_memcpy_ns)))
            .collect(),
    );
    add(
        "checkpoint vs state size",
        "MiB",
        "ms",
        s.iter()
            .map(|r| (mib(r.size), ms(r.checkpoint_ns)))
            .collect(),
    );
    add(
        "zstd -1 -T0 vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.zstd_ns?))))
            .collect(),
    );
    add(
        "restart vs state size",
        "MiB",
        "ms",
        s.iter().map(|r| (mib(r.size), ms(r.restart_ns))).collect(),
    );
    add(
        "zstd -d -T0 vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.zstd_d_ns?))))
            .collect(),
    );
    add(
        "peak RSS vs state size",
        "MiB",
        "MiB",
        s.iter()
            .map(|r| (mib(r.size), mib(r.peak_rss_bytes)))
            .collect(),
    );
    add(
        "incremental checkpoint vs state size",
        "MiB",
        "ms",
        s.iter()
            .filter_map(|r| Some((mib(r.size), ms(r.incremental.as_ref()?.checkpoint_ns))))
            .collect(),
    );
    let inc = &report.incremental;
    let figure = |r: &StoreBenchReport, prefix: &str| {
        r.figures
            .iter()
            .find(|f| f.name.starts_with(prefix))
            .map(|f| f.seconds * 1e3)
    };
    let changed = |r: &StoreBenchReport| {
        r.figures
            .iter()
            .find(|f| f.name.ends_with("chunks changed"))
            .map(|f| f.seconds * 1e3)
    };
    add(
        "store full epoch vs state size",
        "MiB",
        "ms",
        inc.iter()
            .filter_map(|r| Some((mib(r.size), figure(r, "cryo store, full")?)))
            .collect(),
    );
    add(
        "store 5% epoch vs state size",
        "MiB",
        "ms",
        inc.iter()
            .filter_map(|r| Some((mib(r.size), changed(r)?)))
            .collect(),
    );
    let k = &report.ranks;
    add(
        "worst pause vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.worst_pause_ns())))
            .collect(),
    );
    add(
        "checkpoint vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.checkpoint_ns)))
            .collect(),
    );
    add(
        "restart vs ranks",
        "ranks",
        "ms",
        k.iter()
            .map(|r| (f64::from(r.procs), ms(r.restart_ns)))
            .collect(),
    );
    add(
        "safe point vs ranks",
        "ranks",
        "ns",
        report
            .safe_point
            .iter()
            .map(|r| (f64::from(r.ranks), r.safe_point_ns))
            .collect(),
    );
    add(
        "quiesce latency vs ranks",
        "ranks",
        "ms",
        report
            .quiesce
            .iter()
            .flat_map(|r| r.quiesce_ms.iter().map(move |q| (f64::from(r.ranks), *q)))
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line() {
        let points: Vec<(f64, f64)> = (0..5)
            .map(|i| (f64::from(i), 3.0 * f64::from(i) + 2.0))
            .collect();
        let (slope, intercept, r2) = fit(&points).expect("fits");
        assert!((slope - 3.0).abs() < 1e-9);
        assert!((intercept - 2.0).abs() < 1e-9);
        assert!((r2 - 1.0).abs() < 1e-9);
        assert!(fit(&[(1.0, 1.0)]).is_none());
        assert!(fit(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }

    #[test]
    fn the_published_report_still_loads() {
        // docs/bench.json is a full run's report.json, written before the
        // suite kept `streamed` and `agent_cpu_s`.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench.json");
        let text = std::fs::read_to_string(path).expect("docs/bench.json");
        let report: SuiteReport = serde_json::from_str(&text).expect("parses");
        assert!(!report.sizes.is_empty());
        assert!(report.sizes.iter().all(|r| r.streamed.is_empty()));
        assert!(!fits(&report).is_empty());
    }
}
