//! What the agent reads about a rank process, behind [`ProcessAccess`] so
//! that the parsing and classification logic can be tested on fixed text
//! without a live process (as youki does with its `Syscall` trait).

use std::fs;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use cryo_core::dirty::{Pagemap, WrittenRanges};
use cryo_core::format::manifest::{Backing, MappingRecord};
use cryo_core::locality::Filesystem;
use cryo_core::maps::MapsLine;
use cryo_core::protocol::RegionInfo;
use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use thiserror::Error;

use crate::children::ChildProcess;

/// The file type behind an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A FIFO.
    Fifo,
    /// A socket.
    Socket,
    /// Something else (anonymous inodes).
    Other,
}

/// `kcmp` type comparing two fds' open file descriptions.
const KCMP_FILE: libc::c_int = 0;

/// What `stat` says about an open fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Its type.
    pub file_type: FileType,
    /// Its size in bytes.
    pub size: u64,
    /// Its link count (0: unlinked while open).
    pub nlink: u64,
    /// The device it lives on.
    pub dev: u64,
    /// Its inode number.
    pub ino: u64,
    /// Its permission, set-id and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
}

/// Reading another process's memory failed.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Permission denied by the kernel.
    #[error("process_vm_readv on pid {pid} denied ({errno}): the agent must run as the rank's user or as root (ptrace access mode PTRACE_MODE_ATTACH_REALCREDS); each rank names its agent as its tracer for kernel.yama.ptrace_scope 1, while 2 and 3 let only an agent with CAP_SYS_PTRACE read it")]
    Denied {
        /// The pid.
        pid: u32,
        /// EPERM or EACCES.
        errno: Errno,
    },
    /// The process is gone.
    #[error("process {pid} exited during the capture")]
    Gone {
        /// The pid.
        pid: u32,
    },
    /// The range is not (or no longer) mapped in full.
    #[error("pid {pid}: read {got} of {want} bytes at {addr:#x}: the range is not mapped")]
    Short {
        /// The pid.
        pid: u32,
        /// The address.
        addr: u64,
        /// Bytes read.
        got: usize,
        /// Bytes wanted.
        want: usize,
    },
    /// Another error.
    #[error("process_vm_readv on pid {pid} at {addr:#x}: {errno}")]
    Other {
        /// The pid.
        pid: u32,
        /// The address.
        addr: u64,
        /// The error.
        errno: Errno,
    },
}

/// Access to a process: its procfs entries and its memory.
pub trait ProcessAccess: Send + Sync {
    /// The text of `/proc/<pid>/maps`.
    fn maps(&self, pid: u32) -> io::Result<String>;
    /// The entries of `/proc/<pid>/fd`: fd number and link text.
    fn fds(&self, pid: u32) -> io::Result<Vec<(i32, String)>>;
    /// The link text of `/proc/<pid>/cwd`, its working directory.
    fn cwd(&self, pid: u32) -> io::Result<String>;
    /// Its `umask`, from `/proc/<pid>/status` (`None`: a kernel that does
    /// not show it).
    fn umask(&self, pid: u32) -> io::Result<Option<u32>>;
    /// `stat` of the file at `path` as the process sees it (through
    /// `/proc/<pid>/root`: its mounts may not be the agent's).
    fn path_stat(&self, pid: u32, path: &str) -> io::Result<FileStat>;
    /// The text of `/proc/<pid>/fdinfo/<fd>`.
    fn fdinfo(&self, pid: u32, fd: i32) -> io::Result<String>;
    /// `stat` of the open file behind the fd.
    fn fd_stat(&self, pid: u32, fd: i32) -> io::Result<FileStat>;
    /// Whether fds `a` and `b` of the process share one open file
    /// description (`kcmp(KCMP_FILE)`).
    fn same_open_file(&self, pid: u32, a: i32, b: i32) -> io::Result<bool>;
    /// The filesystem holding `path` (`/proc/<pid>/fd/<n>` for an fd's).
    fn filesystem(&self, path: &Path) -> io::Result<Filesystem>;
    /// Opens for reading the file at `link` (`/proc/<pid>/fd/<n>`, or a
    /// path under `/proc/<pid>/root`).
    fn open_read(&self, link: &Path) -> io::Result<std::fs::File> {
        std::fs::File::open(link)
    }
    /// The live child processes of the process (`children.rs`).
    fn children(&self, pid: u32) -> io::Result<Vec<ChildProcess>> {
        crate::children::children_of(pid)
    }
    /// Copies `dest.len()` bytes at `addr` of the process into `dest`.
    fn read_memory(&self, pid: u32, addr: u64, dest: &mut [u8]) -> Result<(), MemoryError>;
    /// The pages of `addr..addr+len` written since the last scan, then
    /// protected again when `rearm` (see `cryo_core::dirty`). An error
    /// means the range is not tracked: every chunk must be copied.
    fn written_pages(
        &self,
        pid: u32,
        addr: u64,
        len: u64,
        rearm: bool,
    ) -> io::Result<WrittenRanges>;
}

