//! What a rank changes of its process after `cryo_init` beside memory and
//! files: environment variables, resource limits, the signals blocked in
//! the thread of the safe point, and signal dispositions
//! (`cryo_core::format::process_state`). A code that sets them once, on
//! its first run only (`if (!cryo_restored_epoch()) { setenv(...);
//! sigaction(...); }`), would otherwise run on after a restart without
//! them.
//!
//! [`Baseline::take`] records them at the end of `cryo_init`; at each
//! checkpoint [`changes`] finds what differs, saved as the region
//! `cryo:process-state` when anything does; a restart's `cryo_init` takes
//! its own baseline, then [`apply`]s the saved changes over it, so the
//! next checkpoint records them again. A handler is saved as the file that
//! holds its code and its offset there, found again in the restarted
//! process's mappings (its address moves with address-space layout
//! randomisation); one in memory no file backs (code made at run time) is
//! named at the checkpoint instead.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStringExt;

use cryo_core::format::manifest::{RankRecord, RegionKind};
use cryo_core::format::process_state::{
    signal_bit, EnvChange, Handler, LimitChange, ProcessState, ProcessStateError, MAX_SIGNAL,
    MAX_STATE_BYTES, RESOURCE_LIMITS,
};
use cryo_core::maps;
use cryo_core::store::JobStore;

use crate::error::RestoreError;

/// Variables that name the launcher's and the MPI library's view of one
/// run (its ports, ids and directories): a restart's own values stand.
const RUN_IDENTITY_PREFIXES: [&str; 11] = [
    "CRYO_", "PMI_", "PMIX_", "OMPI_", "OPAL_", "PRTE_", "ORTE_", "HYDRA_", "HYDI_", "SLURM_",
    "MPIR_",
];

/// The C library adds its own return trampoline to every handler.
const SA_RESTORER: u64 = 0x0400_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Action {
    handler: usize,
    flags: u64,
    mask: u64,
}

/// The process as `cryo_init` left it.
#[derive(Debug, Default)]
pub(crate) struct Baseline {
    env: BTreeMap<Vec<u8>, Vec<u8>>,
    limits: Vec<Option<(u64, u64)>>,
    blocked: u64,
    actions: BTreeMap<i32, Action>,
}

impl Baseline {
    /// Records the process as it is now.
    pub(crate) fn take() -> Baseline {
        Baseline {
            env: environment(),
            limits: (0..RESOURCE_LIMITS).map(limit).collect(),
            blocked: blocked_signals(),
            actions: signals()
                .filter_map(|s| action(s).map(|a| (s, a)))
                .collect(),
        }
    }
}

fn ours(name: &[u8]) -> bool {
    !RUN_IDENTITY_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix.as_bytes()))
}

fn environment() -> BTreeMap<Vec<u8>, Vec<u8>> {
    std::env::vars_os()
        .map(|(name, value)| (name.into_vec(), value.into_vec()))
        .filter(|(name, _)| ours(name))
        .collect()
}

fn limit(resource: u32) -> Option<(u64, u64)> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    let got = unsafe { libc::getrlimit(resource as _, &mut now) };
    (got == 0).then_some((now.rlim_cur, now.rlim_max))
}

/// Every signal a disposition can be set for.
fn signals() -> impl Iterator<Item = i32> {
    (1..=MAX_SIGNAL).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
}

fn mask_bits(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigismember only reads the set.
    signals()
        .filter(|&s| unsafe { libc::sigismember(set, s) } == 1)
        .fold(0, |bits, s| bits | signal_bit(s))
}

fn mask_set(bits: u64) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in signals().filter(|&s| bits & signal_bit(s) != 0) {
        // SAFETY: as above; a signal the C library keeps for itself is
        // refused (EINVAL) and left out.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

fn blocked_signals() -> u64 {
    // SAFETY: as in `mask_set`.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: with a null new set, pthread_sigmask only reads this thread's
    // mask into `set`.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set) } != 0 {
        return 0;
    }
    mask_bits(&set)
}

