//! What `cryo run` adds to an srun command line so that its ranks start as
//! plain `srun` would start them at this site, with cryo's variables.
//!
//! * The MPI plugin: a site that chose one (`MpiDefault` in slurm.conf, or
//!   `SLURM_MPI_TYPE` in the job's environment) built its MPI libraries for
//!   it, so it is kept: overriding `pmix` with `pmi2` would leave an Open
//!   MPI 5 rank, which speaks only PMIx, a singleton. Where the site chose
//!   none (Debian's default): PMIx for a program that links Open MPI when
//!   this srun has it (Debian's Open MPI is built without Slurm's PMI-2
//!   and stops with "OMPI was not built with SLURM's PMI support"), else
//!   PMI-2, which MPICH speaks.
//! * `--export`, when the allocation would drop cryo's variables
//!   ([`crate::export::srun_export`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::program_mpi::MpiFamily;

/// The `--mpi` to give srun: `None` when the site's own choice stands.
/// `env_type` is `SLURM_MPI_TYPE`; `mpi_default` is slurm.conf's
/// `MpiDefault` (`None` when it could not be read). Where the site chose
/// none, `family` (the program's MPI) and `has_pmix` (whether this srun
/// lists a PMIx plugin) are asked, in that order and only then.
pub fn mpi_arg(
    env_type: Option<&str>,
    mpi_default: Option<&str>,
    family: impl FnOnce() -> Option<MpiFamily>,
    has_pmix: impl FnOnce() -> bool,
) -> Option<&'static str> {
    if chosen(env_type).is_some() {
        return None;
    }
    match chosen(mpi_default) {
        Some(plugin) if plugin != "none" => None,
        _ if family() == Some(MpiFamily::OpenMpi) && has_pmix() => Some("--mpi=pmix"),
        _ => Some("--mpi=pmi2"),
    }
}

/// Whether `srun --mpi=list` names a PMIx plugin (`pmix`, `pmix_v4`…).
/// Slurm prints the list on stderr or stdout, one plugin a line, each
/// after "srun: " in older versions.
pub fn lists_pmix(listing: &str) -> bool {
    listing.lines().any(|line| {
        let word = line.trim().trim_start_matches("srun:").trim();
        word == "pmix" || word.starts_with("pmix_v")
    })
}

/// Asks `srun` which MPI plugins it has; false when it cannot say.
fn srun_has_pmix(srun: &Path) -> bool {
    Command::new(srun)
        .arg("--mpi=list")
        .output()
        .is_ok_and(|out| {
            lists_pmix(&String::from_utf8_lossy(&out.stdout))
                || lists_pmix(&String::from_utf8_lossy(&out.stderr))
        })
}

/// A setting that says something.
fn chosen(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// `MpiDefault` from the text of a slurm.conf (keys are case-blind there;
/// `#` starts a comment).
pub fn mpi_default_in(config: &str) -> Option<&str> {
    config.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let (key, value) = line.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("MpiDefault")
            .then(|| value.trim())
    })
}

/// The site's `MpiDefault`, from the slurm.conf this job's Slurm commands
/// read: `SLURM_CONF` (which slurmd also sets for a job on a configless
/// node, to its cached copy), else the packages' paths. Read from the file,
/// not asked of the controller: launching must not wait on it. `None` when
/// no file says.
pub fn site_mpi_default() -> Option<String> {
    let candidates = std::env::var_os("SLURM_CONF")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf"].map(PathBuf::from));
    candidates
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| mpi_default_in(&text).map(str::to_owned))
}

/// Adds `--mpi` and `--export` to a `command` of `srun` whose tasks run
/// `program` and need `names` (see the module's comment).
pub fn add_site_args(command: &mut Command, srun: &Path, program: &OsStr, names: &[String]) {
    let env_type = std::env::var("SLURM_MPI_TYPE").ok();
    // slurm.conf is read only when the job's environment did not choose.
    let site = chosen(env_type.as_deref())
        .is_none()
        .then(site_mpi_default)
        .flatten();
    let family = || {
        let cwd = std::env::current_dir().ok()?;
        crate::program_mpi::of_program(program, &cwd).map(|p| p.family)
    };
    if let Some(arg) = mpi_arg(env_type.as_deref(), site.as_deref(), family, || {
        srun_has_pmix(srun)
    }) {
        command.arg(arg);
    }
    add_export(command, names);
}

/// Adds `--export` when the allocation's `SLURM_EXPORT_ENV` would keep
/// `names` from the tasks.
pub fn add_export(command: &mut Command, names: &[String]) {
    let allocation = std::env::var("SLURM_EXPORT_ENV").ok();
    if let Some(spec) = crate::export::srun_export(allocation.as_deref(), names) {
        command.arg(format!("--export={spec}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sites_plugin_stands_and_none_becomes_pmi2() {
        let mpich = || Some(MpiFamily::Mpich);
        let asked = || -> bool { panic!("srun asked for its plugins for an MPICH program") };
        assert_eq!(
            mpi_arg(None, Some("none"), mpich, asked),
            Some("--mpi=pmi2")
        );
        assert_eq!(mpi_arg(None, None, || None, || true), Some("--mpi=pmi2"));
        assert_eq!(
            mpi_arg(Some(""), Some(""), mpich, asked),
            Some("--mpi=pmi2")
        );
        let unasked =
            || -> Option<MpiFamily> { panic!("the program looked at though the site chose") };
        assert_eq!(mpi_arg(None, Some("pmix"), unasked, asked), None);
        assert_eq!(mpi_arg(None, Some("pmix_v4"), unasked, asked), None);
        assert_eq!(mpi_arg(Some("pmi2"), Some("none"), unasked, asked), None);
        assert_eq!(mpi_arg(Some("pmix"), None, unasked, asked), None);
    }

    #[test]
    fn an_open_mpi_program_gets_pmix_where_the_site_chose_none_and_srun_has_it() {
        let open_mpi = || Some(MpiFamily::OpenMpi);
        assert_eq!(
            mpi_arg(None, Some("none"), open_mpi, || true),
            Some("--mpi=pmix")
        );
        assert_eq!(mpi_arg(None, None, open_mpi, || false), Some("--mpi=pmi2"));
        assert_eq!(mpi_arg(Some("pmi2"), None, open_mpi, || true), None);
    }

    #[test]
    fn srun_mpi_lists_are_read() {
        let old = "srun: MPI types are...\nsrun: cray_shasta\nsrun: none\nsrun: pmi2\nsrun: pmix\nsrun: pmix_v4\n";
        assert!(lists_pmix(old));
        let new = "MPI plugin types are...\n\tnone\n\tpmi2\n\tpmix\nspecific pmix plugin versions available: pmix_v4\n";
        assert!(lists_pmix(new));
        assert!(!lists_pmix(
            "srun: MPI types are...\nsrun: none\nsrun: pmi2\n"
        ));
    }

    #[test]
    fn mpi_default_is_read_from_slurm_conf() {
        let config = "# MpiDefault=pmi2 (a comment)\n\
                      ClusterName=c\n\
                      mpidefault = pmix # the site's choice\n\
                      MpiParams=ports=12000-12999\n";
        assert_eq!(mpi_default_in(config), Some("pmix"));
        assert_eq!(mpi_default_in("MpiParams=ports=1-2\n"), None);
        assert_eq!(mpi_default_in(""), None);
    }
}
