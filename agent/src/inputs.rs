//! The files a rank only reads whose contents its checkpoint saves (an
//! input staged to the node's scratch and held open, a table it mapped
//! read-only and closed: `rank/src/held.rs`), read by the agent from the
//! file once the rank runs again instead of copied while it is parked: they
//! cost its pause nothing.
//!
//! Nothing writes them through the rank, so the bytes read a moment after
//! the park are those it held. Each is opened while the rank is parked (it
//! may close its own fd as soon as it runs), its size and change time
//! noted. One found changed when read (another process, or another rank of
//! the node, wrote it meanwhile) is saved as read and named in the rank's
//! warnings: failing the checkpoint instead would fail every checkpoint of
//! a job where one rank writes what another reads, and the writer's own
//! copy is put back where it restarts (`rank/src/remake.rs`). One cut
//! shorter than its saved length meanwhile fails the rank's capture.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use cryo_core::format::fds::CLOSED_CONTENTS_PREFIX;
use cryo_core::format::manifest::{FdRecord, RegionKind};
use cryo_core::format::process::ProcessAttrs;
use cryo_core::protocol::RegionInfo;
use rayon::prelude::*;

use crate::capture::CaptureError;
use crate::pool::Slot;
use crate::procfs::ProcessAccess;
use crate::tracking::Piece;

/// See the module.
#[derive(Debug, Default)]
pub(crate) struct Inputs {
    /// By region index.
    files: HashMap<usize, Input>,
}

#[derive(Debug)]
struct Input {
    path: String,
    file: File,
    /// Its size and change time at the park.
    seen: (u64, (i64, i64)),
    /// Found otherwise by a read.
    changed: AtomicBool,
}

/// A file's size and change time.
fn look(meta: &std::fs::Metadata) -> (u64, (i64, i64)) {
    (meta.len(), (meta.ctime(), meta.ctime_nsec()))
}

