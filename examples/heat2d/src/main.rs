//! heat2d: a 2-D Jacobi heat stencil over MPI that survives checkpoint,
//! `kill -9` and restart through cryo.
//!
//! The N×N grid is split into blocks of rows, one per rank, with one halo row
//! above and below exchanged each iteration. The initial field is read
//! through a file mapping (a cryo file region); both grids and the loop state
//! live in cryo regions, so after a restart the loop carries on from the
//! iteration it was checkpointed at. Rank 0 appends the global residual of
//! every iteration to a log through a raw fd (which cryo re-opens at the same
//! number and offset on restart), and at the end gathers the grid, writes it
//! to a file, recomputes the whole run serially from the input and checks
//! that both agree bit for bit.
//!
//! `heat2d --make-input FILE --n N` writes a deterministic initial field.

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

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cryo_rank::{Backing, SafePoint};
use mpi::collective::SystemOperation;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;
use mpi::traits::*;

/// A 2-D Jacobi heat stencil that checks its own result.
#[derive(Debug, Parser)]
struct Args {
    /// Grid size (N×N points).
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Iterations to run in total (across restarts).
    #[arg(long, default_value_t = 100)]
    iters: u64,
    /// Initial field (N×N little-endian f64), made by --make-input.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Residual log, one line per iteration (rank 0).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Final grid (N×N little-endian f64, rank 0).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Sleep per iteration, so a checkpoint can land mid-run.
    #[arg(long, default_value_t = 0)]
    step_ms: u64,
    /// Write the initial field to this file and exit (no MPI needed).
    #[arg(long)]
    make_input: Option<PathBuf>,
}

/// Loop state kept in the `meta` region.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Iterations completed.
    iteration: u64,
    /// Which grid buffer is current (0 or 1).
    current: u64,
    /// The log's fd number (rank 0), kept so a restart finds it.
    log_fd: i64,
    /// Set once the fresh start has filled the grids.
    initialised: u64,
}

fn initial_value(n: usize, row: usize, col: usize) -> f64 {
    // Hot left edge, cool right edge, a warm spot off centre.
    if col == 0 {
        return 100.0;
    }
    if col == n - 1 || row == 0 || row == n - 1 {
        return 0.0;
    }
    let (x, y) = (col as f64 / n as f64, row as f64 / n as f64);
    50.0 * (-((x - 0.6).powi(2) + (y - 0.4).powi(2)) * 40.0).exp()
}

fn make_input(path: &Path, n: usize) -> Result<()> {
    let mut bytes = Vec::with_capacity(n * n * 8);
    for row in 0..n {
        for col in 0..n {
            bytes.extend_from_slice(&initial_value(n, row, col).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// One Jacobi sweep over rows `1..=rows` of `src` (with halos) into `dst`.
/// Global boundary rows and columns keep their values. Returns the largest
/// change.
fn sweep(src: &[f64], dst: &mut [f64], n: usize, rows: usize, first_global_row: usize) -> f64 {
    let mut residual = 0.0f64;
    for local in 1..=rows {
        let global = first_global_row + local - 1;
        let row = local * n;
        if global == 0 || global == n - 1 {
            dst[row..row + n].copy_from_slice(&src[row..row + n]);
            continue;
        }
        dst[row] = src[row];
        dst[row + n - 1] = src[row + n - 1];
        for col in 1..n - 1 {
            let at = row + col;
            let value = 0.25 * (src[at - n] + src[at + n] + src[at - 1] + src[at + 1]);
            residual = residual.max((value - src[at]).abs());
            dst[at] = value;
        }
    }
    residual
}

/// The same run, serially, from the input: the reference result.
fn serial_reference(input: &[f64], n: usize, iters: u64) -> Vec<f64> {
    let mut a = vec![0.0; (n + 2) * n];
    a[n..n + n * n].copy_from_slice(input);
    let mut b = a.clone();
    for _ in 0..iters {
        sweep(&a, &mut b, n, n, 0);
        std::mem::swap(&mut a, &mut b);
    }
    a[n..n + n * n].to_vec()
}

fn as_f64s(bytes: &mut [u8]) -> Result<&mut [f64]> {
    // SAFETY: regions are page-aligned and sized in whole f64s; any bit
    // pattern is a valid f64; the byte slice is uniquely borrowed.
    let (head, body, tail) = unsafe { bytes.align_to_mut::<f64>() };
    ensure!(
        head.is_empty() && tail.is_empty(),
        "region is not f64-aligned"
    );
    Ok(body)
}

fn open_log(path: &Path) -> Result<RawFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).context("log path")?;
    // SAFETY: a valid NUL-terminated path; open has no other preconditions.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening log {}", path.display()));
    }
    Ok(fd)
}

fn append(fd: RawFd, line: &str) -> Result<()> {
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid buffer of `rest.len()` bytes.
        let written = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if written < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("appending to the log");
        }
        rest = &rest[usize::try_from(written).unwrap_or(0)..];
    }
    Ok(())
}

