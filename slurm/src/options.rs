//! The plugin's command-line options and plugstack.conf arguments.
//!
//! The options are registered from `slurm_spank_init` (sbatch and salloc
//! ignore a static `spank_options` table). `--cryo[=STORE]` takes an
//! *optional* value (SPANK's `has_arg` 2). Slurm calls [`option_callback`]
//! for each option it sees, in every context (on the submit host and,
//! forwarded, on the nodes).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use slurm_spank::spank_sys::spank_option;

/// What the user asked for with `--cryo*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// `--cryo` was given.
    pub enabled: bool,
    /// Its value, if any.
    pub store: Option<String>,
    /// `--cryo-interval`.
    pub interval: Option<String>,
    /// `--cryo-keep`.
    pub keep: Option<String>,
    /// Where a bare `--cryo` puts its store (`cryo-store` in it) when not
    /// the working directory: the submission directory, for options taken
    /// from the job's environment ([`StepOptions::from_job_env`]).
    pub base: Option<PathBuf>,
}

/// plugstack.conf arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginArgs {
    /// `store=DIR`: the store of a bare `--cryo`.
    pub store: Option<PathBuf>,
    /// `agent=PATH`: the `cryo-agent` binary.
    pub agent: Option<PathBuf>,
}

/// Parses `store=DIR agent=PATH`.
pub fn parse_plugin_args(argv: &[&str]) -> Result<PluginArgs, String> {
    let mut args = PluginArgs::default();
    for arg in argv {
        match arg.split_once('=') {
            Some(("store", dir)) if Path::new(dir).is_absolute() => {
                args.store = Some(dir.into());
            }
            Some(("agent", path)) if Path::new(path).is_absolute() => {
                args.agent = Some(path.into());
            }
            Some(("store" | "agent", value)) => {
                return Err(format!("{arg:?}: {value:?} must be an absolute path"))
            }
            _ => {
                return Err(format!(
                    "unknown argument {arg:?} (spank_cryo.so takes store=DIR and agent=PATH)"
                ))
            }
        }
    }
    Ok(args)
}

/// How a job submitted with `--export=NONE` carries the plugin's options
/// to its batch script: Slurm keeps them in the job's SPANK environment,
/// which reaches the batch step as `SLURM_SPANK_` and the option's usual
/// variable (`_SLURM_SPANK_OPTION_cryo_cryo_interval`), where no option
/// callback sees them.
const JOB_ENV_PREFIX: &str = "SLURM_SPANK__SLURM_SPANK_OPTION_cryo_";

impl StepOptions {
    /// The options a job's environment carries under [`JOB_ENV_PREFIX`]
    /// (`lookup` reads it), if `--cryo` is among them; a bare `--cryo`'s
    /// store lies in the submission directory (`SLURM_SUBMIT_DIR`).
    pub fn from_job_env(lookup: impl Fn(&str) -> Option<String>) -> Option<StepOptions> {
        let option = |name: &str| lookup(&format!("{JOB_ENV_PREFIX}{name}"));
        let store = option("cryo")?;
        Some(StepOptions {
            enabled: true,
            store: Some(store).filter(|v| !v.is_empty() && v != NULL_VALUE),
            interval: option("cryo_interval"),
            keep: option("cryo_keep"),
            base: lookup("SLURM_SUBMIT_DIR")
                .map(PathBuf::from)
                .filter(|dir| dir.is_absolute()),
        })
    }

    /// The store the job uses.
    pub fn store(&self, args: &PluginArgs) -> Result<PathBuf, String> {
        match (&self.store, &args.store) {
            (Some(dir), _) if Path::new(dir).is_absolute() => Ok(dir.into()),
            (Some(dir), _) => Err(format!(
                "--cryo={dir}: the store must be an absolute path on storage every node shares"
            )),
            (None, Some(dir)) => Ok(dir.clone()),
            // As `cryo run`: `cryo-store` in the working directory, resolved
            // at submission and carried to the job in CRYO_STORE.
            (None, None) => match &self.base {
                Some(base) => Ok(base.join(DEFAULT_STORE_DIR)),
                None => std::env::current_dir()
                    .map(|cwd| cwd.join(DEFAULT_STORE_DIR))
                    .map_err(|e| {
                        format!("--cryo without a store: reading the working directory: {e}")
                    }),
            },
        }
    }

