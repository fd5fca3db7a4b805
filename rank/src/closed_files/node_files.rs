//! Files of the node a rank read, or wrote from the start or in place, and
//! closed before a checkpoint: an output snapshot written with
//! `fopen(path, "w")` every N steps, `np.save`, a namelist or an input
//! staged to local scratch, read at start and closed. No fd names them at
//! the checkpoint, and a restart on another node would not find them.
//!
//! The runtime notes each as it closes (`fclose`, `close`, a Fortran
//! `CLOSE`; Python's opens through `cryo_note_node_file`), when it is a
//! regular file on a filesystem that may be the node's own (in memory or on
//! a local disk, not the store's). Each checkpoint saves the contents of
//! those still there that a restart elsewhere would not find
//! ([`super::capture`], `held.rs`), and a restart makes them again where
//! they are missing (`remake.rs`): one the rank wrote gets its saved bytes
//! back, one it only read is left as it is where it is found.
//!
//! Unlike an appended log, such a file is not cut back: what it held after
//! the checkpoint cannot be told from what it held before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cryo_core::locality::{Filesystem, Locality};

use super::recent::Recent;

/// Files noted at most; past it the least recently closed is forgotten
/// (and the next checkpoint says how many were).
pub(crate) const MAX_NODE_FILES: usize = 256;

/// Paths whose files are the system's, never saved: the same on every
/// node, or not files at all.
const SYSTEM_PREFIXES: [&str; 15] = [
    "/usr/", "/lib/", "/lib32/", "/lib64/", "/libx32/", "/bin/", "/sbin/", "/etc/", "/opt/",
    "/boot/", "/proc/", "/sys/", "/dev/", "/run/", "/snap/",
];

#[derive(Debug, Default)]
struct Table {
    /// Each file, with whether it was open for writing at some close.
    files: Recent<bool>,
    /// Forgotten to make room since the last checkpoint.
    forgotten: u64,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// The device of the store's filesystem (0: unknown): its files are the
/// store's, never the application's.
static STORE_DEV: AtomicU64 = AtomicU64::new(0);

fn table() -> MutexGuard<'static, Option<Table>> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// While the process starts: the store's device, so that `close` (which
/// cannot read the environment safely) leaves the store's files alone.
/// Read here without `held::store_filesystem`'s cache, which must not
/// keep what the environment said this early.
pub(super) fn learn_store() {
    let Some(store) = std::env::var_os(cryo_core::env::ENV_STORE) else {
        return;
    };
    if let Ok(store) = Filesystem::of(std::path::Path::new(&store)) {
        STORE_DEV.store(store.dev, Ordering::Relaxed);
    }
}

/// Whether a path is the system's (see [`SYSTEM_PREFIXES`]) or relative.
pub(super) fn is_system(path: &[u8]) -> bool {
    path.first() != Some(&b'/')
        || (SYSTEM_PREFIXES.iter()).any(|prefix| path.starts_with(prefix.as_bytes()))
}

/// Whether `file` (`fd`, about to be closed) may be on a filesystem of
/// the node (in memory or on a local disk, not the store's).
/// Async-signal-safe (`fstatfs`), for the runtime's `close`.
pub(super) fn of_node(fd: libc::c_int, file: &super::ClosingFile) -> bool {
    let dev = file.stat().st_dev;
    if dev == STORE_DEV.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a valid out-parameter.
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return false;
    }
    let filesystem = Filesystem {
        // `__fsword_t`: i64 here, narrower on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        magic: i64::from(fs.f_type),
        dev,
    };
    matches!(
        filesystem.locality(),
        Locality::InMemory | Locality::NodeDisk
    )
}

/// Notes `path` as read (or, with `written`, written) and closed now. A
/// path of the system's is left out.
pub(crate) fn note(path: String, written: bool) {
    if is_system(path.as_bytes()) || !super::is_owner() {
        return;
    }
    note_in(table().get_or_insert_with(Table::default), path, written);
}

/// After the file at `old` was renamed `new` (`rename.rs`): a file noted
/// at `old` (in the table, or closed with `close` since the last
/// checkpoint) is noted at `new`; for a directory, each file noted under
/// it is noted under `new`. Never waits for the table's lock.
pub(super) fn renamed(old: &str, new: &str) {
    carry(old, new, false);
}

/// Before the file at `old` is renamed `new` by calls the runtime does not
/// see (Python's `os.replace`, through `cryo_note_renamed`): a file noted
/// at `old`, or under it, is noted at `new`, or under it, too. The rename
/// may still fail: each checkpoint forgets whichever of the names is gone.
pub(crate) fn renaming(old: &str, new: &str) {
    carry(old, new, true);
}

/// What follows `dir` in `path`: `""` for `dir` itself, `"/x"` for a path
/// under it; `None` for any other path.
fn under<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(dir)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn carry(old: &str, new: &str, keep_old: bool) {
    // `rename("out/", "done/")` names the directories `out` and `done`.
    let (old, new) = (trim_slashes(old), trim_slashes(new));
    if old.is_empty() || is_system(new.as_bytes()) || !super::is_owner() {
        return;
    }
    let Ok(mut guard) = TABLE.try_lock() else {
        return;
    };
    let table = guard.get_or_insert_with(Table::default);
    // Each noted path at `old` or under it, with its name after the rename.
    let mut moved: Vec<(String, String, bool)> = Vec::new();
    for (path, written) in table.files.iter() {
        if let Some(rest) = under(path, old) {
            moved.push((path.clone(), format!("{new}{rest}"), *written));
        }
    }
    for (path, written) in super::close::noted_node() {
        if let Some(rest) = under(&path, old) {
            let to = format!("{new}{rest}");
            moved.push((path, to, written));
        }
    }
    for (path, to, written) in moved {
        if !keep_old {
            table.files.remove(&path);
        }
        note_in(table, to, written);
    }
}

/// `path` without its trailing slashes (`/` stays `/`).
fn trim_slashes(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" if path.starts_with('/') => "/",
        trimmed => trimmed,
    }
}

fn note_in(table: &mut Table, path: String, written: bool) {
    let (was_written, forgot) = table.files.closed(path, MAX_NODE_FILES);
    *was_written |= written;
    table.forgotten += u64::from(forgot);
}

/// The files noted, each with whether the rank wrote it, in the order of
/// their paths, and how many were forgotten since the last call.
pub(super) fn noted() -> (Vec<(String, bool)>, u64) {
    let mut guard = table();
    let Some(table) = guard.as_mut() else {
        return (Vec::new(), 0);
    };
    let mut files: Vec<_> = (table.files.iter())
        .map(|(path, written)| (path.clone(), *written))
        .collect();
    files.sort();
    (files, std::mem::take(&mut table.forgotten))
}

/// Forgets the file at `path` (gone, or no longer the node's).
pub(super) fn forget(path: &str) {
    if let Some(table) = table().as_mut() {
        table.files.remove(path);
    }
}

#[cfg(test)]
pub(crate) fn forget_all() {
    *table() = None;
}
