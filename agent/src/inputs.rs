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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cryo_core::format::fds::{saved_file, SavedBy, CLOSED_CONTENTS_PREFIX};
use cryo_core::format::manifest::{ChunkRef, FdRecord};
use cryo_core::format::process::ProcessAttrs;
use cryo_core::protocol::RegionInfo;
use rayon::prelude::*;

use crate::capture::CaptureError;
use crate::pool::Slot;
use crate::procfs::ProcessAccess;
use crate::tracking::{cut_alike, Baseline, Piece};

/// How long before the park a file's last change must be for its stamp to
/// be trusted at the next capture: far more than a tick of the coarse
/// clock the kernel stamps changes with.
pub(crate) const SETTLED: Duration = Duration::from_secs(1);

/// What tells a file is as it was: which file it is, its size and its
/// modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether its last change was at least [`SETTLED`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let (Ok(secs), Ok(nanos)) = (u64::try_from(self.ctime.0), u32::try_from(self.ctime.1))
        else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(secs, nanos);
        now.duration_since(changed)
            .is_ok_and(|since| since >= SETTLED)
    }
}

/// The stamps of the inputs a capture read, by region name. Not by address:
/// the rank maps a file it saves at a new one for each checkpoint.
pub(crate) type InputStamps = HashMap<String, FileStamp>;

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
    /// As it was at the park.
    seen: FileStamp,
    /// Whether `seen` may be trusted at the next capture (see [`SETTLED`]).
    settled: bool,
    /// Found otherwise by a read.
    changed: AtomicBool,
}

