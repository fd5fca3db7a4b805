//! quiesce-bench: what cryo's MPI safe point costs an application.
//!
//! Every rank runs iterations of about `--iter-us` of work (a spin on the
//! clock, so the figure does not depend on the CPU), once without and once
//! with a `checkpoint_point()` per iteration, and rank 0 prints the
//! overhead per safe point and as a share of an iteration. With
//! `--run-secs S` it afterwards keeps iterating for S seconds with safe
//! points, so `cryo checkpoint` can measure quiesce latency and pause
//! against it (see `scripts/bench-quiesce.sh`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use mpi::collective::SystemOperation;
use mpi::traits::*;

#[derive(Debug, Parser)]
struct Args {
    /// Work per iteration, microseconds.
    #[arg(long, default_value_t = 1000)]
    iter_us: u64,
    /// Iterations per measurement.
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    /// Then iterate with safe points for this long (for checkpoints).
    #[arg(long, default_value_t = 0.0)]
    run_secs: f64,
    /// Bytes of state per rank kept in a cryo region.
    #[arg(long, default_value_t = 64 << 20)]
    state_bytes: usize,
}

fn spin(us: u64) {
    let until = Instant::now() + Duration::from_micros(us);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let universe = mpi::initialize().context("MPI_Init failed")?;
    let world = universe.world();
    cryo_rank::init_mpi(&world).context("cryo init")?;
    let state = cryo_rank::region("state", args.state_bytes, cryo_rank::Backing::Anonymous)
        .context("state region")?;
    for (i, byte) in state.iter_mut().enumerate() {
        *byte = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7];
    }

    let measure = |with_safe_point: bool| -> Result<f64> {
        world.barrier();
        let start = Instant::now();
        for _ in 0..args.iters {
            spin(args.iter_us);
            if with_safe_point {
                cryo_rank::checkpoint_point().context("safe point")?;
            }
        }
        let local = start.elapsed().as_secs_f64();
        let mut slowest = 0.0f64;
        world.all_reduce_into(&local, &mut slowest, SystemOperation::max());
        Ok(slowest)
    };
    // Warm up, then alternate to average out drift.
    measure(true)?;
    let mut plain = 0.0;
    let mut with = 0.0;
    for _ in 0..3 {
        plain += measure(false)?;
        with += measure(true)?;
    }
    if world.rank() == 0 {
        let per_point_ns = (with - plain).max(0.0) / (3.0 * args.iters as f64) * 1e9;
        let share = per_point_ns / (args.iter_us as f64 * 1e3) * 100.0;
        println!(
            "ranks {:>3}  iteration {} us  safe point {:>8.0} ns  overhead {:>7.4} %  (target < 0.1 %)",
            world.size(),
            args.iter_us,
            per_point_ns,
            share
        );
    }
    if args.run_secs > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(args.run_secs);
        loop {
            spin(args.iter_us);
            cryo_rank::checkpoint_point().context("safe point")?;
            // Agree on stopping, so every rank calls the safe point equally often.
            let local = u8::from(Instant::now() >= until);
            let mut all = 0u8;
            world.all_reduce_into(&local, &mut all, SystemOperation::max());
            if all != 0 {
                break;
            }
        }
    }
    cryo_rank::finalize();
    Ok(())
}
