//! `cryo-counter`: a small rank that exercises everything cryo restores.
//!
//! Each step it reads its input through a shared file mapping (region
//! `input`), updates one 256 KiB block of its state (region `state`, whose
//! first page is a header holding the step and the log's fd number), keeps
//! running sums in a buffer it owns (registered with `protect`), appends one
//! line to its log through a raw fd, and reaches a safe point. At the end it
//! writes its final state to a file and prints a hash of it.
//!
//! A restarted run picks up from the step saved in the header, writing to
//! the same fd number, which cryo re-opened at the saved offset; so its log
//! and final state are byte-identical to an uninterrupted run.

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

use std::os::fd::{BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cryo_rank::{Backing, SafePoint};
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

#[derive(Parser, Debug)]
#[command(
    about = "cryo example rank: a deterministic counter with a log, an input mapping and state regions"
)]
struct Args {
    /// Number of steps.
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Log file, one line per step.
    #[arg(long)]
    log: PathBuf,
    /// Input file, mapped shared.
    #[arg(long)]
    input: PathBuf,
    /// State size in MiB.
    #[arg(long, default_value_t = 8)]
    state_mb: u64,
    /// Where to write the final state.
    #[arg(long)]
    r#final: PathBuf,
    /// Milliseconds to sleep per step (default: $CRYO_EXAMPLE_STEP_MS or 0).
    #[arg(long)]
    step_ms: Option<u64>,
    /// What the state holds: `counter` (a pattern the steps scramble) or
    /// `mixed` (smooth doubles plus noise, index arrays and zeros, as a
    /// solver's memory; each step changes one word of its block), for
    /// benchmarks.
    #[arg(long, value_enum, default_value_t = StateKind::Counter)]
    state_kind: StateKind,
    /// Share of the state the steps change, for benchmarks of incremental
    /// checkpoints: the steps cycle through that share of the state's
    /// `--change-unit-kib` units, spread evenly over it. 1 changes every
    /// block in turn.
    #[arg(long, default_value_t = 1.0)]
    changing_share: f64,
    /// The unit `--changing-share` counts in (the agent's chunk size).
    #[arg(long, default_value_t = 1024)]
    change_unit_kib: u64,
    /// Keep the state in a heap buffer registered with `protect` (as codes
    /// whose arrays live inside their own structures do) instead of a
    /// region.
    #[arg(long, env = "CRYO_EXAMPLE_PROTECTED_STATE")]
    protected_state: bool,
    /// A file held open for reading, as a code keeps its mesh: each step
    /// reads one word of it (`pread`) into its log line.
    #[arg(long, env = "CRYO_EXAMPLE_READS")]
    reads: Option<PathBuf>,
    /// Run a child process (`sleep`) for the life of the rank, as a code
    /// runs a helper beside it: a checkpoint names it.
    #[arg(long, env = "CRYO_EXAMPLE_CHILD")]
    child: bool,
}

/// Starts `sleep`, killed when this process ends however it ends.
fn start_child() -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let mut sleep = std::process::Command::new("sleep");
    sleep.arg("100000");
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        sleep.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    sleep.spawn().context("starting the child process")
}

/// The header word that holds the fd of `--reads`, or `NO_FD`.
const READS_FD: usize = 3;
const NO_FD: u64 = u64::MAX;

/// The word of the file behind `fd` at step `step`, cycling through it.
fn read_word(fd: RawFd, step: u64) -> Result<u64> {
    let len = nix::sys::stat::fstat(fd)
        .context("fstat of --reads")?
        .st_size;
    // SAFETY: the fd is `--reads`, open for the life of the process
    // (opened by us on a fresh start, re-opened by cryo on a restart).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let words = u64::try_from(len / 8).unwrap_or(0);
    if words == 0 {
        bail!("--reads holds no word");
    }
    let offset = i64::try_from((step.wrapping_mul(7919) % words) * 8).context("offset")?;
    let mut word = [0u8; 8];
    let got = nix::sys::uio::pread(fd, &mut word, offset).context("pread of --reads")?;
    if got != word.len() {
        bail!("--reads: short read at {offset}");
    }
    Ok(u64::from_le_bytes(word))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StateKind {
    Counter,
    Mixed,
}

const MAGIC: u64 = u64::from_le_bytes(*b"CNTRv001");
const HEADER: usize = 4096;
const BLOCK: usize = 256 << 10;

fn words(bytes: &mut [u8]) -> &mut [u64] {
    // The regions are page-aligned and their lengths multiples of 8 here.
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns, and align_to_mut only
        // yields the correctly aligned middle part.
        unsafe { bytes.align_to_mut::<u64>() }
    };
    assert!(
        head.is_empty() && tail.is_empty(),
        "region not aligned for u64"
    );
    body
}

fn write_all(fd: RawFd, mut bytes: &[u8]) -> Result<()> {
    // SAFETY: the fd is the log, open for the life of the process (opened
    // by us on a fresh start, re-opened by cryo on a restart).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => bail!("writing the log: {err}"),
        }
    }
    Ok(())
}

