//! Which MPI a job's program is built with, so that `cryo run` starts it
//! with that MPI's launcher. A program linked with Open MPI that MPICH's
//! Hydra starts (or the other way round) does not fail: each rank comes up
//! as the only rank of a world of its own. On a machine with both MPIs, as
//! Debian installs them (`mpiexec` is MPICH's, `python3-mpi4py` is built
//! with Open MPI), that is the default's trap.
//!
//! The program's shared libraries say it: `ldd` of the program, or, for a
//! Python program (`python3 app.py`, or a script whose `#!` line names a
//! Python), `ldd` of the `mpi4py.MPI` extension that interpreter would
//! import. What cannot be told (a shell script, a static binary) leaves the
//! choice to the launcher's default order.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The family of an MPI library, which decides the launcher it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpiFamily {
    /// MPICH and its derivatives (Intel MPI, MVAPICH): Hydra's `mpiexec`.
    Mpich,
    /// Open MPI: its `mpirun`.
    OpenMpi,
}

impl fmt::Display for MpiFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MpiFamily::Mpich => "MPICH",
            MpiFamily::OpenMpi => "Open MPI",
        })
    }
}

/// What a program's libraries say about its MPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramMpi {
    /// The family.
    pub family: MpiFamily,
    /// The library that told it (`libmpi.so.40`).
    pub library: String,
    /// The file that links it: the program, or mpi4py's extension.
    pub linked_by: PathBuf,
}

impl fmt::Display for ProgramMpi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} links {})",
            self.family,
            self.linked_by.display(),
            self.library
        )
    }
}

/// The MPI of the program `program` (as the job names it, run in `cwd`),
/// if its libraries tell.
pub fn of_program(program: &OsStr, cwd: &Path) -> Option<ProgramMpi> {
    let path = crate::program::locate(program, cwd)?;
    let mut head = [0u8; 256];
    let read = std::fs::File::open(&path).ok()?.read(&mut head).ok()?;
    let head = &head[..read];
    // Named python (a binary, or a wrapper such as pyenv's shims).
    let linked_by = if is_python(&path) {
        mpi4py_extension(&path)?
    } else if head.starts_with(b"\x7fELF") {
        path
    } else {
        let interpreter = shebang_interpreter(head)?;
        let interpreter = crate::program::locate(OsStr::new(&interpreter), cwd)?;
        if !is_python(&interpreter) {
            return None;
        }
        mpi4py_extension(&interpreter)?
    };
    let libraries = ldd(&linked_by)?;
    let (family, library) = family_of_libraries(&libraries)?;
    Some(ProgramMpi {
        family,
        library,
        linked_by,
    })
}

/// The family an `ldd` listing names, and the library that names it.
pub fn family_of_libraries(ldd_output: &str) -> Option<(MpiFamily, String)> {
    ldd_output.lines().find_map(|line| {
        let soname = line.split_whitespace().next()?;
        let base = soname.rsplit('/').next()?;
        let family = if base.starts_with("libopen-pal.") || base.starts_with("libmpi.so.40") {
            MpiFamily::OpenMpi
        } else if base.starts_with("libmpich.") || base.starts_with("libmpi.so.12") {
            MpiFamily::Mpich
        } else {
            return None;
        };
        Some((family, base.to_owned()))
    })
}

/// The interpreter a `#!` line names, looking through `/usr/bin/env` (and
/// its `-S`): `#!/usr/bin/env python3` is `python3`.
pub fn shebang_interpreter(head: &[u8]) -> Option<String> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    let first = words.next()?;
    if Path::new(first).file_name() != Some(OsStr::new("env")) {
        return Some(first.to_owned());
    }
    words
        .find(|word| !word.starts_with('-') && !word.contains('='))
        .map(str::to_owned)
}

/// Whether `path` is a Python interpreter (`python3`, `python3.11`,
/// `python`), by its name.
pub(crate) fn is_python(path: &Path) -> bool {
    path.file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|name| name.starts_with("python"))
}