fn main() {
    if let Err(err) = run() {
        say!("heat2d: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let n = args.n;
    ensure!(n >= 4, "--n must be at least 4");
    if let Some(path) = &args.make_input {
        return make_input(path, n);
    }
    let (Some(input), Some(log), Some(output)) = (&args.input, &args.log, &args.output) else {
        bail!("--input, --log and --output are required (or --make-input FILE)");
    };

    let universe = mpi::initialize().context("MPI_Init failed")?;
    let world = universe.world();
    let rank = usize::try_from(world.rank())?;
    let size = usize::try_from(world.size())?;
    ensure!(
        size <= n - 2,
        "{size} ranks are too many for a {n}×{n} grid"
    );

    let info = cryo_rank::init_mpi(&world).context("cryo init")?;
    let restarted = info.restored_epoch.is_some();

    // Rows [first, first + rows) of the global grid belong to this rank.
    let first = rank * n / size;
    let rows = (rank + 1) * n / size - first;
    let cells = (rows + 2) * n;

    let input_map = cryo_rank::region(
        "input",
        0,
        Backing::File {
            path: input,
            offset: 0,
            shared: true,
        },
    )
    .context("mapping the input")?;
    ensure!(
        input_map.len() >= n * n * 8,
        "{} is smaller than a {n}×{n} grid",
        input.display()
    );
    let meta_bytes = cryo_rank::region("meta", 4096, Backing::Anonymous).context("meta region")?;
    let grid_a = as_f64s(
        cryo_rank::region("grid-a", cells * 8, Backing::Anonymous).context("grid region")?,
    )?;
    let grid_b = as_f64s(
        cryo_rank::region("grid-b", cells * 8, Backing::Anonymous).context("grid region")?,
    )?;
    // SAFETY: the meta region is page-aligned, 4096 bytes, and Meta is
    // plain-old-data of 32 bytes.
    let meta = unsafe { &mut *meta_bytes.as_mut_ptr().cast::<Meta>() };

    if meta.initialised == 0 {
        ensure!(
            !restarted,
            "restarted, but the meta region was not restored"
        );
        let field: Vec<f64> = input_map[..n * n * 8]
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect();
        grid_a[n..n + rows * n].copy_from_slice(&field[first * n..(first + rows) * n]);
        grid_b.copy_from_slice(grid_a);
        meta.iteration = 0;
        meta.current = 0;
        meta.log_fd = if rank == 0 {
            i64::from(open_log(log)?)
        } else {
            -1
        };
        meta.initialised = 1;
    } else if rank == 0 {
        say!(
            "heat2d: restarted from epoch {} at iteration {}",
            info.restored_epoch.unwrap_or(0),
            meta.iteration
        );
    }
    let log_fd = RawFd::try_from(meta.log_fd)?;

    let up = (rank > 0).then(|| world.process_at_rank(i32::try_from(rank - 1).unwrap_or(0)));
    let down =
        (rank + 1 < size).then(|| world.process_at_rank(i32::try_from(rank + 1).unwrap_or(0)));
    while meta.iteration < args.iters {
        let (src, dst) = if meta.current == 0 {
            (&mut *grid_a, &mut *grid_b)
        } else {
            (&mut *grid_b, &mut *grid_a)
        };
        // Halo exchange: my first row goes up, my last row goes down.
        {
            let (top_halo, rest) = src.split_at_mut(n);
            let (interior, bottom_halo) = rest.split_at_mut(rows * n);
            if let Some(up) = &up {
                mpi::request::scope(|scope| {
                    let send = up.immediate_send(scope, &interior[..n]);
                    up.receive_into(top_halo);
                    send.wait();
                });
            }
            if let Some(down) = &down {
                mpi::request::scope(|scope| {
                    let send = down.immediate_send(scope, &interior[(rows - 1) * n..]);
                    down.receive_into(bottom_halo);
                    send.wait();
                });
            }
        }
        let local = sweep(src, dst, n, rows, first);
        let mut residual = 0.0f64;
        world.all_reduce_into(&local, &mut residual, SystemOperation::max());
        meta.current ^= 1;
        meta.iteration += 1;
        if rank == 0 {
            append(
                log_fd,
                &format!("iter {:05} residual {:.17e}\n", meta.iteration, residual),
            )?;
        }
        if args.step_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.step_ms));
        }
        match cryo_rank::checkpoint_point().context("safe point")? {
            SafePoint::Checkpointed(epoch) if rank == 0 => {
                say!(
                    "heat2d: checkpointed epoch {epoch} after iteration {}",
                    meta.iteration
                );
            }
            _ => {}
        }
    }

    // Gather the interior rows on rank 0.
    let current: &[f64] = if meta.current == 0 { grid_a } else { grid_b };
    let interior = &current[n..n + rows * n];
    if rank == 0 {
        let mut full = Vec::with_capacity(n * n);
        full.extend_from_slice(interior);
        for other in 1..size {
            let first_o = other * n / size;
            let rows_o = (other + 1) * n / size - first_o;
            let mut block = vec![0.0f64; rows_o * n];
            world
                .process_at_rank(i32::try_from(other)?)
                .receive_into(&mut block[..]);
            full.extend_from_slice(&block);
        }
        let mut bytes = Vec::with_capacity(n * n * 8);
        for value in &full {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        std::fs::write(output, &bytes).with_context(|| format!("writing {}", output.display()))?;
        // Self-check: the serial run from the input must agree bit for bit.
        let field: Vec<f64> = std::fs::read(input)
            .with_context(|| format!("reading {}", input.display()))?
            .chunks_exact(8)
            .take(n * n)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect();
        let reference = serial_reference(&field, n, args.iters);
        let mismatches = reference
            .iter()
            .zip(&full)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        if mismatches > 0 {
            bail!(
                "self-check FAILED: {mismatches} of {} points differ from the serial run",
                n * n
            );
        }
        let checksum = blake3::hash(&bytes);
        println!(
            "heat2d: OK {n}x{n} after {} iterations on {size} ranks, grid blake3 {}",
            args.iters,
            checksum.to_hex()
        );
    } else {
        world.process_at_rank(0).send(interior);
    }
    if rank == 0 && cryo_rank::restored_epoch().is_some() {
        say!("heat2d: prefetch: {}", cryo_rank::prefetch_status());
    }
    cryo_rank::finalize();
    Ok(())
}