fn action(signal: i32) -> Option<Action> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: with a null new action, sigaction only reads the signal's
    // disposition into `old`; the C library's own signals fail (EINVAL).
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
        return None;
    }
    Some(Action {
        handler: old.sa_sigaction,
        flags: u64::from(u32::from_ne_bytes(old.sa_flags.to_ne_bytes())) & !SA_RESTORER,
        mask: mask_bits(&old.sa_mask),
    })
}

/// A signal's name for people (`SIGUSR1`, `SIGRTMIN+3`).
fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(known) => known.as_str().to_owned(),
        Err(_) => format!("SIGRTMIN+{}", signal - libc::SIGRTMIN()),
    }
}

/// Whether `file` is a Python interpreter or its library: the C handler
/// there only trips a flag that calls the Python function, which a new
/// interpreter does not have (set again alone, it would swallow the
/// signal).
fn is_python(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    name.starts_with("libpython") || name.starts_with("python")
}

/// What differs from `base` now, and a line for each change a restart
/// cannot make again.
pub(crate) fn changes(base: &Baseline) -> (ProcessState, Vec<String>) {
    let mut state = ProcessState::default();
    let mut warnings = Vec::new();
    let env = environment();
    for (name, value) in &env {
        if base.env.get(name) != Some(value) {
            state.env.push(EnvChange {
                name: name.clone(),
                value: Some(value.clone()),
            });
        }
    }
    for name in base.env.keys().filter(|name| !env.contains_key(*name)) {
        state.env.push(EnvChange {
            name: name.clone(),
            value: None,
        });
    }
    for resource in 0..RESOURCE_LIMITS {
        let was = base.limits.get(resource as usize).copied().flatten();
        if let Some((soft, hard)) = limit(resource).filter(|now| was != Some(*now)) {
            state.limits.push(LimitChange {
                resource,
                soft,
                hard,
            });
        }
    }
    let blocked = blocked_signals();
    (state.blocked, state.unblocked) = (blocked & !base.blocked, base.blocked & !blocked);
    // Read only when a handler changed: this runs while the rank is parked.
    let mut maps_text: Option<String> = None;
    for signal in signals() {
        let Some(now) = action(signal).filter(|now| base.actions.get(&signal) != Some(now)) else {
            continue;
        };
        let maps_text = maps_text
            .get_or_insert_with(|| std::fs::read_to_string("/proc/self/maps").unwrap_or_default());
        let handler = match now.handler {
            libc::SIG_DFL => Handler::Default,
            libc::SIG_IGN => Handler::Ignore,
            addr => {
                let addr = addr as u64;
                let found = maps::lines(maps_text).find(|line| line.overlaps(addr, addr + 1));
                match found.and_then(|line| line.file().map(|file| (line, file))) {
                    Some((_, file)) if is_python(file) => {
                        warnings.push(format!(
                            "the handler of {} set after cryo_init is Python's (signal.signal), \
                             whose function is an object of this interpreter: a restart does not \
                             set it again; set it on every start",
                            signal_name(signal)
                        ));
                        continue;
                    }
                    Some((line, file)) => Handler::At {
                        file: file.to_owned(),
                        offset: addr - line.start + line.offset,
                    },
                    None => {
                        warnings.push(format!(
                            "the handler of {} set after cryo_init is at {addr:#x} in {}, which \
                             no file holds: a restart cannot set it again",
                            signal_name(signal),
                            found.map_or("unmapped memory", |line| line.what())
                        ));
                        continue;
                    }
                }
            }
        };
        state
            .actions
            .push(cryo_core::format::process_state::SignalAction {
                signal,
                handler,
                flags: now.flags,
                mask: now.mask,
            });
    }
    (state, warnings)
}

