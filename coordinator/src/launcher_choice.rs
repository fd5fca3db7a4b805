//! Choosing the MPI launcher: the one `--launcher` names, else the one of
//! the MPI the program is built with ([`crate::program_mpi`]), else MPICH's
//! `mpiexec` and then Open MPI's `mpirun`. Each candidate's family is told
//! by its `--version`, since `mpirun` and `mpiexec` may be either MPI's
//! (Debian's alternatives).

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::launch::Launcher;
use crate::program_mpi::{MpiFamily, ProgramMpi};

/// No usable launcher.
#[derive(Debug, Error)]
pub enum LauncherError {
    /// Nothing found.
    #[error("no MPI launcher found: install MPICH (mpiexec) or Open MPI (mpirun), or pass --launcher PATH")]
    NotFound,
    /// The launcher `--launcher` names does not run.
    #[error("--launcher {}: it cannot be run", path.display())]
    Unrunnable {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A launcher of an unknown family.
    #[error("{} is neither MPICH Hydra nor Open MPI (its --version says: {first_line})", path.display())]
    Unknown {
        /// The program.
        path: PathBuf,
        /// What it said.
        first_line: String,
    },
    /// The program's MPI has no launcher here.
    #[error(
        "the program is built with {program}, but no {family} launcher was found \
         (tried {tried}): install it, or pass --launcher PATH",
        family = program.family,
        tried = tried.join(", ")
    )]
    NoneForProgram {
        /// What the program links.
        program: ProgramMpi,
        /// The launchers looked for.
        tried: Vec<String>,
    },
    /// `--launcher` belongs to another MPI than the program's: each rank
    /// would come up alone in a world of one.
    #[error(
        "--launcher names {launcher}, which cannot start this program: it is built with \
         {program}; pass {family}'s launcher (e.g. {suggestion})",
        family = program.family
    )]
    Mismatch {
        /// The launcher given.
        launcher: Launcher,
        /// What the program links.
        program: ProgramMpi,
        /// A launcher of the program's MPI.
        suggestion: &'static str,
    },
}

/// Tells the family of a launcher from its `--version` text.
pub fn classify(path: &Path, version_text: &str) -> Result<Launcher, LauncherError> {
    if version_text.contains("HYDRA") || version_text.contains("Hydra") {
        Ok(Launcher::Hydra(path.to_owned()))
    } else if version_text.starts_with("slurm ") || version_text.starts_with("slurm-wlm ") {
        Ok(Launcher::Srun(path.to_owned()))
    } else if version_text.contains("Open MPI")
        || version_text.contains("OpenRTE")
        || version_text.contains("open-mpi")
    {
        Ok(Launcher::OpenMpi(path.to_owned()))
    } else {
        Err(LauncherError::Unknown {
            path: path.to_owned(),
            first_line: version_text.lines().next().unwrap_or("").to_owned(),
        })
    }
}

/// Whether `launcher` can start ranks of `family` (srun starts either,
/// over PMI).
fn starts(launcher: &Launcher, family: MpiFamily) -> bool {
    match launcher {
        Launcher::Hydra(_) => family == MpiFamily::Mpich,
        Launcher::OpenMpi(_) => family == MpiFamily::OpenMpi,
        Launcher::Srun(_) => true,
    }
}

/// The launchers looked for, in order, for a program of `family` (`None`:
/// unknown).
fn candidates(family: Option<MpiFamily>) -> &'static [&'static str] {
    match family {
        None => &[
            "mpiexec.hydra",
            "mpiexec.mpich",
            "mpiexec",
            "mpirun.openmpi",
            "mpirun",
        ],
        Some(MpiFamily::Mpich) => &[
            "mpiexec.hydra",
            "mpiexec.mpich",
            "mpiexec",
            "mpirun.mpich",
            "mpirun",
        ],
        Some(MpiFamily::OpenMpi) => &["mpirun.openmpi", "mpiexec.openmpi", "mpirun", "mpiexec"],
    }
}

/// Runs `candidate --version` and tells its family; `None` if it does not
/// run.
fn probe(candidate: &Path) -> Option<Result<Launcher, LauncherError>> {
    let output = Command::new(candidate).arg("--version").output().ok()?;
    Some(classify(candidate, &version_text(&output)))
}

