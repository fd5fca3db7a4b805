//! The variables a launcher must carry by name to ranks and agents on
//! other hosts.
//!
//! Hydra and srun give every process they start the launcher's whole
//! environment. Open MPI's `mpirun` does not: a process it starts on
//! another host over ssh (its rsh agent) gets sshd's fresh environment
//! plus the variables named with `-x`. Without them a rank there would not
//! know its job, its token or its agent, and a setting such as
//! `CRYO_QUIESCE_SLACK` would hold on the launching host only. So `cryo`
//! names, for Open MPI, what it set itself, every `CRYO_*` and `OMP_*`
//! variable, the paths a program is found and linked by, and any variable
//! the user lists in `CRYO_EXPORT`. Only names go on the command line
//! (`-x NAME`): the launcher reads the values from its own environment, so
//! the job's token is never in a process listing.
//!
//! srun carries the whole environment unless the job asked otherwise:
//! `sbatch --export=NONE` leaves `SLURM_EXPORT_ENV=NONE` in the batch
//! script, and every srun in it then starts its tasks with Slurm's
//! variables only. [`srun_export`] keeps the user's choice and adds what
//! cryo's ranks and agents cannot do without: the `CRYO_*` names.

use std::ffi::{OsStr, OsString};

use thiserror::Error;

pub use cryo_core::env::ENV_EXPORT;

/// Prefixes of the variables always carried: cryo's settings and OpenMP's.
const PREFIXES: [&str; 2] = ["CRYO_", "OMP_"];

/// Variables always carried when set: where programs, libraries and Python
/// modules are found (what `module load` sets).
const PATHS: [&str; 3] = ["PATH", "LD_LIBRARY_PATH", "PYTHONPATH"];

/// A bad `CRYO_EXPORT`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExportError {
    /// An entry that is not a variable name.
    #[error("{ENV_EXPORT}: {0:?} is not an environment variable name (letters, digits and '_', not starting with a digit)")]
    BadName(String),
    /// Not valid UTF-8.
    #[error("{ENV_EXPORT} is not valid UTF-8")]
    NotUtf8,
}

/// The names to carry, sorted and without repeats: `set_by_cryo` (set on
/// the launcher's command, so present whatever `env` holds), every name in
/// `env` that matches the rules above, and those `CRYO_EXPORT` lists that
/// are set. `env` is the launching process's environment.
pub fn exported_names<I>(set_by_cryo: &[&str], env: I) -> Result<Vec<String>, ExportError>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let env: Vec<(OsString, OsString)> = env.into_iter().collect();
    let mut names: Vec<String> = set_by_cryo.iter().map(|&n| n.to_owned()).collect();
    let mut listed = Vec::new();
    for (key, value) in &env {
        let Some(key) = key.to_str().filter(|k| is_name(k)) else {
            continue;
        };
        if key == ENV_EXPORT {
            listed = parse_list(value)?;
        }
        if PREFIXES.iter().any(|p| key.starts_with(p)) || PATHS.contains(&key) {
            names.push(key.to_owned());
        }
    }
    for name in listed {
        if env.iter().any(|(k, _)| k == OsStr::new(&name)) {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The `--export` srun needs so that `names` (what cryo set on its command)
/// reach every task, given the allocation's `SLURM_EXPORT_ENV`: `None`
/// when srun carries the whole environment anyway (unset, or `ALL`),
/// otherwise the user's own list with the `CRYO_*` names of `names` added
/// (`NONE` and `NIL` mean no variable of the user's).
pub fn srun_export(slurm_export_env: Option<&str>, names: &[String]) -> Option<String> {
    let spec = slurm_export_env.map(str::trim).unwrap_or("");
    if spec.is_empty() || spec == "ALL" || spec.starts_with("ALL,") {
        return None;
    }
    let mut entries: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && *e != "NONE" && *e != "NIL")
        .map(str::to_owned)
        .collect();
    for name in names.iter().filter(|n| n.starts_with("CRYO_")) {
        let named = |e: &String| e == name || e.starts_with(&format!("{name}="));
        if !entries.iter().any(named) {
            entries.push(name.clone());
        }
    }
    Some(if entries.is_empty() {
        "NONE".to_owned()
    } else {
        entries.join(",")
    })
}

/// `CRYO_EXPORT`'s names; empty entries are skipped.
fn parse_list(value: &OsStr) -> Result<Vec<String>, ExportError> {
    let value = value.to_str().ok_or(ExportError::NotUtf8)?;
    value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if is_name(n) {
                Ok(n.to_owned())
            } else {
                Err(ExportError::BadName(n.to_owned()))
            }
        })
        .collect()
}

