//! The store of a Slurm job named by its id, when nobody names a store.
//!
//! An admin's `cryo preempt 7` or a user's `cryo status 7` from a login
//! node runs where the job's store is unknown: the default (`cryo-store`
//! in the working directory) is the job's only when typed from the job's
//! directory. The Slurm plugin's jobs keep their store in one of two
//! places nobody has to repeat: `cryo-store` in the job's working
//! directory (a bare `--cryo` without the site's `store=`), or the site's
//! `store=` in the plugin stack. Both are asked of Slurm (`scontrol`), and
//! the first that holds the job is its store. A store given to `sbatch
//! --cryo=DIR` is the job's own and must be named again (`--store DIR`).

use std::path::{Path, PathBuf};
use std::process::Command;

use cryo_core::store::Store;

/// Where a Slurm job's store was found, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The store.
    pub path: PathBuf,
    /// Why it is the job's, for people.
    pub why: &'static str,
}

/// The store holding `slurm-<id>` for the job `name` (an id, an array task
/// `ARRAY_TASK`, or `slurm-<id>`), among the places the Slurm plugin puts
/// a store. `None` when `name` is no Slurm job or none holds it.
pub fn find(name: &str) -> Option<Found> {
    let id = slurm_id(name)?;
    let job = format!("slurm-{id}");
    candidates(&ScontrolAsked, &id)
        .into_iter()
        .find(|found| holds(&found.path, &job))
}

/// Whether the store `store` holds the job `job`.
pub(crate) fn holds(store: &Path, job: &str) -> bool {
    Store::open(store).is_ok_and(|s| s.existing_job(job).is_ok())
}

/// The job id `name` stands for.
fn slurm_id(name: &str) -> Option<String> {
    let name = name.strip_prefix("slurm-").unwrap_or(name);
    if is_id(name) {
        return Some(name.to_owned());
    }
    crate::job_name::array_task_job_id(name)
}

fn is_id(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// What Slurm is asked: behind a trait, so the parsing is unit-tested.
trait Scontrol {
    /// `scontrol show job -o ID`.
    fn job(&self, id: &str) -> Option<String>;
    /// `scontrol show config`.
    fn config(&self) -> Option<String>;
}

struct ScontrolAsked;

impl Scontrol for ScontrolAsked {
    fn job(&self, id: &str) -> Option<String> {
        stdout(Command::new("scontrol").args(["show", "job", "-o", id]))
    }

    fn config(&self) -> Option<String> {
        stdout(Command::new("scontrol").args(["show", "config"]))
    }
}

fn stdout(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn candidates(slurm: &dyn Scontrol, id: &str) -> Vec<Found> {
    let mut found = Vec::new();
    if let Some(dir) = slurm.job(id).as_deref().and_then(|l| field(l, "WorkDir")) {
        found.push(Found {
            path: Path::new(&dir).join(crate::store_dir::DEFAULT_STORE_DIR),
            why: "cryo-store in the Slurm job's working directory",
        });
    }
    let plugstack = slurm.config().as_deref().and_then(plugstack_path);
    if let Some(store) = plugstack.and_then(|p| plugin_store(&p)) {
        found.push(Found {
            path: store,
            why: "the Slurm plugin's store= in the plugin stack",
        });
    }
    found
}

/// The value of `key` in a line of `scontrol show job -o`: up to the next
/// ` Key=` word, so that a path with spaces stays whole.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}=")).map(|i| i + key.len() + 2)?;
    let rest = &line[start..];
    let mut end = rest.len();
    for (i, _) in rest.match_indices(' ') {
        let word = &rest[i + 1..];
        let key_len = word.find('=').unwrap_or(0);
        let looks_like_key = key_len > 0
            && word[..key_len]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'/' || b == b':')
            && word.as_bytes()[0].is_ascii_uppercase();
        if looks_like_key {
            end = i;
            break;
        }
    }
    let value = rest[..end].trim_end();
    (!value.is_empty() && value != "(null)").then(|| value.to_owned())
}

/// `PlugStackConfig = PATH` of `scontrol show config`.
fn plugstack_path(config: &str) -> Option<PathBuf> {
    config.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "PlugStackConfig").then(|| PathBuf::from(value.trim()))
    })
}