fn fnv(bytes: &[u8], mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// Which block each step changes: every block in turn, or only those in a
/// share of the state's units spread evenly over it.
struct ChangingBlocks {
    nblocks: u64,
    /// Blocks per unit.
    per_unit: u64,
    /// Units, and how many of them change.
    units: u64,
    changing_units: u64,
}

impl ChangingBlocks {
    fn new(args: &Args, nblocks: usize) -> Result<ChangingBlocks> {
        let share = args.changing_share;
        if !(share > 0.0 && share <= 1.0) {
            bail!("--changing-share must be in (0, 1], not {share}");
        }
        let unit = args.change_unit_kib << 10;
        if unit == 0 || unit % BLOCK as u64 != 0 {
            bail!(
                "--change-unit-kib must be a multiple of {} KiB",
                BLOCK >> 10
            );
        }
        let nblocks = nblocks as u64;
        let per_unit = unit / BLOCK as u64;
        let units = nblocks.div_ceil(per_unit);
        // A share of a unit count; the result is at most `units`.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let changing_units = ((share * units as f64).ceil() as u64).clamp(1, units);
        Ok(ChangingBlocks {
            nblocks,
            per_unit,
            units,
            changing_units,
        })
    }

    fn block(&self, step: u64) -> usize {
        if self.changing_units == self.units {
            return usize::try_from(step % self.nblocks).unwrap_or(0);
        }
        let cycle = step % (self.changing_units * self.per_unit);
        let unit = cycle / self.per_unit * self.units / self.changing_units;
        let block = (unit * self.per_unit + cycle % self.per_unit) % self.nblocks;
        usize::try_from(block).unwrap_or(0)
    }
}

fn run(args: &Args) -> Result<()> {
    let info = cryo_rank::init().context("cryo init")?;
    let step_ms = args.step_ms.unwrap_or_else(|| {
        std::env::var("CRYO_EXAMPLE_STEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let data_len = usize::try_from(args.state_mb << 20).context("state size")?;
    let state: &'static mut [u8] = if args.protected_state {
        let buffer: &'static mut [u8] = Box::leak(vec![0u8; HEADER + data_len].into_boxed_slice());
        // SAFETY: the buffer is leaked, so valid for the life of the
        // process, and only this thread touches it.
        unsafe { cryo_rank::protect("state", buffer.as_mut_ptr(), buffer.len())? };
        buffer
    } else {
        cryo_rank::region("state", HEADER + data_len, Backing::Anonymous)?
    };
    if std::env::var_os("CRYO_EXAMPLE_STATE_DONTFORK").is_some() {
        // As an RDMA library marks the memory it registers: a clone of this
        // process lacks the state, so cryo must copy it while parked.
        // SAFETY: advice on a live mapping this process owns; the pages
        // stay as they are.
        let advised =
            unsafe { libc::madvise(state.as_mut_ptr().cast(), state.len(), libc::MADV_DONTFORK) };
        if advised != 0 {
            bail!(
                "madvise(MADV_DONTFORK): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let input = cryo_rank::region(
        "input",
        0,
        Backing::File {
            path: &args.input,
            offset: 0,
            shared: true,
        },
    )?;
    let meta: &'static mut [u64; 4] = Box::leak(Box::new([0u64; 4]));
    // SAFETY: `meta` is leaked, so valid for the life of the process, and
    // only this thread touches it.
    unsafe {
        cryo_rank::protect(
            "meta",
            meta.as_mut_ptr().cast(),
            std::mem::size_of_val(meta),
        )?
    };

    if info.restored_epoch.is_none() && std::env::var_os("CRYO_EXAMPLE_FRESH_ONLY_REGION").is_some()
    {
        // A buffer registered on a fresh start only, as a code that sets
        // up a table once and skips that setup when it resumes: the
        // runtime names it after a restart.
        let table: &'static mut [u8] = Box::leak(vec![7u8; 8192].into_boxed_slice());
        // SAFETY: leaked, so valid for the life of the process; never
        // touched again.
        unsafe { cryo_rank::protect("fresh-only", table.as_mut_ptr(), table.len())? };
    }
    if info.restored_epoch.is_none() && args.state_kind == StateKind::Mixed {
        cryo_bench::synth::mixed_state(&mut state[HEADER..], u64::from(info.rank) + 1);
    }
    let (header, data) = state.split_at_mut(HEADER);
    let header = words(header);
    let data = words(data);
    let log_fd: RawFd = match info.restored_epoch {
        None => {
            let fd = open(
                &args.log,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_TRUNC
                    | OFlag::O_APPEND
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .with_context(|| format!("opening {}", args.log.display()))?;
            match args.state_kind {
                StateKind::Counter => {
                    for (i, w) in data.iter_mut().enumerate() {
                        *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    }
                }
                // Filled as bytes before the split above.
                StateKind::Mixed => {}
            }
            header[0] = MAGIC;
            header[1] = 0;
            header[2] = u64::try_from(fd).context("fd")?;
            header[READS_FD] = match &args.reads {
                Some(path) => {
                    let fd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                        .with_context(|| format!("opening {}", path.display()))?;
                    u64::try_from(fd).context("fd")?
                }
                None => NO_FD,
            };
            fd
        }
        Some(epoch) => {
            if header[0] != MAGIC {
                bail!("restored state from epoch {epoch} has no counter header");
            }
            say!(
                "cryo-counter rank {}: restarted from epoch {epoch} at step {}",
                info.rank,
                header[1]
            );
            RawFd::try_from(header[2]).context("saved fd")?
        }
    };
    let mut child = args.child.then(start_child).transpose()?;
    let block_words = BLOCK / 8;
    let nblocks = (data.len() / block_words).max(1);
    let changing = ChangingBlocks::new(args, nblocks)?;
    while header[1] < args.steps {
        let step = header[1];
        let block = changing.block(step);
        let lo = block * block_words;
        let hi = (lo + block_words).min(data.len());
        let mut sum = 0u64;
        let touched = match args.state_kind {
            StateKind::Counter => hi,
            // Keep the state's shape: change one word per step.
            StateKind::Mixed => (lo + 1).min(hi),
        };
        for (i, w) in data[lo..touched].iter_mut().enumerate() {
            let byte =
                u64::from(input[(usize::try_from(step).unwrap_or(0) * 31 + i) % input.len()]);
            *w = w.rotate_left(5) ^ byte ^ step;
            sum = sum.wrapping_add(*w);
        }
        meta[0] = meta[0].wrapping_add(sum);
        meta[1] = step;
        let reads = match header[READS_FD] {
            NO_FD => String::new(),
            fd => {
                let word = read_word(RawFd::try_from(fd).context("saved fd")?, step)?;
                format!(" reads {word:016x}")
            }
        };
        let line = format!(
            "rank {} step {step} block {block} sum {sum:016x} total {:016x}{reads}\n",
            info.rank, meta[0]
        );
        write_all(log_fd, line.as_bytes())?;
        header[1] = step + 1;
        match cryo_rank::checkpoint_point()? {
            SafePoint::Continue => {}
            SafePoint::Checkpointed(epoch) => say!(
                "cryo-counter rank {}: checkpointed epoch {epoch} after step {step}",
                info.rank
            ),
            SafePoint::Aborted(epoch) => say!(
                "cryo-counter rank {}: checkpoint {epoch} aborted",
                info.rank
            ),
        }
        if step_ms > 0 {
            std::thread::sleep(Duration::from_millis(step_ms));
        }
    }
    if let Some(child) = &mut child {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = Vec::with_capacity(state.len() + 32);
    out.extend_from_slice(state);
    for w in meta.iter() {
        out.extend_from_slice(&w.to_le_bytes());
    }
    std::fs::write(&args.r#final, &out)
        .with_context(|| format!("writing {}", args.r#final.display()))?;
    println!("final {:016x}", fnv(&out, 0xcbf2_9ce4_8422_2325));
    // At the end, when the prefetch of a restart has long finished.
    if cryo_rank::restored_epoch().is_some() {
        say!(
            "cryo-counter rank {}: prefetch: {}",
            info.rank,
            cryo_rank::prefetch_status()
        );
    }
    cryo_rank::finalize();
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(err) = run(&args) {
        say!("cryo-counter: error: {err:#}");
        std::process::exit(2);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(share: f64) -> Args {
        Args::parse_from([
            "cryo-counter",
            "--log",
            "l",
            "--input",
            "i",
            "--final",
            "f",
            "--changing-share",
            &share.to_string(),
        ])
    }

    #[test]
    fn every_block_changes_in_turn_by_default() {
        let blocks = ChangingBlocks::new(&args(1.0), 10).unwrap();
        let seen: Vec<usize> = (0..12).map(|s| blocks.block(s)).collect();
        assert_eq!(seen, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn a_share_changes_that_many_units_spread_over_the_state() {
        // 128 units of four blocks; 5% is 7 units.
        let blocks = ChangingBlocks::new(&args(0.05), 512).unwrap();
        let mut units: Vec<usize> = (0..10_000).map(|s| blocks.block(s) / 4).collect();
        units.sort_unstable();
        units.dedup();
        assert_eq!(units, [0, 18, 36, 54, 73, 91, 109]);
        // One cycle touches every block of those units once.
        let mut cycle: Vec<usize> = (0..28).map(|s| blocks.block(s)).collect();
        cycle.sort_unstable();
        cycle.dedup();
        assert_eq!(cycle.len(), 28);
    }

    #[test]
    fn a_bad_share_is_refused() {
        assert!(ChangingBlocks::new(&args(0.0), 8).is_err());
        assert!(ChangingBlocks::new(&args(1.5), 8).is_err());
    }
}
