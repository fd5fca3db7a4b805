//! The program a job runs, found before anything starts. A mistyped name
//! would otherwise start the agents and the launcher, which fails on every
//! rank in its own words ("execvp error"), after which cryo could only add
//! that no rank registered.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

/// Why a job's program cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// A path (it holds a `/`) that names no file.
    #[error("the program {} does not exist", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A path that names something other than a file (a directory).
    #[error("the program {} is not a file", path.display())]
    NotAFile {
        /// What it names.
        path: PathBuf,
    },
    /// A bare name that no directory of `PATH` holds.
    #[error("the program {program} is not found on PATH")]
    NotOnPath {
        /// As typed.
        program: String,
    },
    /// A file this user may not execute.
    #[error("the program {} is not executable (chmod +x it, or name its interpreter: cryo run -- python3 app.py)", path.display())]
    NotExecutable {
        /// The file.
        path: PathBuf,
    },
}

/// `program` as a file: as given if it holds a `/` (relative to `cwd`),
/// else the first match on `PATH`, as a shell finds it.
pub fn locate(program: &OsStr, cwd: &Path) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        // Without `.` components: `./app` reads as `/run/dir/app`.
        let path: PathBuf = cwd.join(program).components().collect();
        return path.is_file().then_some(path);
    }
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search)
        .map(|dir| cwd.join(dir).join(program))
        .find(|path| path.is_file())
}

/// The file `program` starts, or why it cannot be started from `cwd`.
pub fn check(program: &OsStr, cwd: &Path) -> Result<PathBuf, ProgramError> {
    let Some(path) = locate(program, cwd) else {
        return Err(if program.as_bytes().contains(&b'/') {
            let path: PathBuf = cwd.join(program).components().collect();
            if path.exists() {
                ProgramError::NotAFile { path }
            } else {
                ProgramError::Missing { path }
            }
        } else {
            ProgramError::NotOnPath {
                program: program.to_string_lossy().into_owned(),
            }
        });
    };
    if access(&path, AccessFlags::X_OK).is_err() {
        return Err(ProgramError::NotExecutable { path });
    }
    Ok(path)
}

/// Refuses a job whose program cannot start from its working directory.
/// With real hosts (`--hosts`), whose own files decide, it only warns.
pub fn check_before_launch(
    command: &crate::registry::JobCommand,
    hosts_elsewhere: bool,
) -> Result<(), ProgramError> {
    let program = OsStr::from_bytes(&command.program);
    let cwd = Path::new(OsStr::from_bytes(&command.cwd));
    match check(program, cwd) {
        Ok(_) => Ok(()),
        Err(err) if hosts_elsewhere => {
            cryo_core::say!("cryo: warning: {err} on this machine; the hosts must have it");
            Ok(())
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_is_not_taken_for_a_missing_program() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("adir")).unwrap();
        let err = check(OsStr::new("./adir"), dir.path()).unwrap_err();
        assert!(matches!(err, ProgramError::NotAFile { .. }), "{err}");
        assert!(err.to_string().ends_with("adir is not a file"), "{err}");
        // A store path that is a file is named as such too.
        let file = dir.path().join("afile");
        std::fs::write(&file, b"x").unwrap();
        let store = cryo_core::Store::create(&file).unwrap_err();
        assert!(
            store.to_string().ends_with("afile is not a directory"),
            "{store}"
        );
    }

    #[test]
    fn a_missing_or_unexecutable_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = check(OsStr::new("./apP"), dir.path()).unwrap_err();
        assert!(matches!(missing, ProgramError::Missing { .. }), "{missing}");
        assert!(missing.to_string().contains("apP"), "{missing}");
        let bare = check(OsStr::new("cryo-no-such-program-anywhere"), dir.path()).unwrap_err();
        assert!(matches!(bare, ProgramError::NotOnPath { .. }), "{bare}");
        let script = dir.path().join("app.py");
        std::fs::write(&script, "print(1)\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let plain = check(OsStr::new("./app.py"), dir.path()).unwrap_err();
        assert!(
            matches!(plain, ProgramError::NotExecutable { .. }),
            "{plain}"
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check(OsStr::new("./app.py"), dir.path()).unwrap(), script);
        assert!(check(OsStr::new("sh"), dir.path()).is_ok(), "sh is on PATH");
    }
}