/// The `store=` of cryo's plugin in the plugin stack `path`, following
/// its `include` lines (a `*` in the file name matches any text).
fn plugin_store(path: &Path) -> Option<PathBuf> {
    plugin_store_in(path, 0)
}

fn plugin_store_in(path: &Path, depth: u32) -> Option<PathBuf> {
    if depth > 4 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("include") => {
                for pattern in words {
                    for file in matching(Path::new(pattern)) {
                        if let Some(store) = plugin_store_in(&file, depth + 1) {
                            return Some(store);
                        }
                    }
                }
            }
            Some("required" | "optional") => {
                let plugin = words.next().unwrap_or("");
                if Path::new(plugin)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("spank_cryo"))
                {
                    return words
                        .filter_map(|w| w.strip_prefix("store="))
                        .map(PathBuf::from)
                        .find(|p| p.is_absolute());
                }
            }
            _ => {}
        }
    }
    None
}

/// The files `pattern` names: itself, or with a `*` in its file name, the
/// files of its directory that match, in name order.
fn matching(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((before, after)) = name.split_once('*') else {
        return vec![pattern.to_owned()];
    };
    let dir = pattern.parent().unwrap_or(Path::new("/"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= before.len() + after.len() && n.starts_with(before) && n.ends_with(after)
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Told {
        job: Option<String>,
        config: Option<String>,
    }

    impl Scontrol for Told {
        fn job(&self, _: &str) -> Option<String> {
            self.job.clone()
        }
        fn config(&self) -> Option<String> {
            self.config.clone()
        }
    }

    #[test]
    fn a_working_directory_with_spaces_stays_whole() {
        let line = "JobId=7 JobName=x UserId=u(1) WorkDir=/home/u/my runs/a StdErr=/x/err Power=";
        assert_eq!(field(line, "WorkDir").unwrap(), "/home/u/my runs/a");
        assert_eq!(field(line, "JobName").unwrap(), "x");
        assert_eq!(field(line, "Power"), None);
        assert_eq!(field(line, "Missing"), None);
    }

    #[test]
    fn the_plugin_store_is_found_through_includes() {
        let dir = tempfile::tempdir().unwrap();
        let included = dir.path().join("plugstack.conf.d");
        std::fs::create_dir(&included).unwrap();
        std::fs::write(included.join("a.conf"), "optional /x/other.so store=/no\n").unwrap();
        std::fs::write(
            included.join("cryo.conf"),
            "# cryo\nrequired /usr/lib/slurm/spank_cryo.so agent=/a store=/shared/cryo # site\n",
        )
        .unwrap();
        let top = dir.path().join("plugstack.conf");
        std::fs::write(&top, format!("include {}/*.conf\n", included.display())).unwrap();
        assert_eq!(plugin_store(&top).unwrap(), PathBuf::from("/shared/cryo"));
        // A plugin without store= names none.
        std::fs::write(&top, "required /usr/lib/spank_cryo.so\n").unwrap();
        assert_eq!(plugin_store(&top), None);
    }

    #[test]
    fn both_places_are_candidates_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let plugstack = dir.path().join("plugstack.conf");
        std::fs::write(&plugstack, "required /p/spank_cryo.so store=/site/cryo\n").unwrap();
        let told = Told {
            job: Some("JobId=7 WorkDir=/home/u/run StdIn=/dev/null".into()),
            config: Some(format!(
                "Configuration data as of x\nPlugStackConfig         = {}\nPluginDir = /p\n",
                plugstack.display()
            )),
        };
        let found: Vec<PathBuf> = candidates(&told, "7").into_iter().map(|f| f.path).collect();
        assert_eq!(
            found,
            vec![
                PathBuf::from("/home/u/run/cryo-store"),
                PathBuf::from("/site/cryo")
            ]
        );
        let none = Told {
            job: None,
            config: None,
        };
        assert!(candidates(&none, "7").is_empty());
    }

    #[test]
    fn only_slurm_names_are_looked_up() {
        assert_eq!(slurm_id("42").unwrap(), "42");
        assert_eq!(slurm_id("slurm-42").unwrap(), "42");
        assert_eq!(slurm_id("heat2d"), None);
        assert_eq!(slurm_id(""), None);
    }
}
