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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryo_core::env::{ENV_JOB, ENV_PREFETCH, ENV_RESTART_FROM, ENV_STORE};
use cryo_core::format::manifest::Manifest;
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

/// The manifest the prefetch loaded, handed to the restore so that a rank
/// parses it once (it lists every rank of the job).
struct Handoff {
    /// Epoch, store and job it is of.
    key: (u64, String, String),
    manifest: Mutex<Loaded>,
    ready: Condvar,
}

enum Loaded {
    Pending,
    Ready(Box<Manifest>),
    Gone,
}

impl Handoff {
    fn set(&self, loaded: Loaded) {
        *self
            .manifest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        self.ready.notify_all();
    }
}

struct Prefetch {
    handoff: Arc<Handoff>,
    epoch: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<PrefetchStatus>>>,
    finished: Mutex<Option<PrefetchStatus>>,
}

static PREFETCH: OnceLock<Prefetch> = OnceLock::new();

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

/// Starts the prefetch if the environment asks for one; once per process.
fn turned_off() -> bool {
    var(ENV_PREFETCH).is_some_and(|v| matches!(v.trim(), "0" | "off" | "no" | "false"))
}

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
    start(epoch, store, job, rank);
}

/// Starts the prefetch of `rank`'s chunks of `epoch`, unless one was
/// started already (once per process).
pub(crate) fn start(epoch: u64, store: String, job: String, rank: u32) {
    let _ = PREFETCH.get_or_init(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = Arc::clone(&stop);
        let started = Instant::now();
        let handoff = Arc::new(Handoff {
            key: (epoch, store.clone(), job.clone()),
            manifest: Mutex::new(Loaded::Pending),
            ready: Condvar::new(),
        });
        let handing = Arc::clone(&handoff);
        let thread = std::thread::Builder::new()
            .name("cryo-prefetch".into())
            .spawn(move || {
                let status = run(epoch, &store, &job, rank, &stopper, started, &handing);
                // Whatever happened, nobody waits for a manifest any more.
                let mut loaded = handing
                    .manifest
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if matches!(*loaded, Loaded::Pending) {
                    *loaded = Loaded::Gone;
                }
                drop(loaded);
                handing.ready.notify_all();
                status
            })
            .ok();
        if thread.is_none() {
            handoff.set(Loaded::Gone);
        }
        Prefetch {
            handoff,
            epoch,
            started,
            stop,
            thread: Mutex::new(thread),
            finished: Mutex::new(None),
        }
    });
}

fn run(
    epoch: u64,
    store: &str,
    job: &str,
    rank: u32,
    stop: &AtomicBool,
    started: Instant,
    handoff: &Handoff,
) -> PrefetchStatus {
    let (job, plan) = match plan(epoch, store, job, rank, handoff, stop) {
        Ok(planned) => planned,
        Err(why) => return PrefetchStatus::Failed { epoch, why },
    };
    let report = job.prefetch(&plan, THREADS, stop);
    PrefetchStatus::Done {
        epoch,
        planned: plan.pack_bytes(),
        report,
        took: started.elapsed(),
    }
}

fn open(store: &str, job: &str) -> Result<JobStore, String> {
    let job = Store::open(store)
        .and_then(|store| store.existing_job(job))
        .map_err(|err| err.to_string())?;
    // Another user's job directory is not read, as the restore would not.
    cryo_core::store::durable::check_private_dir(job.dir()).map_err(|err| err.to_string())?;
    Ok(job)
}

fn plan(
    epoch: u64,
    store: &str,
    job: &str,
    rank: u32,
    handoff: &Handoff,
    stop: &AtomicBool,
) -> Result<(JobStore, PrefetchPlan), String> {
    let job = open(store, job)?;
    let manifest = job.load_manifest(epoch).map_err(|err| err.to_string())?;
    let plan = manifest
        .ranks
        .iter()
        .find(|r| r.rank == rank)
        .map(PrefetchPlan::for_rank);
    // Not kept for a rank that was told it starts afresh meanwhile.
    handoff.set(if stop.load(Ordering::Relaxed) {
        Loaded::Gone
    } else {
        Loaded::Ready(Box::new(manifest))
    });
    let plan = plan.ok_or_else(|| format!("epoch {epoch} has no rank {rank}"))?;
    Ok((job, plan))
}

