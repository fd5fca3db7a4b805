//! Reads a restarting rank's chunks from the store while the process
//! starts.
//!
//! A restarted rank spends its first moments in the launcher, the dynamic
//! loader and `MPI_Init`, waiting on other processes, before `cryo_init`
//! learns from the agent that it restarts and reads its state. On a cold
//! parallel filesystem that read is most of the restart. So when the
//! library is loaded (an ELF constructor, before `main`), and the launcher's
//! environment says that the job restarts (`CRYO_RESTART_FROM`,
//! `CRYO_STORE` and `CRYO_JOB`, which `cryo run` and `cryo restart` set)
//! and which rank this process is (`CRYO_RANK`, `PMI_RANK`,
//! `OMPI_COMM_WORLD_RANK`, `PMIX_RANK` or `SLURM_PROCID`), a thread asks
//! the kernel to read this rank's chunks into the page cache
//! (`cryo_core::store::prefetch`). The restore later decodes them from
//! memory.
//!
//! The environment is only a hint: the agent still says what to restore,
//! the restore reads and verifies everything itself, and a prefetch that
//! fails or guessed wrong costs reads, never correctness. `CRYO_PREFETCH=0`
//! turns it off.
//!
//! While `cryo_init` puts the application's files and mappings back, no
//! prefetch runs: a file it opened, even for a moment, could hold the very
//! fd number or address a restored one needs. So the restore stops it
//! first ([`pause`], which also takes the manifest it parsed), and resumes
//! it for what is left once they are back ([`resume`]); if none ran, that
//! is where it starts. Its files are opened through [`RuntimeFs`]: high fd
//! numbers, named as the runtime's at a checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryo_core::env::{ENV_JOB, ENV_PREFETCH, ENV_RESTART_FROM, ENV_STORE};
use cryo_core::format::manifest::{Manifest, RankRecord};
use cryo_core::store::prefetch::{PrefetchPlan, PrefetchReport};
use cryo_core::store::{JobStore, Store};

/// Threads one rank makes its requests on: a request may wait for room in
/// the device's queue, and a second one keeps another pack's going.
const THREADS: usize = 2;

/// Where a prefetch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefetchStatus {
    /// None was started: not a restart, turned off, or no rank number.
    NotStarted,
    /// Still making its requests.
    Running {
        /// The epoch it reads.
        epoch: u64,
        /// Since its start.
        elapsed: Duration,
    },
    /// Done.
    Done {
        /// The epoch it read.
        epoch: u64,
        /// Bytes of packs it planned to ask for.
        planned: u64,
        /// What it asked for.
        report: PrefetchReport,
        /// How long its requests took (the kernel may still be reading).
        took: Duration,
    },
    /// It could not plan: the store, the job or the epoch could not be read
    /// (the restore then says why, if it is asked for at all).
    Failed {
        /// The epoch it tried.
        epoch: u64,
        /// Why, for people.
        why: String,
    },
}

impl std::fmt::Display for PrefetchStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefetchStatus::NotStarted => f.write_str("none"),
            PrefetchStatus::Running { epoch, elapsed } => write!(
                f,
                "epoch {epoch} still asking after {} ms",
                elapsed.as_millis()
            ),
            PrefetchStatus::Done {
                epoch,
                planned,
                report,
                took,
            } => write!(
                f,
                "epoch {epoch}: asked for {} of {planned} bytes in {} ms ({} requests, {} failed{})",
                report.bytes,
                took.as_millis(),
                report.reads,
                report.failed,
                if report.stopped { ", stopped" } else { "" }
            ),
            PrefetchStatus::Failed { epoch, why } => write!(f, "epoch {epoch} failed: {why}"),
        }
    }
}

/// What one thread of the prefetch did, or all of them so far.
struct Outcome {
    /// The manifest it parsed, for the restore.
    manifest: Option<Manifest>,
    /// What is left to ask for.
    rest: Option<PrefetchPlan>,
    /// Bytes of packs planned.
    planned: u64,
    report: PrefetchReport,
    failed: Option<String>,
}

impl Outcome {
    fn nothing() -> Outcome {
        Outcome {
            manifest: None,
            rest: None,
            planned: 0,
            report: PrefetchReport::default(),
            failed: None,
        }
    }