impl Inputs {
    /// Opens, from the parked rank `pid`, the file behind each of `regions`
    /// that saves one the rank only reads (`process`: see `attrs.rs`). One
    /// that cannot be opened, or is shorter than its region, is left to the
    /// copy while the rank is parked.
    pub(crate) fn open(
        access: &dyn ProcessAccess,
        pid: u32,
        fds: &[FdRecord],
        regions: &[RegionInfo],
        process: &ProcessAttrs,
    ) -> Inputs {
        let mut files = HashMap::new();
        for (index, region) in regions.iter().enumerate() {
            let (path, link) = match &region.kind {
                RegionKind::FileContents { fd } => match fds.iter().find(|r| r.fd == *fd) {
                    Some(record) => (&record.path, format!("/proc/{pid}/fd/{fd}")),
                    None => continue,
                },
                RegionKind::NodeFileContents { path }
                    if !region.name.starts_with(CLOSED_CONTENTS_PREFIX) =>
                {
                    (path, format!("/proc/{pid}/root{path}"))
                }
                _ => continue,
            };
            if (process.saved_file(path)).is_none_or(|saved| saved.written) {
                continue;
            }
            let opened = access.open_read(Path::new(&link)).and_then(|file| {
                let meta = file.metadata()?;
                Ok((file, meta))
            });
            match opened {
                Ok((file, meta)) if meta.len() >= region.len => {
                    let path = path.clone();
                    let seen = look(&meta);
                    let changed = AtomicBool::new(false);
                    files.insert(
                        index,
                        Input {
                            path,
                            file,
                            seen,
                            changed,
                        },
                    );
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(pid, path = %path, error = %err, "input.not_opened"),
            }
        }
        Inputs { files }
    }

    /// Whether region `region` is read from its file.
    pub(crate) fn holds(&self, region: usize) -> bool {
        self.files.contains_key(&region)
    }

    /// Reads `pieces` of rank `rank`'s inputs into `slots` on `threads`.
    pub(crate) fn read(
        &self,
        threads: &rayon::ThreadPool,
        rank: u32,
        pieces: &[Piece],
        slots: &mut [Slot],
    ) -> Result<(), CaptureError> {
        threads.install(|| {
            (pieces.par_iter().zip(slots.par_iter_mut()))
                .try_for_each(|(piece, slot)| self.read_piece(rank, piece, slot.bytes()))
        })
    }

    /// Reads `piece` into the start of `dest`, and notes whether its file
    /// is still as it was at the park.
    fn read_piece(&self, rank: u32, piece: &Piece, dest: &mut [u8]) -> Result<(), CaptureError> {
        let Some(input) = self.files.get(&piece.region) else {
            return Err(CaptureError::Input {
                rank,
                path: String::new(),
                source: io::Error::other("no input opened for this region"),
            });
        };
        let failed = |source| CaptureError::Input {
            rank,
            path: input.path.clone(),
            source,
        };
        let dest = (dest.get_mut(..piece.len))
            .ok_or_else(|| failed(io::Error::other("a piece larger than its slot")))?;
        input
            .file
            .read_exact_at(dest, piece.offset)
            .map_err(|err| {
                failed(match err.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::other(
                        "it was cut shorter after the checkpoint, before its bytes were read",
                    ),
                    _ => err,
                })
            })?;
        let meta = input.file.metadata().map_err(failed)?;
        if look(&meta) != input.seen {
            input.changed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// What to name in the rank's warnings: the files found changed.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut paths: Vec<&str> = (self.files.values())
            .filter(|input| input.changed.load(Ordering::Relaxed))
            .map(|input| input.path.as_str())
            .collect();
        paths.sort_unstable();
        paths.dedup();
        (paths.into_iter())
            .map(|path| {
                format!(
                    "{path}, which the rank only reads, was written by another process right \
                     after the checkpoint, while its bytes were read: a restart that makes it \
                     again gives it the bytes read then, which may hold some of those writes"
                )
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use cryo_core::format::fds::{closed_contents_region_name, mapped_file_region_name};
    use cryo_core::format::manifest::{FdKind, FdRestore};
    use cryo_core::format::process::SavedFile;

    use super::*;
    use crate::procfs::LinuxProcess;

    fn saved(path: &str, written: bool) -> SavedFile {
        SavedFile {
            path: path.into(),
            mode: Some(0o644),
            on_node: true,
            written,
            dev: 0,
            ino: 0,
        }
    }

    #[test]
    fn the_files_a_rank_only_reads_are_read_from_the_file_and_a_change_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for name in ["input", "table", "log", "closed", "short"] {
            std::fs::write(path(name), &bytes).unwrap();
        }
        let input = File::open(path("input")).unwrap();
        let log = File::open(path("log")).unwrap();
        let fd = |file: &File, name: &str| FdRecord {
            fd: file.as_raw_fd(),
            kind: FdKind::Regular,
            path: path(name),
            flags: 0,
            offset: 0,
            size_at_checkpoint: 10_000,
            restore: FdRestore::Restore,
            shares_with: None,
        };
        let fds = [fd(&input, "input"), fd(&log, "log")];
        let region = |name: String, len: u64, kind: RegionKind| RegionInfo {
            name,
            addr: 0,
            len,
            kind,
        };
        let whole = |name: &str| RegionKind::NodeFileContents { path: path(name) };
        let (input_fd, log_fd) = (input.as_raw_fd(), log.as_raw_fd());
        let regions = [
            region("state".into(), 10_000, RegionKind::Anonymous),
            region(
                "cryo:file:a".into(),
                10_000,
                RegionKind::FileContents { fd: input_fd },
            ),
            region(mapped_file_region_name(0), 10_000, whole("table")),
            // Written: copied parked.
            region(
                "cryo:file:b".into(),
                10_000,
                RegionKind::FileContents { fd: log_fd },
            ),
            region(closed_contents_region_name(0), 10_000, whole("closed")),
            // Shorter now than the region: copied parked (and refused there).
            region(mapped_file_region_name(1), 20_000, whole("short")),
        ];
        let process = ProcessAttrs {
            saved_files: vec![
                saved(&path("input"), false),
                saved(&path("table"), false),
                saved(&path("log"), true),
                saved(&path("closed"), true),
                saved(&path("short"), false),
            ],
            ..ProcessAttrs::default()
        };
        let inputs = Inputs::open(&LinuxProcess, std::process::id(), &fds, &regions, &process);
        let held: Vec<usize> = (0..regions.len()).filter(|i| inputs.holds(*i)).collect();
        assert_eq!(held, [1, 2]);

        let piece = |region: usize, offset: u64, len: usize| Piece {
            region,
            offset,
            len,
        };
        let mut dest = vec![0u8; 4096];
        inputs
            .read_piece(7, &piece(2, 4096, 4096), &mut dest)
            .unwrap();
        assert!(dest == bytes[4096..8192]);
        inputs
            .read_piece(7, &piece(1, 8192, 1808), &mut dest)
            .unwrap();
        assert!(dest[..1808] == bytes[8192..]);
        assert!(inputs.warnings().is_empty());
        // Written by another process since the park: saved as read, and
        // named.
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(path("input"))
            .unwrap();
        writer.write_all(b"more").unwrap();
        inputs.read_piece(7, &piece(1, 0, 4096), &mut dest).unwrap();
        assert!(dest == bytes[..4096]);
        let warnings = inputs.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with(&format!(
            "{}, which the rank only reads, was written",
            path("input")
        )));
        // Cut shorter than its saved length: the capture fails, naming it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(path("table"))
            .unwrap()
            .set_len(100)
            .unwrap();
        let err = inputs
            .read_piece(7, &piece(2, 4096, 4096), &mut dest)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text == format!("rank 7: reading the saved input {}: it was cut shorter after the checkpoint, before its bytes were read", path("table")),
            "{text}"
        );
        assert_eq!(err.rank(), 7);
        assert!(inputs.read_piece(7, &piece(3, 0, 4096), &mut dest).is_err());
    }
}
