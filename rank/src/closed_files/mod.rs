//! Files a rank wrote and closed: a log opened, appended to and closed at
//! every step is not open at a checkpoint, so no fd record names it, and
//! the steps that a restart runs again would append their lines twice.
//!
//! * [`closing`] and [`Closing::done`] bracket the close of such a file:
//!   in the runtime's `fclose` (`fclose.rs`, for streams open with
//!   `O_APPEND`) and in its `_gfortran_st_close` (`gfortran.rs`, for every
//!   unit open for writing: `position='append'` sets no flag). They keep
//!   the path and the file's size right after the close. The runtime's
//!   `close` (`close.rs`, for fds open with `O_APPEND`) keeps the same in a
//!   slot that the next checkpoint drains: `close` must stay
//!   async-signal-safe.
//! * [`capture`] runs on the checkpoint path: it measures each file closed
//!   since the last checkpoint (its size now, and a hash of the bytes just
//!   before that size and before its size at the close: appending does not
//!   change them) and encodes the table (`cryo_core::format::closed`) that
//!   the agent saves as the region `cryo:closed-files`.
//! * [`settle`] (`settle.rs`) runs at a restart: the ranks exchange their
//!   tables, each cuts the files it recorded back (a file of its own to its
//!   size at the checkpoint, a shared one to the largest size after a
//!   rank's last close), and they wait for one another before any goes on
//!   to write.
//!
//! A file held open for writing at a checkpoint is left out of that
//! checkpoint's table: its fd record already cuts it back.
//!
//! Files of the node read, or written other than by appending, and closed
//! are noted apart (`node_files.rs`): they are not cut back, only saved to
//! make them again on another node.

mod close;
mod fclose;
mod node_files;
mod recent;
mod rename;
mod settle;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cryo_core::format::closed::{
    tail_hash, tail_start, ClosedFile, ClosedFiles, Mark, MAX_CLOSED_FILES,
};
use cryo_core::locality::{unreachable_elsewhere, Filesystem};

pub(crate) use node_files::{note as note_node_file, renaming as note_node_file_renaming};
pub(crate) use settle::{load, settle, Alone, Peers};

/// What the runtime knows of one closed file.
#[derive(Debug, Clone, Copy, Default)]
struct Noted {
    /// Open with `O_APPEND` at some close.
    appended: bool,
    /// Its size right after its last close (`None` when unknown: gone at
    /// that moment).
    closed_size: Option<u64>,
    /// Its marks at the last checkpoint and after the last close before
    /// it; `None` when it was closed since (or never measured).
    marks: Option<(Mark, Mark)>,
}

type Table = recent::Recent<Noted>;

static TABLE: Mutex<Option<Table>> = Mutex::new(None);
/// The process that notes: a child made by `fork` has a copy of the table
/// (and perhaps of a lock held by another thread) and notes nothing.
static OWNER: AtomicU32 = AtomicU32::new(0);

fn table() -> MutexGuard<'static, Option<Table>> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes this process the one that notes closes (at its start).
fn claim_owner() {
    OWNER.store(std::process::id(), Ordering::Release);
}

/// Whether this process notes closes: the one that loaded the runtime (or,
/// without its start-up hook, the first that asks), never a child made by
/// `fork` or `vfork`. Async-signal-safe.
fn is_owner() -> bool {
    let pid = std::process::id();
    match OWNER.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(owner) => owner == pid,
    }
}

/// Notes `path` as closed now, with its size right after the close when
/// known.
fn note_closed(table: &mut Table, path: String, appends: bool, closed_size: Option<u64>) {
    let (noted, _) = table.closed(path, MAX_CLOSED_FILES);
    noted.appended |= appends;
    noted.closed_size = closed_size;
    noted.marks = None;
}

/// A file being closed, to note once the close is done.
#[derive(Debug)]
pub(crate) enum Closing {
    /// Written and closed, cut back at a restart (see the module).
    CutBack { path: String, appends: bool },
    /// Read or written otherwise, on a filesystem that may be the node's
    /// (`node_files.rs`).
    OfNode { path: String, written: bool },
}

/// An fd about to be closed that is a regular file that still has a name,
/// in the process that notes: its status flags and its `fstat`, read once
/// for both tables.
pub(super) struct ClosingFile {
    flags: libc::c_int,
    stat: libc::stat,
}

