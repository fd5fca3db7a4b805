//! What `cryo run` adds to an srun command line so that its ranks start as
//! plain `srun` would start them at this site, with cryo's variables.
//!
//! * The MPI plugin: a site that chose one (`MpiDefault` in slurm.conf, or
//!   `SLURM_MPI_TYPE` in the job's environment) built its MPI libraries for
//!   it, so it is kept: overriding `pmix` with `pmi2` would leave an Open
//!   MPI 5 rank, which speaks only PMIx, a singleton. Where the site chose
//!   none (Debian's default), PMI-2, which MPICH and Open MPI both speak.
//! * `--export`, when the allocation would drop cryo's variables
//!   ([`crate::export::srun_export`]).

use std::path::PathBuf;
use std::process::Command;

/// The `--mpi` to give srun: `None` when the site's own choice stands.
/// `env_type` is `SLURM_MPI_TYPE`; `mpi_default` is slurm.conf's
/// `MpiDefault` (`None` when it could not be read).
pub fn mpi_arg(env_type: Option<&str>, mpi_default: Option<&str>) -> Option<&'static str> {
    if chosen(env_type).is_some() {
        return None;
    }
    match chosen(mpi_default) {
        Some(plugin) if plugin != "none" => None,
        _ => Some("--mpi=pmi2"),
    }
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

/// Adds `--mpi` and `--export` to an srun `command` whose tasks need
/// `names` (see the module's comment).
pub fn add_site_args(command: &mut Command, names: &[String]) {
    let env_type = std::env::var("SLURM_MPI_TYPE").ok();
    // slurm.conf is read only when the job's environment did not choose.
    let site = chosen(env_type.as_deref())
        .is_none()
        .then(site_mpi_default)
        .flatten();
    if let Some(arg) = mpi_arg(env_type.as_deref(), site.as_deref()) {
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
        assert_eq!(mpi_arg(None, Some("none")), Some("--mpi=pmi2"));
        assert_eq!(mpi_arg(None, None), Some("--mpi=pmi2"));
        assert_eq!(mpi_arg(Some(""), Some("")), Some("--mpi=pmi2"));
        assert_eq!(mpi_arg(None, Some("pmix")), None);
        assert_eq!(mpi_arg(None, Some("pmix_v4")), None);
        assert_eq!(mpi_arg(Some("pmi2"), Some("none")), None);
        assert_eq!(mpi_arg(Some("pmix"), None), None);
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