    /// Takes in what a later thread did: its requests add to these, and
    /// what it left (or its failure) is what is left now.
    fn absorb(&mut self, later: Outcome) {
        if later.manifest.is_some() {
            self.manifest = later.manifest;
        }
        if later.planned > 0 {
            self.planned = later.planned;
        }
        self.rest = later.rest;
        self.report.add(&later.report);
        self.failed = later.failed;
    }
}

struct Prefetch {
    /// Epoch, store and job it reads.
    key: (u64, String, String),
    started: Instant,
    stop: Arc<AtomicBool>,
    /// The thread, which returns what it did and when it finished.
    thread: Option<JoinHandle<(Outcome, Instant)>>,
    /// What its threads did so far.
    done: Outcome,
    /// From the start to the end of the last thread joined (not to the
    /// join, which may come much later).
    took: Duration,
}

impl Prefetch {
    fn new(key: (u64, String, String)) -> Prefetch {
        Prefetch {
            key,
            started: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            done: Outcome::nothing(),
            took: Duration::ZERO,
        }
    }

    /// Waits for the thread, if any, and takes in what it did.
    fn join(&mut self) {
        let Some(handle) = self.thread.take() else {
            return;
        };
        let (outcome, finished) = handle.join().unwrap_or_else(|_| {
            let failed = Outcome {
                failed: Some("the prefetch thread panicked".into()),
                ..Outcome::nothing()
            };
            (failed, Instant::now())
        });
        self.done.absorb(outcome);
        self.took = finished.saturating_duration_since(self.started);
    }

    /// Runs `work` on a thread of its own.
    fn spawn(&mut self, work: impl FnOnce(&AtomicBool) -> Outcome + Send + 'static) {
        self.stop = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&self.stop);
        self.thread = std::thread::Builder::new()
            .name("cryo-prefetch".into())
            .spawn(move || {
                crate::quiet_thread::block_signals();
                (work(&stop), Instant::now())
            })
            .ok();
        if self.thread.is_none() {
            self.done.failed = Some("the prefetch thread could not be started".into());
        }
    }
}

