//! A regular file held open whose contents the checkpoint did not save (an
//! input only read, an `O_APPEND` log) is checked, before a restart opens
//! it again by path, against the last bytes it held then
//! ([`cryo_core::format::process::FileTail`]): another file put at its path since (a log rotated away
//! and begun again, an input staged again with other contents) would be cut
//! back and appended to, or read, as if it were the rank's.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::RestoreError;
use crate::files::FilePolicy;
use cryo_core::format::manifest::{FdRecord, RankRecord};

/// Checks the file at `fd`'s path against the tail recorded of it, if any.
/// A file that does not match fails the restart, unless `policy` keeps the
/// files there as they are (then it is a warning). One shorter than the
/// size the tail ends at, or unreadable here, is left to the other checks
/// (a file shorter than the saved offset is refused by them).
pub(crate) fn check(
    record: &RankRecord,
    fd: &FdRecord,
    policy: FilePolicy,
) -> Result<(), RestoreError> {
    let Some(tail) = record.process.tail_of(fd.fd) else {
        return Ok(());
    };
    let end = fd.size_at_checkpoint;
    let start = end.saturating_sub(u64::from(tail.len));
    let mut bytes = vec![0u8; tail.len as usize];
    let read = File::open(&fd.path).and_then(|file| file.read_exact_at(&mut bytes, start));
    match read {
        Ok(()) if tail.matches(&bytes) => Ok(()),
        Ok(()) => {
            let replaced = RestoreError::FileReplaced {
                rank: record.rank,
                fd: fd.fd,
                path: fd.path.clone(),
                len: tail.len,
                end,
            };
            if policy == FilePolicy::Keep {
                tracing::warn!(rank = record.rank, fd = fd.fd, path = %fd.path, problem = %replaced, "fd.file_replaced_kept");
                return Ok(());
            }
            Err(replaced)
        }
        Err(err) => {
            if err.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(rank = record.rank, fd = fd.fd, path = %fd.path, error = %err, "fd.tail_unread");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cryo_core::format::manifest::{FdKind, FdRestore};
    use cryo_core::format::process::FileTail;

    fn record(path: &str, size: u64, tail: &[u8]) -> (RankRecord, FdRecord) {
        let fd = FdRecord {
            fd: 7,
            kind: FdKind::Regular,
            path: path.into(),
            flags: libc::O_WRONLY | libc::O_APPEND,
            offset: size,
            size_at_checkpoint: size,
            restore: FdRestore::Restore,
            shares_with: None,
        };
        let mut record = RankRecord::new(2, "n", 1);
        record.fds.push(fd.clone());
        record.process.tails.push(FileTail::of(7, tail));
        (record, fd)
    }

    #[test]
    fn a_log_grown_since_passes_and_one_begun_again_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.log");
        let p = path.to_str().unwrap();
        std::fs::write(&path, b"step 1\nstep 2\nstep 3\n").unwrap();
        let (record, fd) = record(p, 14, b"step 1\nstep 2\n");
        check(&record, &fd, FilePolicy::Truncate).unwrap();
        // Rotated away, and a new log begun at its path.
        std::fs::write(&path, b"new log line 1\nnew log line 2\n").unwrap();
        let err = check(&record, &fd, FilePolicy::Truncate).unwrap_err();
        assert!(
            matches!(
                &err,
                RestoreError::FileReplaced {
                    rank: 2,
                    fd: 7,
                    len: 14,
                    end: 14,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("CRYO_FILE_POLICY=keep"), "{err}");
        // Kept as it is when asked to.
        check(&record, &fd, FilePolicy::Keep).unwrap();
        // Shorter than the tail's end: left to the offset check.
        std::fs::write(&path, b"x").unwrap();
        check(&record, &fd, FilePolicy::Truncate).unwrap();
    }
}
