//! quiesce-bench: what cryo's MPI safe point costs an application.
//!
//! Every rank runs iterations of `--iter-us` of work, in `--trials` triples
//! of blocks of `--iters` iterations: one block without, one with a
//! `checkpoint_point()` per iteration, and one without again, interleaved
//! (the order rotates) so that drift hits all alike. On a busy or
//! oversubscribed machine a block is only ever slowed down (descheduling
//! adds time, nothing removes it), so each side's *minimum* over the trials
//! is its best estimate, and the overhead is the difference of the minima.
//! The same difference between the two plain sides (the A/A control) shows
//! how large a difference noise alone makes. A last block times each safe
//! point's own CPU time (less the cost of reading the clock), which no
//! scheduling noise inflates. Rank 0 prints the figures per safe point and
//! as a share of an iteration (`--json` adds one JSON line for `cryo
//! bench`). With
//! `--run-secs S` it afterwards keeps iterating for S seconds with safe
//! points, so `cryo checkpoint` can measure quiesce latency and pause
//! against it (see `scripts/bench-quiesce.sh`). With `--in-flight` those
//! iterations break the safe-point contract on purpose: rank 0 sends rank 1
//! a message just before each safe point, which rank 1 receives only after
//! it, so every checkpoint must be refused.
//!
//! An iteration is `--iter-us` of the rank's own CPU time (`--work cpu`, the
//! default), so the figure does not depend on the CPU's speed and, with more
//! ranks than cores, an iteration takes as long as it would in an
//! application: a descheduled rank does no work. `--work clock` spins on the
//! wall clock instead, so a descheduled rank's iteration completes while it
//! is off the core; ranks that never synchronise then gain from
//! oversubscription what any synchronisation, the application's or the
//! safe point's, gives back.

/// One line to stderr in one write: the ranks' lines reach the launcher
/// through one stream, and `eprintln!` writes each piece of a line on its
/// own, so two ranks' lines could interleave mid-line.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

#[derive(Debug, Parser)]
struct Args {
    /// Work per iteration, microseconds.
    #[arg(long, default_value_t = 1000)]
    iter_us: u64,
    /// Iterations per block.
    #[arg(long, default_value_t = 200)]
    iters: u64,
    /// Interleaved pairs of blocks (without / with safe points); 0 skips
    /// the safe point's cost altogether (only the `--run-secs` iterations:
    /// a job that is coupled from its first safe point).
    #[arg(long, default_value_t = 15)]
    trials: u32,
    /// Also print the figures as one JSON line.
    #[arg(long)]
    json: bool,
    /// Then iterate with safe points for this long (for checkpoints).
    #[arg(long, default_value_t = 0.0)]
    run_secs: f64,
    /// Bytes of state per rank kept in a cryo region.
    #[arg(long, default_value_t = 64 << 20)]
    state_bytes: usize,
    /// What the state is filled with: a cheap pattern that compresses
    /// well, or noise that does not compress (as a store read at disk
    /// speed, for restart benchmarks).
    #[arg(long, value_enum, default_value_t = Fill::Pattern)]
    fill: Fill,
    /// Sleep this long before `MPI_Init`, as a launcher and `MPI_Init` take
    /// seconds at scale (for `cryo-bench cold-restart`).
    #[arg(long, default_value_t = 0)]
    start_delay_ms: u64,
    /// What an iteration's `--iter-us` counts: the rank's CPU time, or the
    /// wall clock.
    #[arg(long, value_enum, default_value_t = Work::Cpu)]
    work: Work,
    /// In the `--run-secs` iterations, write one byte in every page of this
    /// share of the state after each iteration's work (0 to 1), as a code
    /// that updates its arrays does: the first write to a page after a
    /// checkpoint faults (write tracking, a copy on write under a
    /// snapshot), and the faults lengthen that iteration.
    #[arg(long, default_value_t = 0.0)]
    write_share: f64,
    /// In the `--run-secs` iterations, leave a message from rank 0 to rank
    /// 1 in flight across each safe point (tag [`IN_FLIGHT_TAG`]).
    #[arg(long)]
    in_flight: bool,
    /// In the `--run-secs` iterations, log every safe point to
    /// `PREFIX.<rank>`: its start (Unix ns), its length (ns) and the epoch
    /// it checkpointed (0 for none), so `cryo bench` can count the safe
    /// points from a request to the park and see the pause as the
    /// application saw it.
    #[arg(long)]
    points_log: Option<std::path::PathBuf>,
    /// In the `--run-secs` iterations, this rank never calls the safe
    /// point (a code that forgot it on some ranks): no checkpoint can park
    /// the job, and the others wait at theirs until the agent gives up.
    #[arg(long)]
    skip_safe_points_on: Option<i32>,
}

