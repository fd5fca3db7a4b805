//! The cryo binaries find each other. A command that hands over to another
//! cryo binary (`cryo bench` and `cryo-agent bench` to `cryo-bench`) looks
//! next to its own executable first, where an install or cargo's target
//! directory puts them, then on `PATH`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;

/// Handing over to another cryo binary failed.
#[derive(Debug, Error)]
pub enum ExecError {
    /// The binary is neither next to this executable nor on `PATH`.
    #[error("{name} not found next to this executable (in {}) or on PATH", beside.display())]
    NotFound {
        /// The binary.
        name: String,
        /// Where this executable is.
        beside: PathBuf,
    },
    /// `execve` failed.
    #[error("running {}: {source}", path.display())]
    Exec {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// `name` next to the running executable, if it is there.
pub fn sibling(name: &str) -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name(name);
    path.exists().then_some(path)
}

/// Replaces this process with `name` (next to this executable, else from
/// `PATH`) run with `args`, so its output and exit status are the caller's.
/// Returns only if that failed.
pub fn exec_sibling<I, S>(name: &str, args: I) -> ExecError
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let beside = sibling(name);
    let from_path = beside.is_none();
    let path = beside.unwrap_or_else(|| PathBuf::from(name));
    let source = Command::new(&path).args(args).exec();
    if from_path && source.kind() == io::ErrorKind::NotFound {
        return ExecError::NotFound {
            name: name.to_owned(),
            beside: std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(ToOwned::to_owned))
                .unwrap_or_default(),
        };
    }
    ExecError::Exec { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_is_named() {
        let err = exec_sibling("cryo-no-such-binary", ["--help"]);
        assert!(
            matches!(&err, ExecError::NotFound { name, .. } if name == "cryo-no-such-binary"),
            "{err:?}"
        );
        assert!(err.to_string().contains("cryo-no-such-binary not found"));
    }
}