static PREFETCH: Mutex<Option<Prefetch>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<Prefetch>> {
    PREFETCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs when the library is loaded, before `main` (and before `MPI_Init`).
// The `.init_array` entry is the ELF constructor mechanism; the function
// catches every panic, as nothing may unwind out of it.
#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

extern "C" fn at_load() {
    let _ = std::panic::catch_unwind(start_from_env);
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn turned_off() -> bool {
    var(ENV_PREFETCH).is_some_and(|v| matches!(v.trim(), "0" | "off" | "no" | "false"))
}

/// Starts the prefetch if the launcher's environment names a restart.
pub(crate) fn start_from_env() {
    if turned_off() {
        return;
    }
    let (Some(epoch), Some(store), Some(job), Some((_, rank))) = (
        var(ENV_RESTART_FROM).and_then(|e| e.trim().parse::<u64>().ok()),
        var(ENV_STORE),
        var(ENV_JOB),
        crate::runtime::rank_from_env(),
    ) else {
        return;
    };
    let Ok(rank) = rank.trim().parse::<u32>() else {
        return;
    };
    let mut state = state();
    if state.is_some() {
        return;
    }
    let mut prefetch = Prefetch::new((epoch, store.clone(), job.clone()));
    prefetch.spawn(move |stop| from_the_start(epoch, &store, &job, rank, stop));
    *state = Some(prefetch);
}

/// The whole prefetch: the manifest, the plan, the requests.
fn from_the_start(epoch: u64, store: &str, job: &str, rank: u32, stop: &AtomicBool) -> Outcome {
    let mut outcome = Outcome::nothing();
    let job = match open(store, job) {
        Ok(job) => job,
        Err(why) => {
            outcome.failed = Some(why);
            return outcome;
        }
    };
    let manifest = match job.load_manifest(epoch) {
        Ok(manifest) => manifest,
        Err(err) => {
            outcome.failed = Some(err.to_string());
            return outcome;
        }
    };
    match manifest.ranks.iter().find(|r| r.rank == rank) {
        Some(record) => {
            let plan = PrefetchPlan::for_rank(record);
            outcome.planned = plan.pack_bytes();
            outcome.report = job.prefetch(&plan, THREADS, stop);
            outcome.rest = Some(plan.rest_after(outcome.report.done()));
        }
        None => outcome.failed = Some(format!("epoch {epoch} has no rank {rank}")),
    }
    outcome.manifest = Some(manifest);
    outcome
}

fn open(store: &str, job: &str) -> Result<JobStore, String> {
    let job = Store::open_with_fs(store, crate::store_fds::RuntimeFs::shared())
        .and_then(|store| store.existing_job(job))
        .map_err(|err| err.to_string())?;
    // Another user's job directory is not read, as the restore would not.
    cryo_core::store::durable::check_private_dir(job.dir()).map_err(|err| err.to_string())?;
    Ok(job)
}

/// Stops the prefetch before the restore puts files and mappings back, and
/// hands over the manifest of `epoch` of `job` in `store` if it parsed it
/// (waiting for that, rather than parsing it twice).
pub(crate) fn pause(epoch: u64, store: &str, job: &str) -> Option<Manifest> {
    let mut state = state();
    let prefetch = state.as_mut()?;
    prefetch.stop.store(true, Ordering::Relaxed);
    prefetch.join();
    if prefetch.key == (epoch, store.to_owned(), job.to_owned()) {
        prefetch.done.manifest.take()
    } else {
        None
    }
}

/// Resumes the prefetch once the files and mappings are back, for what is
/// left of `record`'s chunks of `epoch`; starts it if none ran, or if the
/// one that ran read another epoch than the agent restores.
pub(crate) fn resume(epoch: u64, store: &str, job: &str, record: &RankRecord) {
    if turned_off() {
        return;
    }
    let key = (epoch, store.to_owned(), job.to_owned());
    let mut state = state();
    let prefetch = match state.as_mut() {
        Some(prefetch) if prefetch.key == key && prefetch.done.failed.is_none() => prefetch,
        _ => {
            let mut fresh = Prefetch::new(key);
            let plan = PrefetchPlan::for_rank(record);
            fresh.done.planned = plan.pack_bytes();
            fresh.done.rest = Some(plan);
            state.insert(fresh)
        }
    };
    prefetch.done.manifest = None;
    let Some(rest) = prefetch.done.rest.take().filter(|rest| !rest.is_empty()) else {
        return;
    };
    let (store, job) = (store.to_owned(), job.to_owned());
    prefetch.spawn(move |stop| {
        let mut outcome = Outcome::nothing();
        match open(&store, &job) {
            Ok(job) => {
                outcome.report = job.prefetch(&rest, THREADS, stop);
                outcome.rest = Some(rest.rest_after(outcome.report.done()));
            }
            Err(why) => outcome.failed = Some(why),
        }
        outcome
    });
}

/// Where this process's prefetch is, without waiting for it.
pub fn prefetch_status() -> PrefetchStatus {
    let mut state = state();
    let Some(prefetch) = state.as_mut() else {
        return PrefetchStatus::NotStarted;
    };
    if prefetch.thread.as_ref().is_some_and(|t| !t.is_finished()) {
        return PrefetchStatus::Running {
            epoch: prefetch.key.0,
            elapsed: prefetch.started.elapsed(),
        };
    }
    prefetch.join();
    match &prefetch.done.failed {
        Some(why) => PrefetchStatus::Failed {
            epoch: prefetch.key.0,
            why: why.clone(),
        },
        None => PrefetchStatus::Done {
            epoch: prefetch.key.0,
            planned: prefetch.done.planned,
            report: prefetch.done.report,
            took: prefetch.took,
        },
    }
}

/// Stops a running prefetch (at its next request of at most 64 MiB): the
/// rank is leaving.
pub(crate) fn stop() {
    if let Some(prefetch) = state().as_ref() {
        prefetch.stop.store(true, Ordering::Relaxed);
    }
}

/// The agent says this rank starts afresh, whatever the environment hinted:
/// stop, and free what the prefetch holds (the manifest lists every rank).
pub(crate) fn discard() {
    let mut state = state();
    if let Some(prefetch) = state.as_mut() {
        prefetch.stop.store(true, Ordering::Relaxed);
        prefetch.join();
    }
    *state = None;
}