    /// The job's settings from these options, `store` being its store:
    /// `(variable, value, typed)`. What the user typed as an option
    /// (`--cryo=DIR`, `--cryo-interval`, `--cryo-keep`) is `typed` and
    /// wins over the same variable inherited from the submitting shell
    /// (a `CRYO_STORE` exported in a login profile); a store that comes
    /// from plugstack.conf or the default does not.
    pub fn settings(&self, store: PathBuf) -> Vec<(&'static str, std::ffi::OsString, bool)> {
        let mut out = vec![("CRYO_STORE", store.into_os_string(), self.store.is_some())];
        out.extend(
            self.interval
                .clone()
                .map(|v| ("CRYO_INTERVAL", v.into(), true)),
        );
        out.extend(self.keep.clone().map(|v| ("CRYO_KEEP", v.into(), true)));
        out
    }

    /// Checks the numeric options, and that they come with `--cryo`.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            let given = [
                ("--cryo-interval", &self.interval),
                ("--cryo-keep", &self.keep),
            ];
            if let Some((name, _)) = given.iter().find(|(_, value)| value.is_some()) {
                return Err(format!(
                    "{name} without --cryo: add --cryo (or --cryo=STORE) for a job cryo checkpoints"
                ));
            }
            return Ok(());
        }
        if let Some(interval) = &self.interval {
            match interval.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 => {}
                _ => {
                    return Err(format!(
                        "--cryo-interval={interval}: expected a positive number of seconds"
                    ))
                }
            }
        }
        if let Some(keep) = &self.keep {
            match keep.parse::<u32>() {
                Ok(n) if n > 0 => {}
                _ => {
                    return Err(format!(
                        "--cryo-keep={keep}: expected a positive whole number"
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Refuses at submission a store that can never hold checkpoints: an
/// existing file that is no folder, or a path in the kernel's own
/// filesystems. A store that does not exist yet is the job's to make.
pub fn check_store_path(store: &Path) -> Result<(), String> {
    let kernel = ["/proc", "/sys", "/dev"];
    if let Some(top) = kernel.iter().find(|top| store.starts_with(top)) {
        return Err(format!(
            "--cryo={}: {top} is the kernel's, not storage: name a folder every node shares",
            store.display()
        ));
    }
    match std::fs::metadata(store) {
        Ok(meta) if !meta.is_dir() => Err(format!(
            "--cryo={}: this is a file, not a folder: name a folder every node shares",
            store.display()
        )),
        _ => Ok(()),
    }
}

static OPTIONS: Mutex<StepOptions> = Mutex::new(StepOptions {
    enabled: false,
    store: None,
    interval: None,
    keep: None,
    base: None,
});

/// The options seen so far in this process.
pub fn current() -> StepOptions {
    OPTIONS.lock().map(|o| o.clone()).unwrap_or_default()
}

/// Takes the options from the job's environment when Slurm called back
/// with none ([`StepOptions::from_job_env`]: the batch script of a job
/// submitted with `--export=NONE`). Returns whether it did.
pub fn adopt_from_job_env(lookup: impl Fn(&str) -> Option<String>) -> bool {
    let Ok(mut options) = OPTIONS.lock() else {
        return false;
    };
    if options.enabled {
        return false;
    }
    match StepOptions::from_job_env(lookup) {
        Some(found) => {
            *options = found;
            true
        }
        None => false,
    }
}

/// The store's folder in the working directory when `--cryo` names none:
/// the same default as `cryo run`'s (`cryo_coordinator::store_dir`).
pub const DEFAULT_STORE_DIR: &str = "cryo-store";

/// What Slurm exports for an option given without its optional value.
const NULL_VALUE: &str = "(null)";

const OPT_CRYO: c_int = 1;
const OPT_INTERVAL: c_int = 2;
const OPT_KEEP: c_int = 3;

/// Records one option; Slurm calls it from C.
extern "C" fn option_callback(val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    let value = if optarg.is_null() {
        None
    } else {
        // SAFETY: Slurm passes a NUL-terminated string that lives for the
        // duration of the call; it is copied before returning.
        Some(
            unsafe { CStr::from_ptr(optarg) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    let recorded = std::panic::catch_unwind(|| {
        let Ok(mut options) = OPTIONS.lock() else {
            return false;
        };
        match val {
            OPT_CRYO => {
                options.enabled = true;
                // A bare `--cryo` reaches the job's own sruns as the text
                // "(null)" (Slurm exports the option's missing value so):
                // no store named, as on the command line.
                options.store = value.filter(|v| !v.is_empty() && v != NULL_VALUE);
            }
            OPT_INTERVAL => options.interval = value,
            OPT_KEEP => options.keep = value,
            _ => return false,
        }
        true
    });
    match recorded {
        Ok(true) => 0,
        _ => -1,
    }
}

/// The plugin's options. Slurm keeps pointers to the entries, so they live
/// in a static.
#[repr(transparent)]
#[derive(Debug)]
pub struct OptionTable([spank_option; 3]);

// SAFETY: the table only holds pointers to 'static C string literals and a
// function pointer; nothing ever writes through them.
unsafe impl Sync for OptionTable {}

const fn entry(
    name: &'static CStr,
    arginfo: &'static CStr,
    usage: &'static CStr,
    has_arg: c_int,
    val: c_int,
) -> spank_option {
    spank_option {
        name: name.as_ptr(),
        arginfo: arginfo.as_ptr(),
        usage: usage.as_ptr(),
        has_arg,
        val,
        cb: Some(option_callback),
    }
}

/// The entries to register, one pointer each.
pub fn table() -> impl Iterator<Item = *const spank_option> {
    CRYO_OPTIONS.0.iter().map(std::ptr::from_ref)
}

static CRYO_OPTIONS: OptionTable = OptionTable([
    entry(
        c"cryo",
        c"STORE",
        c"Checkpoint this job with cryo, to the shared directory STORE (default: the site's store). Run the program with `cryo run -- PROGRAM`.",
        2,
        OPT_CRYO,
    ),
    entry(
        c"cryo-interval",
        c"SECS",
        c"With --cryo: checkpoint every SECS seconds.",
        1,
        OPT_INTERVAL,
    ),
    entry(
        c"cryo-keep",
        c"N",
        c"With --cryo: keep the newest N checkpoints (default 3).",
        1,
        OPT_KEEP,
    ),
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_args() {
        assert_eq!(
            parse_plugin_args(&["store=/shared/cryo", "agent=/opt/cryo/bin/cryo-agent"]).unwrap(),
            PluginArgs {
                store: Some("/shared/cryo".into()),
                agent: Some("/opt/cryo/bin/cryo-agent".into()),
            }
        );
        assert!(parse_plugin_args(&["store=relative"])
            .unwrap_err()
            .contains("absolute"));
        assert!(parse_plugin_args(&["colour=blue"])
            .unwrap_err()
            .contains("unknown argument"));
    }

    #[test]
    fn options_in_the_job_environment_of_an_export_none_job() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                (vars.iter())
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let found = StepOptions::from_job_env(env(&[
            ("SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo", "/shared/cryo"),
            ("SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo_interval", "600"),
            ("SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo_keep", "2"),
            ("SLURM_SUBMIT_DIR", "/home/u/run"),
        ]))
        .unwrap();
        assert!(found.enabled);
        assert_eq!(found.store.as_deref(), Some("/shared/cryo"));
        assert_eq!(found.interval.as_deref(), Some("600"));
        assert_eq!(found.keep.as_deref(), Some("2"));
        let args = PluginArgs::default();
        assert_eq!(found.store(&args).unwrap(), Path::new("/shared/cryo"));
        // A bare --cryo: the store in the submission directory.
        let bare = StepOptions::from_job_env(env(&[
            ("SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo", "(null)"),
            ("SLURM_SUBMIT_DIR", "/home/u/run"),
        ]))
        .unwrap();
        assert_eq!(bare.store, None);
        assert_eq!(
            bare.store(&args).unwrap(),
            Path::new("/home/u/run/cryo-store")
        );
        // Without --cryo, the others are no cryo job.
        assert_eq!(
            StepOptions::from_job_env(env(&[(
                "SLURM_SPANK__SLURM_SPANK_OPTION_cryo_cryo_interval",
                "600"
            )])),
            None
        );
    }

    #[test]
    fn a_store_that_cannot_hold_checkpoints_is_refused_at_submission() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = check_store_path(&file).unwrap_err();
        assert!(err.contains("a file, not a folder"), "{err}");
        let err = check_store_path(Path::new("/proc/foo")).unwrap_err();
        assert!(err.contains("/proc is the kernel's"), "{err}");
        check_store_path(dir.path()).unwrap();
        check_store_path(&dir.path().join("new/store")).unwrap();
    }

    #[test]
    fn store_choice() {
        let site = PluginArgs {
            store: Some("/site".into()),
            agent: None,
        };
        let mut options = StepOptions {
            enabled: true,
            ..StepOptions::default()
        };
        assert_eq!(options.store(&site).unwrap(), PathBuf::from("/site"));
        assert_eq!(
            options.store(&PluginArgs::default()).unwrap(),
            std::env::current_dir().unwrap().join("cryo-store")
        );
        options.store = Some("/mine".into());
        assert_eq!(options.store(&site).unwrap(), PathBuf::from("/mine"));
        options.store = Some("mine".into());
        assert!(options.store(&site).unwrap_err().contains("absolute"));
    }

    #[test]
    fn typed_options_win_over_the_inherited_environment() {
        let mut options = StepOptions {
            enabled: true,
            interval: Some("30".into()),
            ..StepOptions::default()
        };
        let typed = |o: &StepOptions| {
            o.settings("/st".into())
                .into_iter()
                .map(|(name, _, typed)| (name, typed))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            typed(&options),
            vec![("CRYO_STORE", false), ("CRYO_INTERVAL", true)]
        );
        options.store = Some("/st".into());
        assert_eq!(typed(&options)[0], ("CRYO_STORE", true));
    }

    #[test]
    fn option_values() {
        let mut options = StepOptions {
            enabled: true,
            interval: Some("30".into()),
            keep: Some("2".into()),
            ..StepOptions::default()
        };
        options.validate().unwrap();
        options.interval = Some("soon".into());
        assert!(options.validate().unwrap_err().contains("--cryo-interval"));
        options.interval = None;
        options.keep = Some("0".into());
        assert!(options.validate().unwrap_err().contains("--cryo-keep"));
        // Without --cryo they would be ignored: refused, naming the option.
        options.enabled = false;
        options.keep = Some("2".into());
        assert!(options
            .validate()
            .unwrap_err()
            .contains("--cryo-keep without --cryo"));
        options.keep = None;
        options.validate().unwrap();
    }

    #[test]
    fn callback_records_and_refuses() {
        assert_eq!(option_callback(OPT_KEEP, c"4".as_ptr(), 0), 0);
        assert_eq!(current().keep.as_deref(), Some("4"));
        assert_eq!(option_callback(99, std::ptr::null(), 0), -1);
        assert_eq!(option_callback(OPT_CRYO, std::ptr::null(), 0), 0);
        assert!(current().enabled);
        assert_eq!(current().store, None);
        // A bare --cryo as the job's own srun sees it.
        assert_eq!(option_callback(OPT_CRYO, c"(null)".as_ptr(), 0), 0);
        assert_eq!(current().store, None);
        assert_eq!(option_callback(OPT_CRYO, c"/shared/st".as_ptr(), 0), 0);
        assert_eq!(current().store.as_deref(), Some("/shared/st"));
    }
}
