//! At a restart: the rank returns to the working directory it had at the
//! checkpoint, so that the files it opens by relative names after the
//! restart are the ones it opened before. A directory that is missing (it
//! was on a filesystem of the node the rank ran on) is made again.

use std::fs;
use std::io;
use std::path::Path;

use crate::error::RestoreError;

/// Changes to `cwd`, the working directory the checkpoint recorded, making
/// it first if it is missing; returns whether it was made. Nothing is done
/// for an empty `cwd` (an image from before format 2.4, or a directory
/// deleted before the checkpoint: named then).
pub(crate) fn return_to(rank: u32, cwd: &str) -> Result<bool, RestoreError> {
    if cwd.is_empty() {
        return Ok(false);
    }
    let made = make_if_missing(Path::new(cwd))
        .map_err(|(step, source)| failed(rank, cwd, step, source))?;
    nix::unistd::chdir(cwd).map_err(|errno| failed(rank, cwd, "chdir", errno.into()))?;
    if made {
        tracing::info!(rank, cwd, "restart.cwd_made_again");
    }
    tracing::debug!(rank, cwd, "restart.cwd");
    Ok(made)
}

/// Makes `dir` and its parents where it is missing; true when it did.
fn make_if_missing(dir: &Path) -> Result<bool, (&'static str, io::Error)> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(false),
        Ok(_) => Err((
            "find it",
            io::Error::other("something other than a directory is there"),
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => match fs::create_dir_all(dir) {
            Ok(()) => Ok(true),
            Err(err) => Err(("make it again", err)),
        },
        Err(err) => Err(("stat", err)),
    }
}

fn failed(rank: u32, cwd: &str, step: &'static str, source: io::Error) -> RestoreError {
    RestoreError::WorkingDirectory {
        rank,
        path: cwd.to_owned(),
        step,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The chdir itself is left to the end-to-end tests: the unit tests of
    // this crate share one process and its working directory.
    #[test]
    fn a_missing_working_directory_is_made_with_its_parents_and_a_file_there_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node-local/run 1");
        assert!(make_if_missing(&dir).unwrap());
        assert!(dir.is_dir());
        assert!(!make_if_missing(&dir).unwrap(), "there already");
        let file = root.path().join("a file");
        fs::write(&file, b"x").unwrap();
        let (step, err) = make_if_missing(&file).unwrap_err();
        assert_eq!(step, "find it");
        assert!(err.to_string().contains("other than a directory"));
        assert!(!return_to(0, "").unwrap(), "nothing recorded, nothing done");
        let err = return_to(5, file.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(&err, RestoreError::WorkingDirectory { rank: 5, path, .. } if *path == file.display().to_string()),
            "{err}"
        );
    }
}