/// The tag of the message `--in-flight` leaves across the safe point.
const IN_FLIGHT_TAG: i32 = 99;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fill {
    Pattern,
    Noise,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Work {
    Cpu,
    Clock,
}

/// This thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; the clock id is a constant
    // every Linux supports.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The wall clock in nanoseconds since the Unix epoch (comparable across
/// processes, unlike `Instant`).
fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn spin(work: Work, us: u64) {
    let length = Duration::from_micros(us);
    match work {
        Work::Cpu => {
            let until = thread_cpu_time() + length;
            while thread_cpu_time() < until {
                std::hint::spin_loop();
            }
        }
        Work::Clock => {
            let until = Instant::now() + length;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::thread::sleep(Duration::from_millis(args.start_delay_ms));
    let universe = mpi::initialize().context("MPI_Init failed")?;
    let world = universe.world();
    cryo_rank::init_mpi(&world).context("cryo init")?;
    let mapping = Instant::now();
    let state = cryo_rank::region("state", args.state_bytes, cryo_rank::Backing::Anonymous)
        .context("state region")?;
    let mapped_ms = mapping.elapsed().as_secs_f64() * 1e3;
    // Written at once: `cryo-bench cold-restart` times a start to this line.
    match cryo_rank::restored_epoch() {
        Some(epoch) => say!(
            "quiesce-bench rank {}: state ready, restarted from epoch {epoch} ({mapped_ms:.0} ms to restore)",
            world.rank()
        ),
        None => say!(
            "quiesce-bench rank {}: state ready, fresh start",
            world.rank()
        ),
    }
    // A restored state is the application's: not filled again.
    let fill = cryo_rank::restored_epoch().is_none().then_some(args.fill);
    match fill {
        None => {}
        Some(Fill::Pattern) => {
            for (i, byte) in state.iter_mut().enumerate() {
                *byte = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7];
            }
        }
        Some(Fill::Noise) => {
            let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ (u64::from(world.rank().unsigned_abs()) + 1);
            for word in state.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
            }
        }
    }

    if args.trials > 0 {
        measure_cost(&args, &world)?;
    }
    if args.run_secs > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(args.run_secs);
        let in_flight = args.in_flight && world.size() > 1;
        // Flushed at each checkpoint, so the lines up to it are there even
        // if the job is then preempted and killed.
        let mut log = match &args.points_log {
            Some(prefix) => {
                let path = format!("{}.{}", prefix.display(), world.rank());
                let file =
                    std::fs::File::create(&path).with_context(|| format!("creating {path}"))?;
                Some(std::io::BufWriter::new(file))
            }
            None => None,
        };
        // A share of whole pages; the result is at most the state's length.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let written =
            ((args.write_share.clamp(0.0, 1.0) * state.len() as f64) as usize).min(state.len());
        let mut generation = 0u8;
        loop {
            spin(args.work, args.iter_us);
            generation = generation.wrapping_add(1);
            for page in state[..written].chunks_mut(4096) {
                page[0] = generation;
            }
            if in_flight && world.rank() == 0 {
                world.process_at_rank(1).send_with_tag(&1u64, IN_FLIGHT_TAG);
            }
            let (wall, t) = (unix_ns(), Instant::now());
            let outcome = if args.skip_safe_points_on == Some(world.rank()) {
                cryo_rank::SafePoint::Continue
            } else {
                cryo_rank::checkpoint_point().context("safe point")?
            };
            if let Some(log) = &mut log {
                use std::io::Write;
                let epoch = match outcome {
                    cryo_rank::SafePoint::Checkpointed(epoch) => epoch,
                    _ => 0,
                };
                writeln!(log, "{wall} {} {epoch}", t.elapsed().as_nanos())
                    .context("writing the points log")?;
                if epoch != 0 {
                    log.flush().context("writing the points log")?;
                }
            }
            if in_flight && world.rank() == 1 {
                let (_, _) = world
                    .process_at_rank(0)
                    .receive_with_tag::<u64>(IN_FLIGHT_TAG);
            }
            // Agree on stopping, so every rank calls the safe point equally often.
            let local = u8::from(Instant::now() >= until);
            let mut all = 0u8;
            world.all_reduce_into(&local, &mut all, SystemOperation::max());
            if all != 0 {
                break;
            }
        }
        if let Some(mut log) = log {
            use std::io::Write;
            log.flush().context("writing the points log")?;
        }
    }
    // At the end, when the prefetch of a restart has long finished.
    if cryo_rank::restored_epoch().is_some() {
        say!(
            "quiesce-bench rank {}: prefetch: {}",
            world.rank(),
            cryo_rank::prefetch_status()
        );
    }
    cryo_rank::finalize();
    Ok(())
}