impl ClosingFile {
    /// `fd`'s flags and `fstat`, if it is such a file. Async-signal-safe
    /// (`fcntl`, `getpid`, `fstat`), so the runtime's `close` uses it too.
    pub(super) fn of(fd: RawFd) -> Option<ClosingFile> {
        if fd <= 2 {
            return None;
        }
        // SAFETY: F_GETFL only reads the fd's status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || !is_owner() {
            return None;
        }
        // SAFETY: a zeroed stat is a valid out-parameter.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid out-parameter.
        if unsafe { libc::fstat(fd, &mut stat) } != 0
            || stat.st_mode & libc::S_IFMT != libc::S_IFREG
            || stat.st_nlink == 0
        {
            return None;
        }
        Some(ClosingFile { flags, stat })
    }

    /// Whether it is open for writing (with `O_APPEND` when `appending` is
    /// asked), so that it is cut back: whether it appends.
    pub(super) fn cut_back(&self, appending: bool) -> Option<bool> {
        let appends = self.flags & libc::O_APPEND != 0;
        (crate::files::is_writable(self.flags) && (appends || !appending)).then_some(appends)
    }

    /// Whether it was open for writing.
    pub(super) fn written(&self) -> bool {
        crate::files::is_writable(self.flags)
    }

    /// Its `fstat`.
    pub(super) fn stat(&self) -> &libc::stat {
        &self.stat
    }
}

/// Before `fd` is closed: the file to note, if it is cut back
/// ([`ClosingFile::cut_back`]; else if it may be a file of the node:
/// [`node_files::of_node`]) and
/// it has an absolute path. Never fails: a file not noted is only a file
/// not cut back, or not saved.
pub(crate) fn closing(fd: RawFd, appending: bool) -> Option<Closing> {
    let path = || {
        let path = fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        Some(path.to_str()?.to_owned())
    };
    let file = ClosingFile::of(fd)?;
    if let Some(appends) = file.cut_back(appending) {
        let path = path()?;
        return path
            .starts_with('/')
            .then_some(Closing::CutBack { path, appends });
    }
    if !node_files::of_node(fd, &file) {
        return None;
    }
    let path = path()?;
    let written = file.written();
    (!node_files::is_system(path.as_bytes())).then_some(Closing::OfNode { path, written })
}

impl Closing {
    /// After the close (its buffer is in the file): notes the file, with
    /// its size now when it is cut back. The bytes before that size are
    /// hashed at the next park: appending after the close does not change
    /// them.
    pub(crate) fn done(self) {
        match self {
            Closing::CutBack { path, appends } => {
                let closed_size = fs::metadata(&path).map(|m| m.len()).ok();
                let mut guard = table();
                let table = guard.get_or_insert_with(Table::default);
                note_closed(table, path, appends, closed_size);
            }
            Closing::OfNode { path, written } => node_files::note(path, written),
        }
    }
}

/// Notes `path` as appended to through closes the runtime does not see
/// (`cryo_note_appended`: Python's files). It is measured at each
/// checkpoint that finds it closed; its size at a close is not known, so
/// its size at the checkpoint stands for it.
pub(crate) fn note_appended(path: String) {
    if !is_owner() {
        return;
    }
    let mut guard = table();
    let table = guard.get_or_insert_with(Table::default);
    note_closed(table, path, true, None);
}

/// After a restart: the files of the checkpoint's table are noted again,
/// so that the next checkpoints measure them (and save those of the node)
/// whether or not the restarted run closes them again.
fn remember(restored: &ClosedFiles) {
    if !is_owner() {
        return;
    }
    let mut guard = table();
    let table = guard.get_or_insert_with(Table::default);
    for file in &restored.files {
        note_closed(
            table,
            file.path.clone(),
            file.appended,
            Some(file.at_close.size),
        );
    }
}

/// The file at `path` now, and at `closed_size` when it is no longer than
/// it is now (else its mark now stands for both).
fn measure(path: &str, closed_size: Option<u64>) -> io::Result<(Mark, Mark)> {
    let file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mark_at = |size: u64| -> io::Result<Mark> {
        let start = tail_start(size);
        let mut tail = vec![0u8; usize::try_from(size - start).unwrap_or(0)];
        file.read_exact_at(&mut tail, start)?;
        Ok(Mark {
            size,
            tail: tail_hash(size, &tail),
        })
    };
    let now = mark_at(size)?;
    let at_close = match closed_size {
        Some(closed) if closed < size => mark_at(closed)?,
        _ => now,
    };
    Ok((now, at_close))
}

/// What a checkpoint keeps of the files the rank wrote and closed.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    /// The table, encoded; `None` when no file is noted.
    pub(crate) table: Option<Vec<u8>>,
    /// The files of the table that a restart on another node would not
    /// find, whose contents the checkpoint saves.
    pub(crate) node_local: Vec<NodeLocal>,
}

/// A file read or written, and closed, on a filesystem of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeLocal {
    pub(crate) path: String,
    /// Its size at the checkpoint.
    pub(crate) size: u64,
    /// Why a restart elsewhere would not find it (`cryo_core::locality`).
    pub(crate) why: String,
    /// Whether the rank wrote it (else it only read it).
    pub(crate) written: bool,
}

