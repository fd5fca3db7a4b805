//! The suite's plain-text report (`report.txt`): every configuration beside
//! its baselines, the incremental checkpoints, the MPI figures, a verdict per
//! target (the worst configuration) and the fits.

use std::fmt::Write as _;

use cryo_coordinator::human;

use super::{SafePointRun, SuiteReport, MIB};
use crate::figures::{ratio, AgentRun};
use crate::store::StoreBenchReport;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The plain-text report.
pub fn render(report: &SuiteReport) -> String {
    let mut out = String::new();
    let ms = |ns: u64| ns as f64 / 1e6;
    let _ = writeln!(
        out,
        "cryo bench ({} preset) on {} ({} CPUs); rank state: 60% smooth doubles + noise, 25% index arrays, 15% zeros",
        report.preset, report.host, report.cpus
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Per configuration (every baseline measured in the same run, on the same bytes):"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>10} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>7} {:>10}",
        "ranks",
        "per rank",
        "pause",
        "memcpy",
        "x",
        "ckpt",
        "zstd -1",
        "x",
        "restart",
        "zstd -d",
        "x",
        "ratio",
        "RSS-budget"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.0} ms", ms(v)));
        let optr = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}x"));
        let _ = writeln!(
            out,
            "{:>5} {:>10} | {:>6.0} ms {:>6.0} ms {:>5.2}x | {:>6.0} ms {:>9} {:>6} | {:>6.0} ms {:>9} {:>6} | {:>6.2}x {:>7} MiB",
            run.procs,
            human::bytes(run.size),
            ms(run.worst_pause_ns()),
            ms(run.node_memcpy_ns),
            run.pause_ratio(),
            ms(run.checkpoint_ns),
            opt(run.zstd_ns),
            optr(run.checkpoint_ratio()),
            ms(run.restart_ns),
            opt(run.zstd_d_ns),
            optr(run.restart_ratio()),
            ratio(run.raw_bytes, run.stored_bytes),
            run.rss_over_budget() / i64::try_from(MIB).unwrap_or(1)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Incremental checkpoint, end to end (the ranks change 5% of their chunks; write tracking copies only those):"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let Some(inc) = &run.incremental else {
            continue;
        };
        let _ = writeln!(
            out,
            "  {:>3} x {:>10}: copied {:.1}% of the state, wrote {:.1}% of the full checkpoint's bytes, pause {:.1} ms, {:.0} ms = {:.1}% of the full checkpoint's time",
            run.procs,
            human::bytes(run.size),
            ratio(inc.copied_bytes, inc.bytes) * 100.0,
            ratio(inc.stored_bytes, run.stored_bytes) * 100.0,
            ms(inc.pause_ns),
            ms(inc.checkpoint_ns),
            ratio(inc.checkpoint_ns, run.checkpoint_ns) * 100.0
        );
    }
    let _ = writeln!(
        out,
        "Full-checkpoint pause samples (worst rank, ms; the smallest is reported above):"
    );
    for run in report.sizes.iter().chain(&report.ranks) {
        let _ = writeln!(
            out,
            "  {:>3} x {:>10}: {}",
            run.procs,
            human::bytes(run.size),
            run.pause_samples_ns
                .iter()
                .map(|p| format!("{:.0}", ms(*p)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        out,
        "Incremental checkpoint (store level, no tracking: every chunk hashed; smooth doubles + noise, 5% of chunks changed):"
    );
    for r in &report.incremental {
        let _ = writeln!(
            out,
            "  {:>10}: {:.1}% of the bytes, {:.1}% of the time of the full epoch",
            human::bytes(r.size),
            r.incremental_bytes_ratio * 100.0,
            r.incremental_time_ratio * 100.0
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Safe point with nothing pending (interleaved trials, minimum of each side; 1 ms of work per iteration, share of the iteration as it ran; CRYO_QUIESCE_SLACK={}):",
        report.quiesce_slack
    );
    for r in &report.safe_point {
        let _ = writeln!(
            out,
            "  {:>3} ranks: {:.0} ns = {:.4}% of a {:.0} us iteration (median {:.0} ns, noise floor {:.0} ns); A/A control {:.0} ns = {:.4}%; own CPU time {:.0} ns = {:.4}%",
            r.ranks,
            r.safe_point_ns,
            r.share_percent(),
            r.plain_min_ns.max(r.iter_ns) / 1e3,
            r.safe_point_median_ns,
            r.noise_floor_ns,
            r.control_ns,
            r.share_of_iteration(r.control_ns),
            r.cpu_ns,
            r.cpu_percent()
        );
    }
    let _ = writeln!(
        out,
        "Quiesce latency under `cryo run` (two emulated nodes, request to last rank parked; a coupled application: an allreduce after every safe point):"
    );
    for r in &report.quiesce {
        let _ = writeln!(
            out,
            "  {:>3} ranks x {}, {} us iterations: quiesce {:?} ms, longest pause {:?} ms (agent)",
            r.ranks,
            human::bytes(r.state_bytes),
            r.iter_us,
            r.quiesce_ms,
            r.pause_ms
        );
        if !r.points_to_park.is_empty() {
            let _ = writeln!(
                out,
                "      safe points from request to park {:?} (target <= 3); pause as the application saw it {:?} ms; memcpy of the node's state {:.1} ms; worst / memcpy {:.2}x (target <= 1.2x)",
                r.points_to_park,
                r.app_pause_ms
                    .iter()
                    .map(|p| (p * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                r.node_memcpy_ms,
                r.app_pause_ms.iter().copied().fold(0.0, f64::max) / r.node_memcpy_ms.max(1e-3)
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    let worst = |f: &dyn Fn(&AgentRun) -> Option<f64>| {
        report
            .sizes
            .iter()
            .chain(&report.ranks)
            .filter_map(f)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            })
    };
    let line =
        |out: &mut String, what: &str, value: Option<f64>, target: f64, unit: &str| match value {
            Some(v) => {
                let _ = writeln!(
                    out,
                    "  {what:<52} worst {v:>8.3}{unit} (target <= {target}{unit}): {}",
                    verdict(v <= target)
                );
            }
            None => {
                let _ = writeln!(out, "  {what:<52} not measured");
            }
        };
    line(
        &mut out,
        "pause / memcpy of the same bytes",
        worst(&|r| Some(r.pause_ratio())),
        1.5,
        "x",
    );
    line(
        &mut out,
        "checkpoint / zstd -1 -T0 on the same bytes",
        worst(&|r| r.checkpoint_ratio()),
        1.1,
        "x",
    );
    line(
        &mut out,
        "restart / zstd -d -T0 on the same bytes",
        worst(&|r| r.restart_ratio()),
        1.2,
        "x",
    );
    let inc = |f: &dyn Fn(&StoreBenchReport) -> f64| {
        report
            .incremental
            .iter()
            .map(f)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    line(
        &mut out,
        "incremental (5%) bytes / full, end to end",
        worst(&|r| r.incremental_bytes_ratio().map(|v| v * 100.0)),
        10.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) time / full, end to end",
        worst(&|r| r.incremental_time_ratio().map(|v| v * 100.0)),
        20.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) bytes / full, store level",
        inc(&|r| r.incremental_bytes_ratio * 100.0),
        10.0,
        "%",
    );
    line(
        &mut out,
        "incremental (5%) time / full, store level",
        inc(&|r| r.incremental_time_ratio * 100.0),
        20.0,
        "%",
    );
    let safe_point_worst = |figure: fn(&SafePointRun) -> f64| {
        report
            .safe_point
            .iter()
            .map(figure)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    line(
        &mut out,
        "safe point / 1 ms iteration",
        safe_point_worst(SafePointRun::share_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "  the same, beyond the A/A control",
        safe_point_worst(SafePointRun::beyond_noise_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "  its own CPU time / 1 ms iteration",
        safe_point_worst(SafePointRun::cpu_percent),
        0.1,
        "%",
    );
    line(
        &mut out,
        "agent peak RSS - copy budget",
        worst(&|r| Some(r.rss_over_budget() as f64 / MIB as f64)),
        64.0,
        " MiB",
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Least-squares fits (y = slope * x + intercept):");
    for f in &report.fits {
        let _ = writeln!(
            out,
            "  {:<34} slope {:>10.4} {}/{}  intercept {:>9.2} {}  R^2 {:.3}  ({} points)",
            f.name, f.slope, f.y_unit, f.x_unit, f.intercept, f.y_unit, f.r2, f.points
        );
    }
    for s in &report.skipped {
        let _ = writeln!(out, "skipped: {s}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::figures::IncrementalRun;
    use crate::suite::report::fits;

    fn run(procs: u32, size: u64) -> AgentRun {
        AgentRun {
            procs,
            size,
            copy_budget: 2 * size,
            rank_bytes: vec![size; procs as usize],
            pause_ns: vec![size / 10; procs as usize],
            copy_ns: vec![size / 12; procs as usize],
            streamed: vec![false; procs as usize],
            memcpy_ns: size / 12,
            node_memcpy_ns: size / 12,
            checkpoint_ns: size * 2,
            resumed_ns: size / 5,
            zstd_ns: Some(size * 2),
            zstd_d_ns: Some(size),
            restart_ns: size,
            raw_image_ns: Some(size / 2),
            restart_by_threads: Vec::new(),
            agent_cpu_s: 0.5,
            raw_bytes: size,
            stored_bytes: size / 2,
            peak_rss_bytes: 2 * size + MIB,
            pause_samples_ns: vec![size / 10, size / 9],
            incremental: Some(IncrementalRun {
                steps: 10,
                bytes: size,
                copied_bytes: size / 20,
                pause_ns: size / 200,
                checkpoint_ns: size / 10,
                stored_bytes: size / 40,
            }),
        }
    }

    #[test]
    fn report_has_every_section_and_a_plot() {
        let mut report = SuiteReport {
            preset: "quick".into(),
            started_unix: 0,
            host: "test".into(),
            cpus: 2,
            sizes: vec![run(1, 64 * MIB), run(1, 256 * MIB)],
            ranks: vec![run(1, 64 * MIB), run(2, 64 * MIB)],
            incremental: Vec::new(),
            quiesce_slack: "auto".into(),
            safe_point: vec![SafePointRun {
                ranks: 2,
                work: "cpu".into(),
                iter_ns: 1e6,
                plain_min_ns: 1e6,
                with_min_ns: 1e6 + 50.0,
                safe_point_ns: 50.0,
                safe_point_median_ns: 80.0,
                noise_floor_ns: 30.0,
                control_ns: -20.0,
                cpu_ns: 40.0,
            }],
            quiesce: Vec::new(),
            fits: Vec::new(),
            skipped: vec!["MPI quiesce: not requested".into()],
        };
        report.fits = fits(&report);
        assert!(report.fits.iter().any(|f| f.name == "pause vs state size"));
        let text = render(&report);
        for needle in [
            "pause / memcpy",
            "zstd -1 -T0",
            "zstd -d -T0",
            "Least-squares",
            "safe point",
            "skipped:",
            "incremental (5%) time / full, end to end             worst    5.000%",
            "Full-checkpoint pause samples",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let json = serde_json::to_string(&report).expect("serializes");
        let back: SuiteReport = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.sizes.len(), 2);
        let dir = tempfile::tempdir().expect("tempdir");
        let svg = dir.path().join("bench.svg");
        crate::plot::write_svg(&report, &svg).expect("plots");
        let svg = fs::read_to_string(svg).expect("reads");
        assert!(
            svg.starts_with("<svg") && svg.contains("pause"),
            "{}",
            &svg[..200.min(svg.len())]
        );
    }
}