/// The changes a restart's `record` saved (none before format 2.8, or when
/// nothing changed).
pub(crate) fn load(record: &RankRecord, store: &JobStore) -> Result<ProcessState, RestoreError> {
    let rank = record.rank;
    let Some(region) = (record.regions.iter()).find(|r| matches!(r.kind, RegionKind::ProcessState))
    else {
        return Ok(ProcessState::default());
    };
    if region.len > MAX_STATE_BYTES {
        return Err(RestoreError::ProcessState {
            rank,
            source: ProcessStateError::TooLong(region.len),
        });
    }
    let mut bytes = vec![0u8; usize::try_from(region.len).unwrap_or(0)];
    crate::restore_threads::restore(|| store.restore_region(region, &mut bytes)).map_err(
        |source| RestoreError::Contents {
            rank,
            what: "the record of the process's environment, limits and signals".into(),
            source,
        },
    )?;
    ProcessState::decode(&bytes).map_err(|source| RestoreError::ProcessState { rank, source })
}

/// Whether `file` was modified after `unix_ms` (a program rebuilt since
/// the checkpoint: its functions may be at other offsets).
fn changed_since(file: &str, unix_ms: u64) -> bool {
    std::fs::metadata(file)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
        .is_some_and(|modified| modified.as_millis() > u128::from(unix_ms))
}