impl Inputs {
    /// Opens, from the parked rank `pid`, the file behind each of `regions`
    /// that saves one the rank only reads (`process`: see `attrs.rs`). One
    /// that cannot be opened, or is shorter than its region, is left to the
    /// copy while the rank is parked. `now` is the time of the park.
    pub(crate) fn open(
        access: &dyn ProcessAccess,
        pid: u32,
        fds: &[FdRecord],
        regions: &[RegionInfo],
        process: &ProcessAttrs,
        now: SystemTime,
    ) -> Inputs {
        let mut files = HashMap::new();
        for (index, region) in regions.iter().enumerate() {
            // A file written and closed is saved whole while the rank is
            // parked: it wrote it.
            let (path, link) = match saved_file(fds, &region.kind) {
                Some((path, SavedBy::Fd(fd))) => (path, format!("/proc/{pid}/fd/{fd}")),
                Some((path, SavedBy::Path)) if !region.name.starts_with(CLOSED_CONTENTS_PREFIX) => {
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
                    let seen = FileStamp::of(&meta);
                    files.insert(
                        index,
                        Input {
                            path: path.to_owned(),
                            file,
                            seen,
                            settled: seen.settled(now),
                            changed: AtomicBool::new(false),
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

    /// Splits `pieces` (of the inputs) into those to read and, for each
    /// input as it was when the capture of `baseline` read it, that
    /// capture's chunks of it.
    pub(crate) fn keep_unchanged(
        &self,
        pieces: Vec<Piece>,
        regions: &[RegionInfo],
        baseline: Option<&Baseline>,
    ) -> (Vec<Piece>, Vec<(usize, ChunkRef)>) {
        let Some(baseline) = baseline else {
            return (pieces, Vec::new());
        };
        let mut by_region: HashMap<usize, Vec<Piece>> = HashMap::new();
        for piece in pieces {
            by_region.entry(piece.region).or_default().push(piece);
        }
        let (mut read, mut kept) = (Vec::new(), Vec::new());
        for (index, mine) in by_region {
            let region = &regions[index];
            let unchanged = (self.files.get(&index))
                .is_some_and(|input| baseline.inputs.get(&region.name) == Some(&input.seen));
            // The same file saved the same way, cut alike.
            let base = (baseline.regions.iter()).find(|b| {
                b.name == region.name
                    && b.kind == region.kind
                    && b.len == region.len
                    && cut_alike(&b.chunks, &mine)
            });
            match base.filter(|_| unchanged) {
                Some(base) => kept.extend(base.chunks.iter().map(|chunk| (index, *chunk))),
                None => read.extend(mine),
            }
        }
        (read, kept)
    }

    /// The stamps to trust at the next capture: those of the inputs not
    /// found changed whose last change had settled at the park.
    pub(crate) fn stamps(&self, regions: &[RegionInfo]) -> InputStamps {
        (self.files.iter())
            .filter(|(_, input)| input.settled && !input.changed.load(Ordering::Relaxed))
            .filter_map(|(index, input)| {
                let region = regions.get(*index)?;
                Some((region.name.clone(), input.seen))
            })
            .collect()
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
        if FileStamp::of(&meta) != input.seen {
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

    use cryo_core::format::chunk::ChunkHash;
    use cryo_core::format::fds::{closed_contents_region_name, mapped_file_region_name};
    use cryo_core::format::manifest::{FdKind, FdRestore, RegionKind, RegionRecord};
    use cryo_core::format::pack::ChunkPlace;
    use cryo_core::format::process::SavedFile;

    use super::*;
    use crate::procfs::LinuxProcess;
    use crate::tracking::plan;

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
        let now = SystemTime::now();
        let inputs = Inputs::open(
            &LinuxProcess,
            std::process::id(),
            &fds,
            &regions,
            &process,
            now,
        );
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

    #[test]
    fn an_input_as_the_previous_capture_read_it_keeps_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input").to_str().unwrap().to_owned();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let input = File::open(&path).unwrap();
        let fds = [FdRecord {
            fd: input.as_raw_fd(),
            kind: FdKind::Regular,
            path: path.clone(),
            flags: 0,
            offset: 0,
            size_at_checkpoint: 10_000,
            restore: FdRestore::Restore,
            shares_with: None,
        }];
        let regions = [
            RegionInfo {
                name: "state".into(),
                addr: 0x1000,
                len: 4096,
                kind: RegionKind::Anonymous,
            },
            RegionInfo {
                name: "cryo:file:a".into(),
                addr: 0,
                len: 10_000,
                kind: RegionKind::FileContents {
                    fd: input.as_raw_fd(),
                },
            },
        ];
        let process = ProcessAttrs {
            saved_files: vec![saved(&path, false)],
            ..ProcessAttrs::default()
        };
        let open = |at: SystemTime| {
            let pid = std::process::id();
            Inputs::open(&LinuxProcess, pid, &fds, &regions, &process, at)
        };
        let pieces: Vec<Piece> = (plan(&regions, 4096).into_iter())
            .filter(|p| p.region == 1)
            .collect();
        // What the previous capture stored of it.
        let chunks: Vec<ChunkRef> = (pieces.iter())
            .map(|p| {
                let start = usize::try_from(p.offset).unwrap();
                ChunkRef {
                    offset: p.offset,
                    len: u32::try_from(p.len).unwrap(),
                    stored_len: 0,
                    hash: ChunkHash::of(&bytes[start..start + p.len]),
                    place: ChunkPlace::Loose,
                }
            })
            .collect();
        let baseline = |inputs: InputStamps| Baseline {
            regions: vec![RegionRecord {
                name: "cryo:file:a".into(),
                // The rank maps the file it saves anew at each checkpoint.
                addr: 0x7f00_0000,
                len: 10_000,
                kind: regions[1].kind.clone(),
                chunks: chunks.clone(),
            }],
            inputs,
        };
        // Changed a moment ago: read, and no stamp kept for the next.
        let fresh = open(SystemTime::now());
        let (read, kept) = fresh.keep_unchanged(pieces.clone(), &regions, None);
        assert_eq!((read.len(), kept.len()), (3, 0));
        assert!(fresh.stamps(&regions).is_empty());
        // Settled since: read the first time, its stamp kept; as it was at
        // the next capture, that capture's chunks are taken.
        let later = SystemTime::now() + SETTLED + Duration::from_secs(1);
        let first = open(later);
        let stamps = first.stamps(&regions);
        assert_eq!(stamps.len(), 1);
        let (read, kept) = first.keep_unchanged(pieces.clone(), &regions, None);
        assert_eq!((read.len(), kept.len()), (3, 0));
        let previous = baseline(stamps.clone());
        let next = open(later);
        let (read, kept) = next.keep_unchanged(pieces.clone(), &regions, Some(&previous));
        assert!(read.is_empty());
        let expected: Vec<(usize, ChunkRef)> = chunks.iter().map(|c| (1, *c)).collect();
        let mut kept = kept;
        kept.sort_by_key(|(_, c)| c.offset);
        assert_eq!(kept, expected);
        assert_eq!(next.stamps(&regions), stamps);
        // A baseline cut otherwise, or without the stamp: read again.
        let (read, _) = next.keep_unchanged(
            pieces.clone(),
            &regions,
            Some(&baseline(InputStamps::new())),
        );
        assert_eq!(read.len(), 3);
        // Written since (same length, other bytes, a tick of the kernel's
        // clock later): read again; written while read: read, and no stamp
        // kept.
        std::thread::sleep(Duration::from_millis(50));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"other", 100)
            .unwrap();
        let written = open(later + Duration::from_secs(1));
        let (read, kept) = written.keep_unchanged(pieces.clone(), &regions, Some(&previous));
        assert_eq!((read.len(), kept.len()), (3, 0));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let mut dest = vec![0u8; 4096];
        written.read_piece(7, &pieces[0], &mut dest).unwrap();
        assert!(written.stamps(&regions).is_empty());
    }
}
