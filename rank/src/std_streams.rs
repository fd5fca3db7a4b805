//! What the standard streams were when the runtime was loaded, before the
//! program's `main`: the launcher's. A stream the program sent elsewhere
//! before `cryo_init` (`freopen(path, "w", stdout)` after `MPI_Init`, as
//! codes that keep a log per rank do) is its own output, held like any
//! file it opened; one still as the launcher made it (a pipe to the
//! launcher, or a file it opened for the rank, as a test harness or
//! `srun --output` does) is left to the new launcher at a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Whether the load-time record was taken (a static link may not run it).
static RECORDED: AtomicBool = AtomicBool::new(false);
/// Per stream: open at load, and its `(dev, inode)` then.
static OPEN: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];
static DEV: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static INO: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Runs when the dynamic loader loads the runtime, before `main`.
#[used]
#[link_section = ".init_array"]
static RECORD_AT_LOAD: extern "C" fn() = record_at_load;

extern "C" fn record_at_load() {
    for fd in 0..3 {
        // SAFETY: an all-zero `stat` is a valid value for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer; fstat only reads
        // the fd table.
        let open = unsafe { libc::fstat(fd, &mut st) } == 0;
        let slot = usize::try_from(fd).unwrap_or(0);
        OPEN[slot].store(open, Ordering::Relaxed);
        DEV[slot].store(st.st_dev, Ordering::Relaxed);
        INO[slot].store(st.st_ino, Ordering::Relaxed);
    }
    RECORDED.store(true, Ordering::Release);
}

/// Whether standard stream `fd` (0 to 2), now the file `id` (`(dev,
/// inode)`), is no longer what it was when the runtime was loaded.
pub(crate) fn redirected_since_start(fd: i32, id: (u64, u64)) -> bool {
    let Ok(slot) = usize::try_from(fd) else {
        return false;
    };
    if slot > 2 || !RECORDED.load(Ordering::Acquire) {
        return false;
    }
    let then = (
        DEV[slot].load(Ordering::Relaxed),
        INO[slot].load(Ordering::Relaxed),
    );
    !OPEN[slot].load(Ordering::Relaxed) || then != id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streams_at_load_are_the_launchers() {
        // The test binary links the runtime: the record ran before main.
        assert!(RECORDED.load(Ordering::Acquire));
        // SAFETY: an all-zero `stat` is a valid value for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as in `record_at_load`.
        if unsafe { libc::fstat(2, &mut st) } == 0 {
            assert!(!redirected_since_start(2, (st.st_dev, st.st_ino)));
            assert!(redirected_since_start(2, (st.st_dev, st.st_ino + 1)));
        }
        assert!(!redirected_since_start(7, (1, 2)), "not a standard stream");
    }
}