/// Makes the changes of `state`, saved by a checkpoint taken at
/// `taken_unix_ms`, in this process, over what its own start set; a line
/// for each one it could not make.
pub(crate) fn apply(state: &ProcessState, taken_unix_ms: u64) -> Vec<String> {
    let mut failed = Vec::new();
    for change in &state.env {
        let Ok(name) = CString::new(change.name.clone()) else {
            continue;
        };
        let done = match &change.value {
            Some(value) => match CString::new(value.clone()) {
                // SAFETY: both strings are NUL-terminated; setenv copies
                // them. cryo_init runs before the application's threads
                // read the environment.
                Ok(value) => (unsafe { libc::setenv(name.as_ptr(), value.as_ptr(), 1) }) == 0,
                Err(_) => false,
            },
            // SAFETY: as above.
            None => (unsafe { libc::unsetenv(name.as_ptr()) }) == 0,
        };
        if !done {
            failed.push(format!(
                "the environment variable {} could not be set again",
                String::from_utf8_lossy(&change.name)
            ));
        }
    }
    for change in &state.limits {
        let wanted = libc::rlimit {
            rlim_cur: change.soft,
            rlim_max: change.hard,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(change.resource as _, &wanted) } != 0 {
            failed.push(format!(
                "resource limit {} could not be set back to {} (soft) and {} (hard): {}",
                change.resource,
                change.soft,
                change.hard,
                std::io::Error::last_os_error()
            ));
        }
    }
    for (how, bits) in [
        (libc::SIG_BLOCK, state.blocked),
        (libc::SIG_UNBLOCK, state.unblocked),
    ] {
        if bits != 0 {
            let set = mask_set(bits);
            // SAFETY: `set` is a valid sigset_t; this changes only this
            // thread's mask, the thread that calls cryo_init.
            unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
        }
    }
    // Read once, and only when a handler is to be found in it.
    let mut maps_text: Option<String> = None;
    for action in &state.actions {
        if let Handler::At { file, .. } = &action.handler {
            if changed_since(file, taken_unix_ms) {
                // The offset would now land anywhere in its code.
                failed.push(format!(
                    "the handler of {} is in {file}, which was changed after the checkpoint \
                     (rebuilt?): it is not set again",
                    signal_name(action.signal)
                ));
                continue;
            }
        }
        let handler = match &action.handler {
            Handler::Default => Some(libc::SIG_DFL),
            Handler::Ignore => Some(libc::SIG_IGN),
            Handler::At { file, offset } => maps::lines(maps_text.get_or_insert_with(|| {
                std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
            }))
            .find(|line| {
                line.file() == Some(file.as_str())
                    && (line.offset..line.offset + (line.end - line.start)).contains(offset)
            })
            .and_then(|line| usize::try_from(line.start + offset - line.offset).ok()),
        };
        let Some(handler) = handler else {
            failed.push(format!(
                "the handler of {} is in {}, which this process has not mapped (yet): it is not \
                 set again",
                signal_name(action.signal),
                match &action.handler {
                    Handler::At { file, .. } => file.as_str(),
                    _ => "?",
                }
            ));
            continue;
        };
        // SAFETY: sigaction is plain data; zeroed is a valid empty value.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = handler;
        let flags = u32::try_from(action.flags & !SA_RESTORER).unwrap_or(0);
        new.sa_flags = i32::from_ne_bytes(flags.to_ne_bytes());
        new.sa_mask = mask_set(action.mask);
        // SAFETY: the handler is SIG_DFL, SIG_IGN, or the same function of
        // the same file as at the checkpoint, at its address in this
        // process; the C library adds its own restorer.
        if unsafe { libc::sigaction(action.signal, &new, std::ptr::null_mut()) } != 0 {
            failed.push(format!(
                "the disposition of {} could not be set again: {}",
                signal_name(action.signal),
                std::io::Error::last_os_error()
            ));
        }
    }
    failed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    extern "C" fn on_signal(_: libc::c_int) {}

    /// One test, as it changes this process's environment and signals.
    #[test]
    fn python_is_told_by_its_file() {
        assert!(is_python("/usr/bin/python3.11"));
        assert!(is_python("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"));
        assert!(!is_python("/scratch/app"));
    }

    #[test]
    fn changes_after_the_baseline_are_found_and_made_again() {
        let base = Baseline::take();
        // SAFETY: the test's own process; nothing else reads these.
        unsafe {
            libc::setenv(c"CRYO_TEST_NOT_SAVED".as_ptr(), c"1".as_ptr(), 1);
            libc::setenv(c"APP_SCALE_FOR_TEST".as_ptr(), c"7".as_ptr(), 1);
            libc::signal(libc::SIGUSR2, on_signal as *const () as usize);
            libc::signal(libc::SIGURG, libc::SIG_IGN);
        }
        let (state, warnings) = changes(&base);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            state.env,
            vec![EnvChange {
                name: b"APP_SCALE_FOR_TEST".to_vec(),
                value: Some(b"7".to_vec()),
            }]
        );
        let usr2 = state.actions.iter().find(|a| a.signal == libc::SIGUSR2);
        assert!(
            matches!(&usr2.unwrap().handler, Handler::At { file, .. } if file.starts_with('/')),
            "{usr2:?}"
        );
        let urg = state.actions.iter().find(|a| a.signal == libc::SIGURG);
        assert_eq!(urg.unwrap().handler, Handler::Ignore);
        // As a restart would find the process: without them.
        // SAFETY: as above.
        unsafe {
            libc::unsetenv(c"APP_SCALE_FOR_TEST".as_ptr());
            libc::signal(libc::SIGUSR2, libc::SIG_DFL);
            libc::signal(libc::SIGURG, libc::SIG_DFL);
        }
        // A checkpoint taken before the test binary was built would see it
        // changed since: the handler is then not set again.
        let rebuilt = apply(&state, 0);
        assert!(
            rebuilt
                .iter()
                .any(|f| f.contains("SIGUSR2") && f.contains("changed after the checkpoint")),
            "{rebuilt:?}"
        );
        assert_eq!(action(libc::SIGUSR2).unwrap().handler, libc::SIG_DFL);
        assert!(apply(&state, u64::MAX).is_empty());
        assert_eq!(std::env::var("APP_SCALE_FOR_TEST").unwrap(), "7");
        assert_eq!(
            action(libc::SIGUSR2).unwrap().handler,
            on_signal as *const () as usize
        );
        assert_eq!(action(libc::SIGURG).unwrap().handler, libc::SIG_IGN);
        // A handler in a file this process does not map is named.
        let mut elsewhere = state.clone();
        elsewhere.env.clear();
        for a in &mut elsewhere.actions {
            a.handler = Handler::At {
                file: "/nonexistent/libgone.so".into(),
                offset: 0,
            };
        }
        let failed = apply(&elsewhere, u64::MAX);
        assert!(
            failed
                .iter()
                .any(|f| f.contains("SIGUSR2") && f.contains("libgone.so")),
            "{failed:?}"
        );
    }
}