/// The safe point's cost: interleaved blocks of iterations without and with
/// safe points, an A/A control, and the safe point's own CPU time, printed
/// by rank 0.
fn measure_cost(args: &Args, world: &SimpleCommunicator) -> Result<()> {
    let measure = |with_safe_point: bool| -> Result<f64> {
        world.barrier();
        let start = Instant::now();
        for _ in 0..args.iters {
            spin(args.work, args.iter_us);
            if with_safe_point {
                cryo_rank::checkpoint_point().context("safe point")?;
            }
        }
        let local = start.elapsed().as_secs_f64();
        let mut slowest = 0.0f64;
        world.all_reduce_into(&local, &mut slowest, SystemOperation::max());
        Ok(slowest)
    };
    // Warm up, then interleave; keep each side's fastest block.
    measure(true)?;
    let mut plain = Vec::new();
    let mut with = Vec::new();
    let mut control = Vec::new();
    for trial in 0..args.trials {
        // Rotate the order, so no side always follows another.
        for slot in 0..3 {
            match (trial + slot) % 3 {
                0 => plain.push(measure(false)?),
                1 => with.push(measure(true)?),
                _ => control.push(measure(false)?),
            }
        }
    }
    // The safe point's own CPU time, less that of the clock reads around it.
    let cpu_ns = {
        let mut timed = Duration::ZERO;
        let mut empty = Duration::ZERO;
        for _ in 0..args.iters {
            spin(args.work, args.iter_us);
            let before = thread_cpu_time();
            let between = thread_cpu_time();
            cryo_rank::checkpoint_point().context("safe point")?;
            let after = thread_cpu_time();
            empty += between.saturating_sub(before);
            timed += after.saturating_sub(between);
        }
        let local = (timed.as_secs_f64() - empty.as_secs_f64()).max(0.0) * 1e9 / args.iters as f64;
        let mut most = 0.0f64;
        world.all_reduce_into(&local, &mut most, SystemOperation::max());
        most
    };
    if world.rank() == 0 {
        let per_iter = |blocks: &mut Vec<f64>| {
            blocks.sort_by(f64::total_cmp);
            let min = blocks[0] / args.iters as f64;
            let median = blocks[blocks.len() / 2] / args.iters as f64;
            (min, median)
        };
        let (plain_min, plain_median) = per_iter(&mut plain);
        let (with_min, with_median) = per_iter(&mut with);
        let (control_min, _) = per_iter(&mut control);
        let control_ns = (control_min - plain_min) * 1e9;
        let iter_ns = args.iter_us as f64 * 1e3;
        let per_point_ns = (with_min - plain_min) * 1e9;
        let median_ns = (with_median - plain_median) * 1e9;
        // How much the fastest plain blocks differ: below this the overhead
        // cannot be told from noise.
        let noise_ns = if plain.len() > 1 {
            (plain[1] - plain[0]) / args.iters as f64 * 1e9
        } else {
            0.0
        };
        // The share is of the iteration as it ran (with more ranks than
        // cores, a CPU-time iteration takes longer than its work): what the
        // application is slowed down by.
        let ran_ns = (plain_min * 1e9).max(iter_ns);
        println!(
            "ranks {:>3}  iteration {} us of {} ({:.0} us as it ran)  safe point {:>8.0} ns (min of {} trials; median {:.0} ns; noise floor {:.0} ns; A/A control {:.0} ns; own CPU {:.0} ns)  overhead {:>7.4} %  (target < 0.1 %)",
            world.size(),
            args.iter_us,
            match args.work {
                Work::Cpu => "CPU time",
                Work::Clock => "wall clock",
            },
            ran_ns / 1e3,
            per_point_ns,
            args.trials,
            median_ns,
            noise_ns,
            control_ns,
            cpu_ns,
            per_point_ns / ran_ns * 100.0
        );
        if args.json {
            println!(
                "{{\"ranks\":{},\"work\":\"{}\",\"iter_ns\":{},\"trials\":{},\"iters\":{},\"plain_min_ns\":{:.1},\"with_min_ns\":{:.1},\"safe_point_ns\":{:.1},\"safe_point_median_ns\":{:.1},\"noise_floor_ns\":{:.1},\"control_ns\":{:.1},\"cpu_ns\":{:.1}}}",
                world.size(),
                match args.work {
                    Work::Cpu => "cpu",
                    Work::Clock => "clock",
                },
                iter_ns,
                args.trials,
                args.iters,
                plain_min * 1e9,
                with_min * 1e9,
                per_point_ns,
                median_ns,
                noise_ns,
                control_ns,
                cpu_ns
            );
        }
    }
    Ok(())
}