fn version_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Finds the launcher: `preferred` if given (refused if it cannot start
/// the program's MPI), else the first installed launcher of the program's
/// MPI, else MPICH's `mpiexec.hydra`/`mpiexec.mpich`/`mpiexec`, then Open
/// MPI's `mpirun`. `program_mpi` is asked only when the answer matters:
/// not for srun, which starts either MPI (the lookup may start a Python).
pub fn detect(
    preferred: Option<&Path>,
    program_mpi: impl FnOnce() -> Option<ProgramMpi>,
) -> Result<Launcher, LauncherError> {
    if let Some(path) = preferred {
        let launcher = match Command::new(path).arg("--version").output() {
            Ok(output) => classify(path, &version_text(&output))?,
            Err(source) => {
                return Err(LauncherError::Unrunnable {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        if matches!(launcher, Launcher::Srun(_)) {
            return Ok(launcher);
        }
        return match program_mpi().as_ref() {
            Some(program) if !starts(&launcher, program.family) => Err(LauncherError::Mismatch {
                launcher,
                program: program.clone(),
                suggestion: candidates(Some(program.family))[0],
            }),
            _ => Ok(launcher),
        };
    }
    let program = program_mpi();
    let family = program.as_ref().map(|p| p.family);
    let tried = candidates(family);
    let mut unknown = None;
    for candidate in tried {
        match probe(Path::new(candidate)) {
            Some(Ok(launcher)) if family.is_none_or(|f| starts(&launcher, f)) => {
                return Ok(launcher)
            }
            Some(Ok(_)) | None => {}
            Some(Err(err)) => unknown = Some(err),
        }
    }
    match program {
        Some(program) => Err(LauncherError::NoneForProgram {
            program: program.clone(),
            tried: tried.iter().map(|s| (*s).to_owned()).collect(),
        }),
        None => Err(unknown.unwrap_or(LauncherError::NotFound)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_launchers() {
        let hydra = "HYDRA build details:\n    Version: 4.0.2";
        assert!(matches!(
            classify(Path::new("mpiexec"), hydra),
            Ok(Launcher::Hydra(_))
        ));
        let ompi = "mpirun (Open MPI) 4.1.4";
        assert!(matches!(
            classify(Path::new("mpirun"), ompi),
            Ok(Launcher::OpenMpi(_))
        ));
        for srun in ["slurm 22.05.8", "slurm-wlm 22.05.8"] {
            assert!(matches!(
                classify(Path::new("srun"), srun),
                Ok(Launcher::Srun(_))
            ));
        }
        assert!(classify(Path::new("mystery"), "mystery 1.0").is_err());
    }

    #[test]
    fn a_launcher_starts_only_its_own_mpi_and_srun_starts_both() {
        let hydra = Launcher::Hydra("mpiexec".into());
        let ompi = Launcher::OpenMpi("mpirun".into());
        let srun = Launcher::Srun("srun".into());
        assert!(starts(&hydra, MpiFamily::Mpich));
        assert!(!starts(&hydra, MpiFamily::OpenMpi));
        assert!(starts(&ompi, MpiFamily::OpenMpi));
        assert!(!starts(&ompi, MpiFamily::Mpich));
        assert!(starts(&srun, MpiFamily::OpenMpi) && starts(&srun, MpiFamily::Mpich));
    }

    fn program(family: MpiFamily) -> ProgramMpi {
        ProgramMpi {
            family,
            library: "libmpi.so.40".into(),
            linked_by: "/bin/app".into(),
        }
    }

    #[test]
    fn a_launcher_that_is_not_there_is_named() {
        let absent = Path::new("/nonexistent/mpiexec");
        let err = detect(Some(absent), || None).unwrap_err();
        assert!(matches!(err, LauncherError::Unrunnable { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "--launcher /nonexistent/mpiexec: it cannot be run"
        );
        assert!(matches!(
            detect(Some(absent), || Some(program(MpiFamily::OpenMpi))),
            Err(LauncherError::Unrunnable { .. })
        ));
    }

    /// A script that answers `--version` as `text`. Written by a shell of
    /// its own: a file this process held open for writing could be
    /// inherited by a child another test forks at that moment, and running
    /// it would then fail with ETXTBSY.
    fn fake_launcher(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let made = Command::new("sh")
            .args([
                "-c",
                r#"printf '#!/bin/sh\necho "%s"\n' "$1" > "$2" && chmod 755 "$2""#,
            ])
            .args(["sh", text])
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        path
    }

    #[test]
    fn srun_starts_either_mpi_so_the_program_is_not_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let srun = fake_launcher(dir.path(), "srun", "slurm 22.05.8");
        let launcher = detect(Some(&srun), || {
            panic!("the program's MPI was looked up for srun")
        });
        assert!(matches!(launcher, Ok(Launcher::Srun(_))), "{launcher:?}");
    }

    #[test]
    fn a_preferred_launcher_of_the_other_mpi_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hydra = fake_launcher(dir.path(), "mpiexec", "HYDRA build details:");
        let refused = detect(Some(&hydra), || Some(program(MpiFamily::OpenMpi)));
        assert!(
            matches!(
                refused,
                Err(LauncherError::Mismatch {
                    suggestion: "mpirun.openmpi",
                    ..
                })
            ),
            "{refused:?}"
        );
        let accepted = detect(Some(&hydra), || Some(program(MpiFamily::Mpich)));
        assert!(matches!(accepted, Ok(Launcher::Hydra(_))), "{accepted:?}");
    }

    #[test]
    fn the_errors_name_the_program_and_what_to_pass() {
        let mismatch = LauncherError::Mismatch {
            launcher: Launcher::Hydra("/usr/bin/mpirun".into()),
            program: program(MpiFamily::OpenMpi),
            suggestion: candidates(Some(MpiFamily::OpenMpi))[0],
        };
        let text = mismatch.to_string();
        assert!(text.contains("/usr/bin/mpirun"), "{text}");
        assert!(text.contains("/bin/app links libmpi.so.40"), "{text}");
        assert!(text.contains("mpirun.openmpi"), "{text}");
        let none = LauncherError::NoneForProgram {
            program: program(MpiFamily::OpenMpi),
            tried: vec!["mpirun.openmpi".into(), "mpirun".into()],
        };
        assert!(none.to_string().contains("no Open MPI launcher"), "{none}");
    }
}