/// The `mpi4py.MPI` extension `python` would import (located, not
/// imported: importing it would start MPI).
fn mpi4py_extension(python: &Path) -> Option<PathBuf> {
    let output = Command::new(python)
        .args([
            "-c",
            "import importlib.util as u\n\
             s = u.find_spec('mpi4py.MPI')\n\
             print(s.origin if s and s.origin else '')",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let origin = String::from_utf8(output.stdout).ok()?;
    let origin = origin.trim();
    (output.status.success() && !origin.is_empty()).then(|| PathBuf::from(origin))
}

/// `ldd FILE`'s listing of the libraries `file` loads, directly or not.
fn ldd(file: &Path) -> Option<String> {
    let output = Command::new("ldd")
        .arg(file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OPEN_MPI_LDD: &str = "\tlinux-vdso.so.1 (0x00007ffc)\n\
        \tlibcryo_rank_openmpi.so => /work/target/release/libcryo_rank_openmpi.so (0x7f00)\n\
        \tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x7f01)\n\
        \tlibopen-pal.so.40 => /lib/x86_64-linux-gnu/libopen-pal.so.40 (0x7f02)\n\
        \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f03)\n";
    const MPICH_LDD: &str = "\tlinux-vdso.so.1 (0x00007ffc)\n\
        \tlibmpich.so.12 => /lib/x86_64-linux-gnu/libmpich.so.12 (0x7f01)\n\
        \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f03)\n";

    #[test]
    fn libraries_tell_the_family() {
        assert_eq!(
            family_of_libraries(OPEN_MPI_LDD),
            Some((MpiFamily::OpenMpi, "libmpi.so.40".to_owned()))
        );
        assert_eq!(
            family_of_libraries(MPICH_LDD),
            Some((MpiFamily::Mpich, "libmpich.so.12".to_owned()))
        );
        // Upstream MPICH and Intel MPI name their library libmpi.so.12.
        assert_eq!(
            family_of_libraries("\tlibmpi.so.12 => /opt/intel/lib/libmpi.so.12 (0x1)\n"),
            Some((MpiFamily::Mpich, "libmpi.so.12".to_owned()))
        );
        // A Fortran program: the library the bindings load tells.
        assert_eq!(
            family_of_libraries("\tlibmpi_mpifh.so.40 => x\n\tlibmpi.so.40 => y\n"),
            Some((MpiFamily::OpenMpi, "libmpi.so.40".to_owned()))
        );
        assert_eq!(family_of_libraries("\tlibmpichfoo.so => x\n"), None);
        assert_eq!(family_of_libraries("\tlibc.so.6 => y\n"), None);
        assert_eq!(family_of_libraries("\tnot a dynamic executable\n"), None);
        assert_eq!(family_of_libraries(""), None);
    }

    #[test]
    fn shebang_lines_name_their_interpreter() {
        for (line, interpreter) in [
            (&b"#!/usr/bin/env python3\nimport x\n"[..], "python3"),
            (b"#!/usr/bin/python3 -u\n", "/usr/bin/python3"),
            (
                b"#!/usr/bin/env -S PYTHONHASHSEED=0 python3 -u\n",
                "python3",
            ),
            (b"#!/bin/sh\n", "/bin/sh"),
        ] {
            assert_eq!(shebang_interpreter(line).as_deref(), Some(interpreter));
        }
        assert_eq!(shebang_interpreter(b"\x7fELF\x02\x01"), None);
        // A line cut off by the read is not trusted.
        assert_eq!(shebang_interpreter(b"#!/usr/bin/env pyth"), None);
        assert_eq!(shebang_interpreter(b"#!\n"), None);
    }

    #[test]
    fn python_is_known_by_its_name() {
        assert!(is_python(Path::new("/usr/bin/python3")));
        assert!(is_python(Path::new("/venv/bin/python3.11")));
        assert!(!is_python(Path::new("/usr/bin/bash")));
    }

    #[test]
    fn a_program_that_does_not_exist_or_is_no_binary_tells_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(of_program(OsStr::new("./absent"), dir.path()), None);
        assert_eq!(
            of_program(OsStr::new("cryo-no-such-program-anywhere"), dir.path()),
            None
        );
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\nexec ./app\n").unwrap();
        assert_eq!(of_program(OsStr::new("./run.sh"), dir.path()), None);
        std::fs::write(dir.path().join("empty"), "").unwrap();
        assert_eq!(of_program(OsStr::new("./empty"), dir.path()), None);
    }
}