/// `stat` of `path`, following links (`/proc` links to open files).
fn file_stat(path: &str) -> io::Result<FileStat> {
    let meta = fs::metadata(path)?;
    let ft = meta.file_type();
    let file_type = if ft.is_file() {
        FileType::Regular
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_fifo() {
        FileType::Fifo
    } else if ft.is_socket() {
        FileType::Socket
    } else {
        FileType::Other
    };
    Ok(FileStat {
        file_type,
        size: meta.len(),
        nlink: meta.nlink(),
        dev: meta.dev(),
        ino: meta.ino(),
        mode: meta.mode() & 0o7777,
    })
}

/// The boot id of this machine (`/proc/sys/kernel/random/boot_id`), read
/// once; empty when unreadable.
pub fn boot_id() -> &'static str {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_owned())
            .unwrap_or_default()
    })
}

/// The `Umask:` line of a `/proc/<pid>/status` text (Linux 4.7 on).
pub fn parse_umask(status: &str) -> Option<u32> {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))?;
    u32::from_str_radix(value.trim(), 8).ok()
}

/// The real thing: procfs and `process_vm_readv`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxProcess;

impl ProcessAccess for LinuxProcess {
    fn written_pages(
        &self,
        pid: u32,
        addr: u64,
        len: u64,
        rearm: bool,
    ) -> io::Result<WrittenRanges> {
        Pagemap::open(pid)?.written(addr, len, rearm)
    }

    fn maps(&self, pid: u32) -> io::Result<String> {
        fs::read_to_string(format!("/proc/{pid}/maps"))
    }

    fn fds(&self, pid: u32) -> io::Result<Vec<(i32, String)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
            let entry = entry?;
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // An fd closed between readdir and readlink is simply skipped.
            if let Ok(link) = fs::read_link(entry.path()) {
                out.push((fd, link.to_string_lossy().into_owned()));
            }
        }
        out.sort_by_key(|(fd, _)| *fd);
        Ok(out)
    }

    fn cwd(&self, pid: u32) -> io::Result<String> {
        fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.to_string_lossy().into_owned())
    }

    fn umask(&self, pid: u32) -> io::Result<Option<u32>> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(parse_umask(&status))
    }

    fn path_stat(&self, pid: u32, path: &str) -> io::Result<FileStat> {
        file_stat(&format!("/proc/{pid}/root{path}"))
    }

    fn fdinfo(&self, pid: u32, fd: i32) -> io::Result<String> {
        fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
    }

    fn fd_stat(&self, pid: u32, fd: i32) -> io::Result<FileStat> {
        file_stat(&format!("/proc/{pid}/fd/{fd}"))
    }

    fn filesystem(&self, path: &Path) -> io::Result<Filesystem> {
        Filesystem::of(path)
    }

    fn same_open_file(&self, pid: u32, a: i32, b: i32) -> io::Result<bool> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: kcmp only compares kernel objects of the given process and
        // fds; it reads and writes no memory of ours.
        let result = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                pid,
                pid,
                KCMP_FILE,
                libc::c_ulong::try_from(a).unwrap_or(libc::c_ulong::MAX),
                libc::c_ulong::try_from(b).unwrap_or(libc::c_ulong::MAX),
            )
        };
        match result {
            0 => Ok(true),
            r if r > 0 => Ok(false),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn read_memory(&self, pid: u32, addr: u64, dest: &mut [u8]) -> Result<(), MemoryError> {
        let want = dest.len();
        let raw_pid = i32::try_from(pid).map_err(|_| MemoryError::Gone { pid })?;
        let base = usize::try_from(addr).map_err(|_| MemoryError::Other {
            pid,
            addr,
            errno: Errno::EFAULT,
        })?;
        let mut done = 0usize;
        while done < want {
            let remote = [RemoteIoVec {
                base: base + done,
                len: want - done,
            }];
            let mut local = [IoSliceMut::new(&mut dest[done..])];
            match process_vm_readv(Pid::from_raw(raw_pid), &mut local, &remote) {
                Ok(0) => {
                    return Err(MemoryError::Short {
                        pid,
                        addr,
                        got: done,
                        want,
                    })
                }
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(errno @ (Errno::EPERM | Errno::EACCES)) => {
                    return Err(MemoryError::Denied { pid, errno })
                }
                Err(Errno::ESRCH) => return Err(MemoryError::Gone { pid }),
                Err(Errno::EFAULT) => {
                    return Err(MemoryError::Short {
                        pid,
                        addr,
                        got: done,
                        want,
                    })
                }
                Err(errno) => return Err(MemoryError::Other { pid, addr, errno }),
            }
        }
        Ok(())
    }
}

