//! The job's name when `cryo run` is not given `--job`: `slurm-<id>` inside
//! a Slurm job, else the program's file name, or for a Python program the
//! script's (or `-m` module's), so that two Python jobs in one store are
//! not both called `python3`.

use std::ffi::OsString;
use std::path::Path;

/// The default job name for `command` (the program and its arguments).
pub fn default_for(command: &[OsString]) -> String {
    if let Ok(id) = std::env::var("SLURM_JOB_ID") {
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            return format!("slurm-{id}");
        }
    }
    let Some(program) = command.first() else {
        return "job".into();
    };
    let named = if crate::program_mpi::is_python(Path::new(program)) {
        python_target(&command[1..]).unwrap_or_else(|| program.clone())
    } else {
        program.clone()
    };
    cleaned(&named)
}

/// The job a command names: `name` itself, or for a bare Slurm job id
/// that is no job of the store, `slurm-<id>` when that one is (the name
/// `cryo run` gives a job inside Slurm); for an array task as Slurm shows
/// it (`ARRAY_TASK`), `slurm-<the task's own job id>`, asked of `scontrol`.
pub fn named(store: &Path, name: &str) -> String {
    let slurm = format!("slurm-{name}");
    let opened = cryo_core::store::Store::open(store);
    let is_job = |job: &str| opened.as_ref().is_ok_and(|s| s.existing_job(job).is_ok());
    if is_job(name) {
        return name.to_owned();
    }
    if is_slurm_id(name) && is_job(&slurm) {
        return slurm;
    }
    if let Some(task) = array_task_job_id(name).map(|id| format!("slurm-{id}")) {
        if is_job(&task) {
            return task;
        }
    }
    name.to_owned()
}

fn is_slurm_id(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// The job id of the array task `name` (`ARRAY_TASK`), from
/// `scontrol show job -o`, while Slurm still knows the task.
pub(crate) fn array_task_job_id(name: &str) -> Option<String> {
    let (array, task) = name.split_once('_')?;
    if !is_slurm_id(array) || !is_slurm_id(task) {
        return None;
    }
    let out = std::process::Command::new("scontrol")
        .args(["show", "job", "-o", name])
        .output()
        .ok()?;
    job_id_in(&String::from_utf8_lossy(&out.stdout))
}

/// The `JobId=` of a line of `scontrol show job -o`.
fn job_id_in(line: &str) -> Option<String> {
    let id = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("JobId="))?;
    is_slurm_id(id).then(|| id.to_owned())
}

/// What a Python command line runs: the script, or the module of `-m`;
/// `None` for `-c` or an interactive interpreter.
fn python_target(args: &[OsString]) -> Option<OsString> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-m") => return args.next().cloned(),
            Some("-c") => return None,
            // Options that take a value as the next argument.
            Some("-X" | "-W" | "--check-hash-based-pycs") => {
                args.next();
            }
            Some(flag) if flag.starts_with('-') => {
                // `-mpkg` and `-c…` glued to their value.
                if let Some(module) = flag.strip_prefix("-m").filter(|m| !m.is_empty()) {
                    return Some(module.into());
                }
                if flag.starts_with("-c") {
                    return None;
                }
            }
            _ => return Some(arg.clone()),
        }
    }
    None
}

/// The file name of `path` without a `.py`, with anything but letters,
/// digits, `.`, `_` and `-` replaced by `-`.
fn cleaned(path: &OsString) -> String {
    let base = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = base.strip_suffix(".py").unwrap_or(&base);
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_owned();
    if cleaned.is_empty() {
        "job".into()
    } else {
        cleaned
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_array_tasks_own_job_id_is_read_from_scontrol() {
        let line = "JobId=84 ArrayJobId=83 ArrayTaskId=0 JobName=sim UserId=u(1)";
        assert_eq!(job_id_in(line), Some("84".into()));
        assert_eq!(job_id_in("slurm_load_jobs error: Invalid job id"), None);
        assert_eq!(array_task_job_id("83"), None);
        assert_eq!(array_task_job_id("x_0"), None);
    }

    #[test]
    fn a_bare_slurm_job_id_names_its_slurm_job_when_no_job_has_that_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = cryo_core::store::Store::create(dir.path()).unwrap();
        store.job("slurm-7").unwrap().ensure_layout().unwrap();
        store.job("8").unwrap().ensure_layout().unwrap();
        store.job("slurm-8").unwrap().ensure_layout().unwrap();
        assert_eq!(named(dir.path(), "7"), "slurm-7");
        // A job called "8" is itself.
        assert_eq!(named(dir.path(), "8"), "8");
        // No slurm-9 either: left as typed, for the error to name.
        assert_eq!(named(dir.path(), "9"), "9");
        assert_eq!(named(dir.path(), "heat"), "heat");
    }

    fn name(command: &[&str]) -> String {
        let command: Vec<OsString> = command.iter().map(OsString::from).collect();
        default_for(&command)
    }

    // Inside a Slurm job every name is `slurm-<id>`: nothing to check.
    #[test]
    fn a_program_is_named_by_its_file() {
        if std::env::var_os("SLURM_JOB_ID").is_some() {
            return;
        }
        assert_eq!(name(&["./heat2d", "-n", "4"]), "heat2d");
        assert_eq!(name(&["/opt/app/bin/my app"]), "my-app");
        assert_eq!(name(&[".hidden"]), "hidden");
        assert_eq!(name(&["/"]), "job");
    }

    #[test]
    fn a_python_program_is_named_by_its_script_or_module() {
        if std::env::var_os("SLURM_JOB_ID").is_some() {
            return;
        }
        assert_eq!(name(&["python3", "heat2d.py", "--steps", "9"]), "heat2d");
        assert_eq!(
            name(&["/usr/bin/python3.11", "-u", "-X", "dev", "run/sim.py"]),
            "sim"
        );
        assert_eq!(
            name(&["python", "-m", "mypkg.solver", "-n"]),
            "mypkg.solver"
        );
        assert_eq!(name(&["python3", "-mmypkg"]), "mypkg");
        assert_eq!(name(&["python3", "-c", "print(1)"]), "python3");
        assert_eq!(name(&["python3"]), "python3");
    }
}
