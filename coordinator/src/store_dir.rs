//! Where the store is when nobody says.
//!
//! `--store`, else `CRYO_STORE`, else `cryo-store` in the working
//! directory. SCR keeps its checkpoints under the job's working directory
//! for the same reason: on a cluster that is the shared filesystem every
//! node of the job sees, and it is where a requeued job starts again. Every
//! command (`run`, `restart`, `status`, `checkpoint`, `preempt`) finds the
//! store the same way, so a `cryo checkpoint` from the job's directory
//! reaches the job that `cryo run` started there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cryo_core::locality::{Filesystem, Locality};

/// The store's folder name in the working directory, when none is given.
pub const DEFAULT_STORE_DIR: &str = "cryo-store";

/// A store directory and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir {
    /// Absolute path.
    pub path: PathBuf,
    /// Whether it is the default (nobody named a store).
    pub is_default: bool,
}

impl StoreDir {
    /// The store named by `--store` or `CRYO_STORE` (`given`), or the
    /// default under the working directory. Relative paths are made
    /// absolute, since agents and ranks run elsewhere.
    pub fn resolve(given: Option<PathBuf>) -> Result<StoreDir> {
        let cwd = std::env::current_dir().context("reading the working directory")?;
        Ok(Self::resolve_in(given, &cwd))
    }

    /// [`StoreDir::resolve`] for a command naming `job`: when nobody named
    /// a store and the default does not hold the job, a Slurm job's store
    /// where the Slurm plugin put it (`crate::slurm_store`), said on
    /// stderr.
    pub fn resolve_for(given: Option<PathBuf>, job: &str) -> Result<StoreDir> {
        let store = Self::resolve(given)?;
        if !store.is_default || store.holds(job) {
            return Ok(store);
        }
        Ok(match crate::slurm_store::find(job) {
            Some(found) => {
                cryo_core::say!("cryo: store {} ({})", found.path.display(), found.why);
                StoreDir {
                    path: found.path,
                    is_default: false,
                }
            }
            None => store,
        })
    }

    /// Whether the job `name` (as a command names it) is in this store.
    fn holds(&self, name: &str) -> bool {
        crate::slurm_store::holds(&self.path, &crate::job_name::named(&self.path, name))
    }

    /// Opens the existing store, saying when it is the default that is
    /// missing.
    pub fn open(&self) -> Result<cryo_core::store::Store> {
        cryo_core::store::Store::open(&self.path).with_context(|| {
            if self.is_default {
                format!(
                    "no store given, and none at the default {}",
                    self.describe()
                )
            } else {
                format!("opening the store {}", self.path.display())
            }
        })
    }

    fn resolve_in(given: Option<PathBuf>, cwd: &Path) -> StoreDir {
        match given {
            Some(path) => StoreDir {
                path: cwd.join(path),
                is_default: false,
            },
            None => StoreDir {
                path: cwd.join(DEFAULT_STORE_DIR),
                is_default: true,
            },
        }
    }

    /// Checks that the Slurm plugin's agents, which write where the job's
    /// `CRYO_STORE` says (`agents`: from `sbatch --cryo`), write to this
    /// store: another one named to `cryo run` alone would have every rank's
    /// part written where this coordinator never looks, and every
    /// checkpoint fail.
    pub fn check_plugin_agents(&self, agents: Option<&std::ffi::OsStr>) -> Result<()> {
        let Some(theirs) = agents else {
            return Ok(());
        };
        let cwd = std::env::current_dir().context("reading the working directory")?;
        let theirs = Self::resolve_in(Some(theirs.into()), &cwd).path;
        let same = |a: &Path, b: &Path| {
            a == b || (a.canonicalize().ok()).is_some_and(|a| b.canonicalize().ok() == Some(a))
        };
        if same(&theirs, &self.path) {
            return Ok(());
        }
        anyhow::bail!(
            "the store {} is not the one the Slurm plugin's agents write to ({}, from sbatch \
             --cryo or CRYO_STORE): every checkpoint would fail. Leave out --store, or submit \
             the job with --cryo={}",
            self.path.display(),
            theirs.display(),
            self.path.display()
        )
    }