/// A line of `/proc/<pid>/maps` does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad /proc/<pid>/maps line {line:?}")]
pub struct MapsParseError {
    /// The line.
    pub line: String,
}

/// Parses `/proc/<pid>/maps`. Regions are attached to mappings they
/// overlap.
pub fn parse_maps(
    text: &str,
    regions: &[RegionInfo],
) -> Result<Vec<MappingRecord>, MapsParseError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let map = MapsLine::parse(line).ok_or_else(|| MapsParseError {
            line: line.to_owned(),
        })?;
        let (start, end) = (map.start, map.end);
        let backing = match map.file() {
            Some(path) => Backing::File {
                path: path.to_owned(),
                offset: map.offset,
            },
            None => Backing::Anonymous,
        };
        let region = regions
            .iter()
            .find(|r| r.addr < end && r.addr.saturating_add(r.len) > start)
            .map(|r| r.name.clone());
        out.push(MappingRecord {
            start,
            end,
            prot: map.prot(),
            shared: map.shared(),
            backing,
            region,
        });
    }
    Ok(out)
}

/// Offset and flags from `/proc/<pid>/fdinfo/<fd>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FdInfo {
    /// `pos:` (decimal).
    pub pos: u64,
    /// `flags:` (octal).
    pub flags: i32,
    /// `lock:` lines: file locks held through this open file.
    pub locks: u32,
}

/// `fdinfo` text does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad fdinfo: {0}")]
pub struct FdInfoParseError(pub String);

/// Parses `pos:` and `flags:` from fdinfo text.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo, FdInfoParseError> {
    let mut pos = None;
    let mut flags = None;
    let mut locks = 0;
    for line in text.lines() {
        if line.starts_with("lock:") {
            locks += 1;
            continue;
        }
        if let Some(value) = line.strip_prefix("pos:") {
            pos = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| FdInfoParseError(format!("pos {value:?}")))?,
            );
        } else if let Some(value) = line.strip_prefix("flags:") {
            let raw = u32::from_str_radix(value.trim(), 8)
                .map_err(|_| FdInfoParseError(format!("flags {value:?}")))?;
            flags = Some(i32::from_ne_bytes(raw.to_ne_bytes()));
        }
    }
    Ok(FdInfo {
        pos: pos.ok_or_else(|| FdInfoParseError("no pos: line".into()))?,
        flags: flags.ok_or_else(|| FdInfoParseError("no flags: line".into()))?,
        locks,
    })
}

/// The agent's own peak resident set size (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:").map_or(0, |kib| kib * 1024)
}

/// A process's resident anonymous memory (`RssAnon`), in bytes: about what
/// a first capture of it copies. `None` if it cannot be read.
pub fn resident_anon_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kib_line(&text, "RssAnon:").map(|kib| kib * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_line(&text, key)
}

