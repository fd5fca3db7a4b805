//! The session directories of the MPI library and its launcher, whose
//! files the library maps after `cryo_init`: Open MPI's OMPIO keeps the
//! shared file pointer of each file opened through MPI-IO in a file mapped
//! from its job's session directory (`/tmp/ompi.<host>.<uid>/pid.<n>/…`),
//! and PMIx its data stores. They are the library's, like its `/dev/shm`
//! segments: a restarted run's own `MPI_Init` and `MPI_File_open` make them
//! again, in a session directory of its own (the old one is removed when
//! its launcher ends).

use std::path::{Component, Path};

/// Variables naming such a directory: Open MPI 4's (ORTE) top and job
/// family session directories, and the PMIx server's (Open MPI 5's PRRTE,
/// Slurm's PMIx plugin).
const SESSION_VARS: [&str; 3] = [
    "OMPI_MCA_orte_top_session_dir",
    "OMPI_MCA_orte_jobfam_session_dir",
    "PMIX_SERVER_TMPDIR",
];

/// Directories whose files belong to the MPI library.
#[derive(Debug, Default, Clone)]
pub(crate) struct LibraryDirs(Vec<String>);

impl LibraryDirs {
    /// From this process's environment.
    pub(crate) fn from_env() -> LibraryDirs {
        let cwd = std::env::current_dir().ok();
        let guarded = [
            Some(std::env::temp_dir()),
            std::env::var_os("HOME").map(Into::into),
            cwd,
        ];
        LibraryDirs::from_vars(
            |name| std::env::var(name).ok(),
            guarded.iter().flatten().map(|p| p.as_path()),
        )
    }

    /// From `var`, leaving out a directory that is too broad to be a
    /// session's: the root, one component (`/tmp`), a `guarded` directory
    /// (the temporary directory, the home) or one holding it (the working
    /// directory's ancestors), whose files are the application's.
    fn from_vars<'a>(
        var: impl Fn(&str) -> Option<String>,
        guarded: impl Iterator<Item = &'a Path> + Clone,
    ) -> LibraryDirs {
        let mut dirs = Vec::new();
        for name in SESSION_VARS {
            let Some(value) = var(name) else { continue };
            let dir = value.trim_end_matches('/').to_owned();
            let path = Path::new(&dir);
            let clean = path.is_absolute()
                && path
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            let deep = path.components().count() > 2;
            let broad = guarded.clone().any(|g| g.starts_with(path));
            if clean && deep && !broad && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        LibraryDirs(dirs)
    }

    /// Whether `path` lies in one of the directories.
    pub(crate) fn holds(&self, path: &str) -> bool {
        self.0.iter().any(|dir| {
            path.strip_prefix(dir.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(vars: &[(&str, &str)], guarded: &[&str]) -> LibraryDirs {
        LibraryDirs::from_vars(
            |name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            },
            guarded.iter().map(Path::new),
        )
    }

    #[test]
    fn open_mpi_session_files_are_the_librarys() {
        let found = dirs(
            &[
                ("OMPI_MCA_orte_top_session_dir", "/tmp/ompi.vm.0"),
                (
                    "OMPI_MCA_orte_jobfam_session_dir",
                    "/tmp/ompi.vm.0/pid.27056/",
                ),
                ("PMIX_SERVER_TMPDIR", "/tmp/ompi.vm.0/pid.27056"),
            ],
            &["/tmp", "/root", "/home/me/run"],
        );
        assert!(found.holds("/tmp/ompi.vm.0/pid.27056/1/mpiio.dat_cid-0-27069.sm"));
        assert!(!found.holds("/tmp/ompi.vm.0.other/x"));
        assert!(!found.holds("/tmp/ompi.vm.0"));
        assert!(!found.holds("/home/me/run/out.dat"));
    }

    #[test]
    fn a_directory_too_broad_is_left_out() {
        let found = dirs(
            &[
                ("OMPI_MCA_orte_top_session_dir", "/tmp"),
                ("OMPI_MCA_orte_jobfam_session_dir", "/home/me"),
                ("PMIX_SERVER_TMPDIR", "relative/dir"),
            ],
            &["/tmp", "/root", "/home/me/run"],
        );
        assert!(!found.holds("/tmp/app.dat"));
        assert!(!found.holds("/home/me/run/out.dat"));
        assert!(!found.holds("relative/dir/x"));
        let dotted = dirs(&[("PMIX_SERVER_TMPDIR", "/var/spool/../tmp/x")], &[]);
        assert!(!dotted.holds("/var/tmp/x/y"));
    }
}
