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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cryo_core::locality::{Filesystem, Locality};

/// Files noted at most; past it the least recently closed is forgotten
/// (and the next checkpoint says how many were).
pub(crate) const MAX_NODE_FILES: usize = 256;

/// Paths whose files are the system's, never saved: the same on every
/// node, or not files at all.
const SYSTEM_PREFIXES: [&str; 15] = [
    "/usr/", "/lib/", "/lib32/", "/lib64/", "/libx32/", "/bin/", "/sbin/", "/etc/", "/opt/",
    "/boot/", "/proc/", "/sys/", "/dev/", "/run/", "/snap/",
];

#[derive(Debug, Clone, Copy)]
struct Noted {
    /// Open for writing at some close.
    written: bool,
    /// The order of its last close, for forgetting the least recent.
    last_close: u64,
}

#[derive(Debug, Default)]
struct Table {
    files: HashMap<String, Noted>,
    closes: u64,
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

/// Whether `fd`, about to be closed, is a regular file with a name that
/// may be on a filesystem of the node (in memory or on a local disk, not
/// the store's), in the process that notes: whether it was open for
/// writing, and its `fstat`. Async-signal-safe (`fcntl`, `fstat`,
/// `fstatfs`), for the runtime's `close`.
pub(super) fn node_file(fd: libc::c_int) -> Option<(bool, libc::stat)> {
    if fd <= 2 {
        return None;
    }
    // SAFETY: F_GETFL only reads the fd's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || !super::is_owner() {
        return None;
    }
    // SAFETY: a zeroed stat is a valid out-parameter.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid out-parameter.
    if unsafe { libc::fstat(fd, &mut stat) } != 0
        || stat.st_mode & libc::S_IFMT != libc::S_IFREG
        || stat.st_nlink == 0
        || stat.st_dev == STORE_DEV.load(Ordering::Relaxed)
    {
        return None;
    }
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a valid out-parameter.
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return None;
    }
    let filesystem = Filesystem {
        // `__fsword_t`: i64 here, narrower on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        magic: i64::from(fs.f_type),
        dev: stat.st_dev,
    };
    matches!(
        filesystem.locality(),
        Locality::InMemory | Locality::NodeDisk
    )
    .then_some((crate::files::is_writable(flags), stat))
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
/// checkpoint) is noted at `new`. Never waits for the table's lock.
pub(super) fn renamed(old: &str, new: &str) {
    if is_system(new.as_bytes()) || !super::is_owner() {
        return;
    }
    let Ok(mut guard) = TABLE.try_lock() else {
        return;
    };
    let table = guard.get_or_insert_with(Table::default);
    let noted = (table.files.remove(old).map(|noted| noted.written))
        .or_else(|| super::close::noted_node(old.as_bytes()));
    if let Some(written) = noted {
        note_in(table, new.to_owned(), written);
    }
}

fn note_in(table: &mut Table, path: String, written: bool) {
    table.closes += 1;
    let closes = table.closes;
    let noted = table.files.entry(path).or_insert(Noted {
        written: false,
        last_close: 0,
    });
    noted.written |= written;
    noted.last_close = closes;
    if table.files.len() > MAX_NODE_FILES {
        let oldest = (table.files.iter())
            .min_by_key(|(_, noted)| noted.last_close)
            .map(|(path, _)| path.clone());
        if let Some(oldest) = oldest {
            table.files.remove(&oldest);
            table.forgotten += 1;
        }
    }
}

/// The files noted, each with whether the rank wrote it, in the order of
/// their paths, and how many were forgotten since the last call.
pub(super) fn noted() -> (Vec<(String, bool)>, u64) {
    let mut guard = table();
    let Some(table) = guard.as_mut() else {
        return (Vec::new(), 0);
    };
    let mut files: Vec<_> = (table.files.iter())
        .map(|(path, noted)| (path.clone(), noted.written))
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