fn parse_kib_line(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use cryo_core::format::manifest::RegionKind;

    use super::*;

    const MAPS: &str = "\
55d1c8a00000-55d1c8a02000 r--p 00000000 fd:01 1234                       /usr/bin/counter
5a0000000000-5a0000100000 rw-p 00000000 00:00 0 
5a0000101000-5a0000102000 rw-s 00000000 fd:01 99                         /tmp/in put.dat
7f0000000000-7f0000001000 rw-s 00000000 00:01 2048                       /memfd:cryo-control (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    fn regions() -> Vec<RegionInfo> {
        vec![
            RegionInfo {
                name: "state".into(),
                addr: 0x5a00_0000_0000,
                len: 0x100000,
                kind: RegionKind::Anonymous,
            },
            RegionInfo {
                name: "input".into(),
                addr: 0x5a00_0010_1000,
                len: 100,
                kind: RegionKind::FileShared {
                    path: "/tmp/in put.dat".into(),
                    offset: 0,
                },
            },
        ]
    }

    #[test]
    fn maps_parse_with_regions_and_spaces_in_paths() {
        let maps = parse_maps(MAPS, &regions()).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].prot, 1);
        assert!(
            matches!(&maps[0].backing, Backing::File { path, .. } if path == "/usr/bin/counter")
        );
        assert_eq!(maps[1].region.as_deref(), Some("state"));
        assert_eq!(maps[1].prot, 3);
        assert!(!maps[1].shared);
        assert!(maps[2].shared);
        assert!(
            matches!(&maps[2].backing, Backing::File { path, .. } if path == "/tmp/in put.dat")
        );
        assert_eq!(maps[2].region.as_deref(), Some("input"));
        assert_eq!(maps[4].backing, Backing::Anonymous);
        assert_eq!(maps[4].region, None);
    }

    #[test]
    fn bad_maps_lines_are_errors() {
        assert!(parse_maps("zzzz-1000 rw-p 0 0:0 0\n", &[]).is_err());
        assert!(parse_maps("2000-1000 rw-p 0 0:0 0\n", &[]).is_err());
        assert!(parse_maps("1000-2000 rw-p\n", &[]).is_err());
    }

    #[test]
    fn fdinfo_parses_octal_flags() {
        let info = parse_fdinfo("pos:\t1234\nflags:\t02102001\nmnt_id:\t25\nino:\t77\n").unwrap();
        assert_eq!(info.pos, 1234);
        assert_eq!(info.flags, 0o2102001);
        assert_eq!(info.flags & libc::O_ACCMODE, libc::O_WRONLY);
        assert!(info.flags & libc::O_APPEND != 0);
        assert_eq!(info.locks, 0);
        let locked = parse_fdinfo(
            "pos:\t0\nflags:\t02\nlock:\t1: POSIX  ADVISORY  WRITE 77 fd:01:9 0 EOF\n",
        )
        .unwrap();
        assert_eq!(locked.locks, 1);
        assert!(parse_fdinfo("pos: 1\n").is_err());
        assert!(parse_fdinfo("pos: x\nflags: 0\n").is_err());
        assert!(parse_fdinfo("pos: 1\nflags: 9\n").is_err());
    }

    #[test]
    fn a_process_umask_and_a_file_mode_are_read_as_it_sees_them() {
        let pid = std::process::id();
        assert!(LinuxProcess.umask(pid).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.dat");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let stat = LinuxProcess.path_stat(pid, path.to_str().unwrap()).unwrap();
        assert_eq!((stat.mode, stat.size), (0o640, 1));
        assert_eq!(boot_id().len(), 36, "{:?}", boot_id());
        let file = fs::File::open(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert_eq!(LinuxProcess.fd_stat(pid, fd).unwrap().mode, 0o640);
    }

    #[test]
    fn kib_lines() {
        assert_eq!(
            parse_kib_line("VmPeak:\t 100 kB\nVmHWM:\t  2048 kB\n", "VmHWM:"),
            Some(2048)
        );
        assert!(peak_rss_bytes() > 0);
    }
}