    /// One line for people: where the store is, and why there.
    pub fn describe(&self) -> String {
        if self.is_default {
            format!(
                "{} (the default: {DEFAULT_STORE_DIR} in the working directory; choose another with --store or CRYO_STORE)",
                self.path.display()
            )
        } else {
            self.path.display().to_string()
        }
    }

    /// What a store that does not exist yet is about to make, for a
    /// mistyped path to show: the store itself, and any missing folders
    /// above it. `None` for a store that exists.
    pub fn newly_made(&self) -> Option<String> {
        if self.path.exists() {
            return None;
        }
        let missing: Vec<&Path> = self
            .path
            .ancestors()
            .skip(1)
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        Some(match missing.last() {
            None => "(new: it is created)".to_owned(),
            Some(top) => format!(
                "(new: it is created, with {} missing folder{} from {})",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                top.display()
            ),
        })
    }

    /// Why the store cannot hold checkpoints that other nodes restart
    /// from, if its filesystem says so.
    pub fn node_local_warning(&self) -> Option<String> {
        let probe = self
            .path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let fs = Filesystem::of(probe).ok()?;
        (fs.locality() == Locality::InMemory).then(|| {
            format!(
                "the store {} is in memory on this node ({}): other nodes cannot restart from it and it does not survive a reboot",
                self.path.display(),
                fs.name()
            )
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_store_other_than_the_plugin_agents_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = StoreDir::resolve_in(Some(dir.path().join("a")), Path::new("/"));
        ours.check_plugin_agents(None).unwrap();
        ours.check_plugin_agents(Some(dir.path().join("a").as_os_str()))
            .unwrap();
        let err = ours
            .check_plugin_agents(Some(dir.path().join("b").as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not the one the Slurm plugin's agents write to"),
            "{err}"
        );
    }

    #[test]
    fn a_given_store_wins_and_is_made_absolute() {
        let cwd = Path::new("/jobs/run1");
        let given = StoreDir::resolve_in(Some("ckpt".into()), cwd);
        assert_eq!(given.path, PathBuf::from("/jobs/run1/ckpt"));
        assert!(!given.is_default);
        let absolute = StoreDir::resolve_in(Some("/shared/s".into()), cwd);
        assert_eq!(absolute.path, PathBuf::from("/shared/s"));
    }

    #[test]
    fn the_default_is_in_the_working_directory_and_says_so() {
        let store = StoreDir::resolve_in(None, Path::new("/jobs/run1"));
        assert_eq!(store.path, PathBuf::from("/jobs/run1/cryo-store"));
        assert!(store.is_default);
        assert!(
            store.describe().contains("the default"),
            "{}",
            store.describe()
        );
    }

    #[test]
    fn a_new_store_says_which_folders_it_makes() {
        let dir = tempfile::tempdir().unwrap();
        let here = StoreDir::resolve_in(Some("store".into()), dir.path());
        assert_eq!(here.newly_made().as_deref(), Some("(new: it is created)"));
        let typo = StoreDir::resolve_in(Some("scrach/me/store".into()), dir.path());
        let said = typo.newly_made().unwrap();
        assert!(said.contains("2 missing folders"), "{said}");
        assert!(
            said.contains(&dir.path().join("scrach").display().to_string()),
            "{said}"
        );
        std::fs::create_dir(&here.path).unwrap();
        assert_eq!(here.newly_made(), None);
    }

    #[test]
    fn a_tmpfs_store_is_called_node_local() {
        assert!(Path::new("/dev/shm").exists(), "Linux mounts tmpfs here");
        let shm = StoreDir::resolve_in(Some("/dev/shm/cryo-store-test".into()), Path::new("/"));
        assert!(shm.node_local_warning().is_some());
        let here = StoreDir::resolve_in(None, Path::new(env!("CARGO_MANIFEST_DIR")));
        assert_eq!(
            here.node_local_warning(),
            None,
            "the source tree is on disk"
        );
    }
}