/// The manifest of `epoch` of `job` in `store` if the prefetch loads it
/// (waiting until it has), for the restore to use instead of loading it
/// again; `None` if the prefetch reads another epoch or failed to load it.
pub(crate) fn take_manifest(epoch: u64, store: &str, job: &str) -> Option<Manifest> {
    let handoff = &PREFETCH.get()?.handoff;
    if handoff.key != (epoch, store.to_owned(), job.to_owned()) {
        return None;
    }
    let mut loaded = handoff
        .manifest
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while matches!(*loaded, Loaded::Pending) {
        loaded = handoff
            .ready
            .wait(loaded)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    match std::mem::replace(&mut *loaded, Loaded::Gone) {
        Loaded::Ready(manifest) => Some(*manifest),
        Loaded::Pending | Loaded::Gone => None,
    }
}

/// Where this process's prefetch is, without waiting for it.
pub fn prefetch_status() -> PrefetchStatus {
    let Some(prefetch) = PREFETCH.get() else {
        return PrefetchStatus::NotStarted;
    };
    let mut finished = prefetch
        .finished
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(status) = finished.as_ref() {
        return status.clone();
    }
    let mut thread = prefetch
        .thread
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match thread.take() {
        Some(handle) if handle.is_finished() => {
            let status = handle.join().unwrap_or_else(|_| PrefetchStatus::Failed {
                epoch: prefetch.epoch,
                why: "the prefetch thread panicked".into(),
            });
            *finished = Some(status.clone());
            status
        }
        Some(handle) => {
            *thread = Some(handle);
            PrefetchStatus::Running {
                epoch: prefetch.epoch,
                elapsed: prefetch.started.elapsed(),
            }
        }
        None => PrefetchStatus::Failed {
            epoch: prefetch.epoch,
            why: "the prefetch thread could not be started".into(),
        },
    }
}

/// Stops a running prefetch (at its next request of at most 64 MiB): the
/// rank is leaving, or it does not restart after all.
pub(crate) fn stop() {
    if let Some(prefetch) = PREFETCH.get() {
        prefetch.stop.store(true, Ordering::Relaxed);
    }
}

/// The agent says this rank starts afresh, whatever the environment hinted:
/// stop reading and free the manifest (it lists every rank of the job).
pub(crate) fn discard() {
    stop();
    if let Some(prefetch) = PREFETCH.get() {
        let mut loaded = prefetch
            .handoff
            .manifest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if matches!(*loaded, Loaded::Ready(_)) {
            *loaded = Loaded::Gone;
        }
    }
}

/// Logs where the prefetch stands as the restore of `epoch` begins, and
/// starts one now if none was (the library was loaded after `MPI_Init`, as
/// Python loads it, or the launcher did not pass the hint): the regions
/// are restored one by one as the application maps them, and the kernel's
/// reads run ahead of them.
pub(crate) fn at_restore(job: &str, rank: u32, epoch: u64, store: &str) {
    let status = prefetch_status();
    if status == PrefetchStatus::NotStarted && !turned_off() {
        start(epoch, store.to_owned(), job.to_owned(), rank);
    }
    match status {
        PrefetchStatus::NotStarted => {
            tracing::debug!(job = %job, rank, epoch, "restart.prefetch_started_at_restore");
        }
        PrefetchStatus::Running {
            epoch: read,
            elapsed,
        } => tracing::info!(
            job = %job, rank, epoch, prefetching = read,
            ms = elapsed.as_secs_f64() * 1e3,
            "restart.prefetch_running"
        ),
        PrefetchStatus::Done {
            epoch: read,
            planned,
            report,
            took,
        } => tracing::info!(
            job = %job, rank, epoch, prefetched = read, planned,
            bytes = report.bytes, failed = report.failed,
            ms = took.as_secs_f64() * 1e3,
            "restart.prefetch_done"
        ),
        PrefetchStatus::Failed { epoch: read, why } => {
            tracing::info!(job = %job, rank, epoch, prefetching = read, why = %why, "restart.prefetch_failed");
        }
    }
}
