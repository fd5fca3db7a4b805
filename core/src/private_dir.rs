//! Private folders in a shared place such as `/tmp`.
//!
//! An agent's socket and log live under `/tmp`, where every user may
//! create names. A folder another user made there first (open to all, or
//! with a symbolic link for a log) would let that user delete the socket,
//! put their own in its place, or have the agent's log overwrite a file
//! of ours. Every folder between the shared place and the one wanted is
//! therefore made here, mode 0700, or, if it exists, must be a real folder
//! of the right user that nobody else may write to; anything else is
//! refused by name, never used.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A private folder could not be had.
#[derive(Debug, Error)]
pub enum PrivateDirError {
    /// A folder on the way exists but is not private to its user.
    #[error("{} exists but is {what}: it must be a folder of uid {uid} that nobody else may write to; remove it (or fix its owner and mode)", path.display())]
    NotPrivate {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
        /// The user it should belong to.
        uid: u32,
    },
    /// A file-system step failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done.
        step: &'static str,
        /// The folder.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Who a private folder belongs to: the current user, or (for a
/// privileged process setting up a job's folders) the job's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Its uid.
    pub uid: u32,
    /// Its gid, for folders handed over.
    pub gid: u32,
}

impl Owner {
    /// The effective user of this process.
    pub fn current() -> Owner {
        Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

/// Makes `dir` private to `owner`: each folder of `dir` below `shared`
/// (which is trusted as it is, like `/tmp`) is created mode 0700 when
/// missing (and handed to `owner` when that is not this process's user),
/// or else checked to be a folder of `owner`'s that no one else may
/// write to. A `dir` not below `shared` has only itself made or checked.
pub fn make(dir: &Path, shared: &Path, owner: Owner) -> Result<(), PrivateDirError> {
    if !dir.starts_with(shared) {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| PrivateDirError::Io {
                step: "creating",
                path: parent.to_owned(),
                source,
            })?;
        }
        return make_one(dir, owner);
    }
    let below: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| *p != shared && !p.as_os_str().is_empty() && *p != Path::new("/"))
        .collect();
    for folder in below.into_iter().rev() {
        make_one(folder, owner)?;
    }
    Ok(())
}

/// The places every user may create names in, whose folders
/// [`make_private`] checks on the way down.
const SHARED_PLACES: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// [`make`] below the shared place `dir` is in (the temporary folder,
/// `/tmp`, `/var/tmp`, `/dev/shm`), or of `dir` alone elsewhere.
pub fn make_private(dir: &Path, owner: Owner) -> Result<(), PrivateDirError> {
    let temp = std::env::temp_dir();
    let shared = std::iter::once(temp.as_path())
        .chain(SHARED_PLACES.iter().map(Path::new))
        .find(|place| dir.starts_with(place) && dir != *place)
        .unwrap_or_else(|| dir.parent().unwrap_or(dir));
    make(dir, shared, owner)
}

fn make_one(dir: &Path, owner: Owner) -> Result<(), PrivateDirError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => check(dir, &meta, owner),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                // Made by someone else meanwhile: checked below.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(PrivateDirError::Io {
                        step: "creating",
                        path: dir.to_owned(),
                        source,
                    })
                }
            }
            if owner != Owner::current() {
                nix::unistd::chown(
                    dir,
                    Some(nix::unistd::Uid::from_raw(owner.uid)),
                    Some(nix::unistd::Gid::from_raw(owner.gid)),
                )
                .map_err(|errno| PrivateDirError::Io {
                    step: "handing over",
                    path: dir.to_owned(),
                    source: errno.into(),
                })?;
            }
            let meta = fs::symlink_metadata(dir).map_err(|source| PrivateDirError::Io {
                step: "inspecting",
                path: dir.to_owned(),
                source,
            })?;
            check(dir, &meta, owner)
        }
        Err(source) => Err(PrivateDirError::Io {
            step: "inspecting",
            path: dir.to_owned(),
            source,
        }),
    }
}

fn check(dir: &Path, meta: &fs::Metadata, owner: Owner) -> Result<(), PrivateDirError> {
    let what = if meta.file_type().is_symlink() {
        Some("a symbolic link".to_owned())
    } else if !meta.is_dir() {
        Some("not a folder".to_owned())
    } else if meta.uid() != owner.uid {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        // Others may add, remove or rename what is in it.
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match what {
        Some(what) => Err(PrivateDirError::NotPrivate {
            path: dir.to_owned(),
            what,
            uid: owner.uid,
        }),
        None => Ok(()),
    }
}

/// Creates (or empties) the file `path` in a private folder for writing,
/// never through a symbolic link, mode 0600.
pub fn create_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn missing_folders_are_made_private() {
        let shared = tempfile::tempdir().unwrap();
        let dir = shared.path().join("cryo-1/job/node");
        make(&dir, shared.path(), Owner::current()).unwrap();
        for folder in ["cryo-1", "cryo-1/job", "cryo-1/job/node"] {
            let mode = fs::metadata(shared.path().join(folder))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{folder}");
        }
        // Made again: already private, accepted.
        make(&dir, shared.path(), Owner::current()).unwrap();
    }

    #[test]
    fn a_folder_on_the_way_open_to_others_or_a_link_is_refused() {
        let shared = tempfile::tempdir().unwrap();
        let squatted = shared.path().join("cryo-1");
        fs::create_dir(&squatted).unwrap();
        fs::set_permissions(&squatted, fs::Permissions::from_mode(0o777)).unwrap();
        let err = make(&squatted.join("job"), shared.path(), Owner::current()).unwrap_err();
        assert!(
            err.to_string().contains("writable by others (mode 777)"),
            "{err}"
        );
        assert!(!squatted.join("job").exists(), "nothing made inside it");

        let elsewhere = tempfile::tempdir().unwrap();
        let link = shared.path().join("cryo-2");
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        let err = make(&link.join("job"), shared.path(), Owner::current()).unwrap_err();
        assert!(err.to_string().contains("a symbolic link"), "{err}");

        let someone = Owner {
            uid: Owner::current().uid + 1,
            gid: 0,
        };
        let mine = shared.path().join("cryo-3");
        fs::create_dir(&mine).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o700)).unwrap();
        let err = make(&mine, shared.path(), someone).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
    }

    #[test]
    fn outside_a_shared_place_only_the_folder_itself_is_checked() {
        let base = tempfile::tempdir().unwrap();
        // An open parent of the user's own choosing is theirs to keep.
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = open.join("mine");
        make(&dir, Path::new("/nonexistent-shared"), Owner::current()).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_file_is_never_created_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let log = dir.path().join("agent.log");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        assert!(create_file(&log).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        let fresh = dir.path().join("fresh.log");
        create_file(&fresh).unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