/// The table of this checkpoint, and the files in it on a filesystem of
/// this node (`store`: the store's filesystem). `open_for_writing` are the
/// paths the rank holds open for writing now (their fd records cut them
/// back). Files closed since the last checkpoint are measured again (the
/// others cannot have changed through this rank's closes); those gone are
/// forgotten; one that cannot be read is named in `warnings`.
pub(crate) fn capture(
    open_for_writing: &HashSet<String>,
    warnings: &mut Vec<String>,
    store: Option<Filesystem>,
) -> Captured {
    let mut guard = table();
    let (closed, dropped) = close::drain_appended();
    if dropped > 0 {
        warnings.push(format!(
            "{dropped} closes of files open for appending, made with close(2) since the last \
             checkpoint, were not noted (more files than the runtime keeps between two \
             checkpoints): lines appended to them after this checkpoint may stay after a restart"
        ));
    }
    if !closed.is_empty() {
        let table = guard.get_or_insert_with(Table::default);
        for (path, size) in closed {
            note_closed(table, path, true, Some(size));
        }
    }
    let mut captured = Captured::default();
    let Some(table) = guard.as_mut() else {
        drop(guard);
        of_node(open_for_writing, warnings, store, &mut captured.node_local);
        return captured;
    };
    let mut out = ClosedFiles::default();
    let mut gone = Vec::new();
    for (path, noted) in table.iter_mut() {
        if open_for_writing.contains(path) {
            continue;
        }
        let (at_checkpoint, at_close) = match noted.marks {
            Some(marks) => marks,
            None => match measure(path, noted.closed_size) {
                Ok(marks) => {
                    noted.marks = Some(marks);
                    marks
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    gone.push(path.clone());
                    continue;
                }
                Err(err) => {
                    warnings.push(format!(
                        "{path} was written and closed, and could not be read to record its \
                         size ({err}); what is appended to it after this checkpoint stays \
                         after a restart"
                    ));
                    continue;
                }
            },
        };
        // On another node it is not there to cut back: its contents are
        // saved, to make it again.
        if let Some(why) = store
            .and_then(|store| unreachable_elsewhere(Filesystem::of(Path::new(path)).ok()?, store))
        {
            captured.node_local.push(NodeLocal {
                path: path.clone(),
                size: at_checkpoint.size,
                why,
                written: true,
            });
        }
        out.files.push(ClosedFile {
            path: path.clone(),
            at_checkpoint,
            at_close,
            appended: noted.appended,
        });
    }
    for path in gone {
        table.remove(&path);
    }
    drop(guard);
    of_node(open_for_writing, warnings, store, &mut captured.node_local);
    captured.node_local.sort_by(|a, b| a.path.cmp(&b.path));
    if out.files.is_empty() {
        return captured;
    }
    out.files.sort_by(|a, b| a.path.cmp(&b.path));
    match out.encode() {
        Ok(bytes) => captured.table = Some(bytes),
        Err(err) => warnings.push(format!(
            "the table of files written and closed could not be encoded ({err}); a restart \
             does not cut them back"
        )),
    }
    captured
}

/// Adds to `node_local` the files of [`node_files`] that a restart on
/// another node would not find (`store`: the store's filesystem), save
/// those open for writing (their fds save them) and those `node_local`
/// has already. Those gone, or found not to be the node's, are forgotten.
fn of_node(
    open_for_writing: &HashSet<String>,
    warnings: &mut Vec<String>,
    store: Option<Filesystem>,
    node_local: &mut Vec<NodeLocal>,
) {
    let (closed, dropped) = close::drain_node();
    for (path, written) in closed {
        node_files::note(path, written);
    }
    let (noted, forgotten) = node_files::noted();
    let Some(store) = store else {
        return;
    };
    let known: HashSet<String> = node_local.iter().map(|file| file.path.clone()).collect();
    let before = node_local.len();
    for (path, written) in noted {
        if open_for_writing.contains(&path) || known.contains(&path) {
            continue;
        }
        let file = Path::new(&path);
        let why = match fs::metadata(file) {
            Ok(meta) if meta.is_file() => Filesystem::of(file)
                .ok()
                .and_then(|fs| unreachable_elsewhere(fs, store))
                .map(|why| (why, meta.len())),
            Ok(_) => None,
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                warnings.push(format!(
                    "{path}, a file of this node the rank {} and closed, could not be read to \
                     save it ({err}); a restart on another node will not find it",
                    if written { "wrote" } else { "read" }
                ));
                continue;
            }
        };
        match why {
            Some((why, size)) => node_local.push(NodeLocal {
                path,
                size,
                why,
                written,
            }),
            None => node_files::forget(&path),
        }
    }
    // Those not kept are told of only when the rank does keep files of the
    // node: they may as well be of the store's own filesystem.
    if forgotten + dropped > 0 && node_local.len() > before {
        warnings.push(format!(
            "{} files of this node read or written and closed before this checkpoint were not \
             kept in view (the runtime keeps the {} most recently closed): a restart on another \
             node may not find them",
            forgotten + dropped,
            node_files::MAX_NODE_FILES
        ));
    }
}

#[cfg(test)]
pub(crate) fn forget_all() {
    *table() = None;
    let _ = close::drain_node();
    node_files::forget_all();
}

#[cfg(test)]
mod node_files_tests;
#[cfg(test)]
mod tests;
