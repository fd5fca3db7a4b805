//! The figures of one `cryo-bench agent` configuration as text.

use cryo_agent::units::format_bytes;

use crate::figures::AgentRun;

/// Prints the figures of one configuration, each beside its target.
pub(super) fn print_result(r: &AgentRun) {
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "== {} process(es) x {} of state (copy budget {}) ==",
        r.procs,
        format_bytes(r.size),
        format_bytes(r.copy_budget)
    );
    println!(
        "  memcpy of {} (1 thread, warm): {:.1} ms",
        format_bytes(r.rank_bytes.first().copied().unwrap_or(0)),
        ms(r.memcpy_ns)
    );
    for (rank, pause) in r.pause_ns.iter().enumerate() {
        println!(
            "  rank {rank}: pause {:.1} ms (copy {:.1} ms) = {:.2}x memcpy (target <= 1.5x){}",
            ms(*pause),
            ms(r.copy_ns.get(rank).copied().unwrap_or(0)),
            *pause as f64 / r.memcpy_ns.max(1) as f64,
            if r.streamed.get(rank).copied().unwrap_or(false) {
                " [streamed: over the copy budget]"
            } else {
                ""
            }
        );
    }
    if r.pause_ns.len() > 1 {
        let worst = r.pause_ns.iter().max().copied().unwrap_or(0);
        let mean = r.pause_ns.iter().sum::<u64>() / r.pause_ns.len() as u64;
        println!(
            "  node: worst pause {:.1} ms, mean {:.1} ms; memcpy of all {} ranks' {}: {:.1} ms; worst = {:.2}x (target <= 1.5x)",
            ms(worst),
            ms(mean),
            r.pause_ns.len(),
            format_bytes(r.rank_bytes.iter().sum()),
            ms(r.node_memcpy_ns),
            worst as f64 / r.node_memcpy_ns.max(1) as f64
        );
    }
    match r.zstd_ns {
        Some(z) => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd -1 -T0 on the same {}: {:.1} ms; ratio {:.2}x (target <= 1.1x)",
            ms(r.checkpoint_ns),
            ms(r.resumed_ns),
            format_bytes(r.raw_bytes),
            ms(z),
            r.checkpoint_ns as f64 / z.max(1) as f64
        ),
        None => println!(
            "  checkpoint end to end {:.1} ms (all ranks resumed at {:.1} ms); zstd not available for the baseline",
            ms(r.checkpoint_ns),
            ms(r.resumed_ns)
        ),
    }
    println!(
        "  agent CPU during the checkpoint: {:.2} s = {:.2} cores busy on average",
        r.agent_cpu_s,
        r.agent_cpu_s / (r.checkpoint_ns.max(1) as f64 / 1e9)
    );
    println!(
        "  stored {} for {} raw ({:.2}x)",
        format_bytes(r.stored_bytes),
        format_bytes(r.raw_bytes),
        r.raw_bytes as f64 / r.stored_bytes.max(1) as f64
    );
    match r.zstd_d_ns {
        Some(z) => println!(
            "  restart (process start to all regions restored): {:.1} ms; zstd -d -T0 of the same bytes: {:.1} ms; ratio {:.2}x (target <= 1.2x)",
            ms(r.restart_ns),
            ms(z),
            r.restart_ns as f64 / z.max(1) as f64
        ),
        None => println!(
            "  restart (process start to all regions restored): {:.1} ms",
            ms(r.restart_ns)
        ),
    }
    if let Some(raw) = r.raw_image_ns {
        println!(
            "  raw-image baseline (the same bytes uncompressed in one file, read into fresh memory): {:.1} ms; restart / raw image {:.2}x (target <= 1x)",
            ms(raw),
            r.restart_ns as f64 / raw.max(1) as f64
        );
    }
    for t in &r.restart_by_threads {
        println!(
            "  restart with {} restore thread(s): {:.1} ms{}",
            t.threads,
            ms(t.restart_ns),
            r.raw_image_ns.map_or(String::new(), |raw| format!(
                "; / raw image {:.2}x",
                t.restart_ns as f64 / raw.max(1) as f64
            ))
        );
    }
    if r.pause_samples_ns.len() > 1 {
        println!(
            "  pause samples (worst rank, full checkpoints): {:?} ms; the smallest is reported",
            r.pause_samples_ns
                .iter()
                .map(|p| (ms(*p) * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    if let Some(inc) = &r.incremental {
        println!(
            "  incremental after {} steps: copied {} of {} ({:.1}%), wrote {} ({:.1}% of the full checkpoint's), pause {:.1} ms, checkpoint {:.1} ms = {:.1}% of the full one's (target <= 20%)",
            inc.steps,
            format_bytes(inc.copied_bytes),
            format_bytes(inc.bytes),
            inc.copied_bytes as f64 * 100.0 / inc.bytes.max(1) as f64,
            format_bytes(inc.stored_bytes),
            inc.stored_bytes as f64 * 100.0 / r.stored_bytes.max(1) as f64,
            ms(inc.pause_ns),
            ms(inc.checkpoint_ns),
            inc.checkpoint_ns as f64 * 100.0 / r.checkpoint_ns.max(1) as f64
        );
    }
    println!(
        "  agent peak RSS {} against a copy budget of {} ({:.2}x; target <= budget + 64 MiB)",
        format_bytes(r.peak_rss_bytes),
        format_bytes(r.copy_budget),
        r.peak_rss_bytes as f64 / r.copy_budget.max(1) as f64
    );
}