/// A POSIX shell variable name: what a launcher can carry by name.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn cryo_openmp_paths_and_what_cryo_set_are_carried() {
        let names = exported_names(
            &["CRYO_TOKEN", "CRYO_JOB"],
            env(&[
                ("CRYO_QUIESCE_SLACK", "4"),
                ("OMP_NUM_THREADS", "8"),
                ("PATH", "/usr/bin"),
                ("LD_LIBRARY_PATH", "/opt/lib"),
                ("HOME", "/root"),
                ("SSH_CONNECTION", "x"),
                ("DISPLAY", ":0"),
                ("BASH_FUNC_module%%", "() { :; }"),
                ("CRYO_JOB", "heat"),
            ]),
        )
        .unwrap();
        assert_eq!(
            names,
            [
                "CRYO_JOB",
                "CRYO_QUIESCE_SLACK",
                "CRYO_TOKEN",
                "LD_LIBRARY_PATH",
                "OMP_NUM_THREADS",
                "PATH"
            ]
        );
    }

    #[test]
    fn cryo_export_adds_the_names_it_lists_that_are_set() {
        let names = exported_names(
            &[],
            env(&[
                (ENV_EXPORT, " HEAT_INPUT, ,UNSET_ONE,LANG"),
                ("HEAT_INPUT", "/data/in"),
                ("LANG", "C.UTF-8"),
            ]),
        )
        .unwrap();
        assert_eq!(names, ["CRYO_EXPORT", "HEAT_INPUT", "LANG"]);
    }

    #[test]
    fn a_bad_name_in_cryo_export_is_refused_by_name() {
        for bad in ["A=B", "1ST", "A-B", "A B"] {
            let err = exported_names(&[], env(&[(ENV_EXPORT, &format!("OK,{bad}"))])).unwrap_err();
            assert_eq!(err, ExportError::BadName(bad.trim().to_owned()), "{bad}");
            assert!(err.to_string().contains(ENV_EXPORT), "{err}");
        }
    }

    #[test]
    fn srun_keeps_a_clean_environment_but_for_cryo_names() {
        let names: Vec<String> = ["CRYO_AGENT_SOCKET", "CRYO_JOB", "PATH"]
            .map(String::from)
            .to_vec();
        for whole in [None, Some(""), Some("ALL"), Some("ALL,FOO=1")] {
            assert_eq!(srun_export(whole, &names), None, "{whole:?}");
        }
        assert_eq!(
            srun_export(Some("NONE"), &names).as_deref(),
            Some("CRYO_AGENT_SOCKET,CRYO_JOB")
        );
        assert_eq!(
            srun_export(Some("EDITOR,CRYO_JOB=x,NIL"), &names).as_deref(),
            Some("EDITOR,CRYO_JOB=x,CRYO_AGENT_SOCKET")
        );
        assert_eq!(srun_export(Some("NONE"), &[]).as_deref(), Some("NONE"));
    }

    #[cfg(unix)]
    #[test]
    fn a_non_utf8_cryo_export_is_refused() {
        use std::os::unix::ffi::OsStringExt;
        let env = vec![(
            OsString::from(ENV_EXPORT),
            OsString::from_vec(vec![b'A', 0xff]),
        )];
        assert_eq!(exported_names(&[], env), Err(ExportError::NotUtf8));
    }
}
