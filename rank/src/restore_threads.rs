//! How many threads a restarting rank decodes its regions, mappings and
//! files with: `CRYO_RESTORE_THREADS`, or by default its share of the
//! node's cores.
//!
//! Every rank of a node restarts at once, so a rank that is not bound to
//! some of the cores takes the cores it sees divided by the ranks the
//! launcher says share the node (Hydra's `MPI_LOCALNRANKS`, Open MPI's
//! `OMPI_COMM_WORLD_LOCAL_SIZE`, srun's `SLURM_STEP_TASKS_PER_NODE`): 128
//! ranks of a 128-core node would otherwise start 16,384 threads. A rank
//! bound to fewer cores than the node has (srun's or mpirun's binding)
//! already sees its share and uses it all; so does a rank whose launcher
//! says nothing (rayon's pool). The variable overrides both, and lets a
//! benchmark show how the restart scales with threads.

use std::sync::OnceLock;

use cryo_core::env::ENV_RESTORE_THREADS;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// Runs `restore` with the restore threads: rayon work inside it (the
/// store's parallel decode) runs on them.
fn install<R: Send>(restore: impl FnOnce() -> R + Send) -> R {
    match POOL.get_or_init(build) {
        Some(pool) => pool.install(restore),
        None => restore(),
    }
}

/// Runs a restore on the restore threads, then frees the read buffers it
/// left on them (and on this thread): the memory is the application's.
pub(crate) fn restore<R: Send>(restore: impl FnOnce() -> R + Send) -> R {
    install(|| {
        let result = restore();
        cryo_core::store::reader::release_read_buffers();
        result
    })
}

fn build() -> Option<rayon::ThreadPool> {
    let threads = match std::env::var(ENV_RESTORE_THREADS) {
        Ok(value) => match parse(&value) {
            Ok(threads) => threads,
            Err(why) => {
                tracing::warn!(value = %value, why, "{ENV_RESTORE_THREADS} ignored");
                share_of_node()?
            }
        },
        Err(_) => share_of_node()?,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cryo-restore-{i}"))
        // The pool lives as long as the process.
        .start_handler(|_| crate::quiet_thread::block_signals())
        .build()
        .inspect_err(|err| tracing::warn!(error = %err, "no restore thread pool; using rayon's"))
        .ok()
}

/// This rank's share of the node's cores, when it sees every core and the
/// launcher says how many ranks share the node; `None` otherwise.
fn share_of_node() -> Option<usize> {
    let visible = std::thread::available_parallelism().ok()?.get();
    // SAFETY: sysconf only reads a system value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let var = |name: &str| std::env::var(name).ok();
    let local = local_ranks(&var)?;
    share(visible, usize::try_from(online).ok()?, local)
}

/// `visible` cores divided among `local` ranks, unless the rank is bound to
/// fewer than the `online` cores (it sees its share already) or is alone.
fn share(visible: usize, online: usize, local: usize) -> Option<usize> {
    (visible >= online && local > 1).then(|| (visible / local).max(1))
}

/// How many ranks share this rank's node, as its launcher says.
fn local_ranks(var: &dyn Fn(&str) -> Option<String>) -> Option<usize> {
    let count = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    count("MPI_LOCALNRANKS")
        .or_else(|| count("OMPI_COMM_WORLD_LOCAL_SIZE"))
        .or_else(|| {
            let node = count("SLURM_NODEID")?;
            slurm_tasks_on(&var("SLURM_STEP_TASKS_PER_NODE")?, node)
        })
        .filter(|n| *n > 0)
}

/// The tasks on node `node` (0-based) from srun's compressed list, such as
/// `2(x3),1`: two on each of the first three nodes, one on the fourth.
fn slurm_tasks_on(list: &str, node: usize) -> Option<usize> {
    let mut first = 0usize;
    for item in list.split(',') {
        let (tasks, repeat) = match item.split_once("(x") {
            Some((tasks, rest)) => (tasks, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (item, 1),
        };
        let tasks = tasks.trim().parse::<usize>().ok()?;
        if node < first + repeat {
            return Some(tasks);
        }
        first += repeat;
    }
    None
}

fn parse(value: &str) -> Result<usize, &'static str> {
    match value.trim().parse::<usize>() {
        Ok(0) => Err("it must be at least 1"),
        Ok(threads) => Ok(threads),
        Err(_) => Err("it is not a whole number"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbound_rank_takes_its_share_of_the_node() {
        assert_eq!(share(128, 128, 128), Some(1));
        assert_eq!(share(128, 128, 6), Some(21));
        assert_eq!(share(2, 2, 4), Some(1), "at least one");
        assert_eq!(share(4, 128, 32), None, "bound: it sees its share");
        assert_eq!(share(64, 64, 1), None, "alone: every core");
    }

    #[test]
    fn the_launchers_say_how_many_ranks_share_the_node() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(local_ranks(&env(&[("MPI_LOCALNRANKS", "4")])), Some(4));
        assert_eq!(
            local_ranks(&env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "8")])),
            Some(8)
        );
        const SLURM: &[(&str, &str)] = &[
            ("SLURM_NODEID", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"),
        ];
        assert_eq!(local_ranks(&env(SLURM)), Some(1));
        assert_eq!(local_ranks(&env(&[])), None);
        assert_eq!(local_ranks(&env(&[("MPI_LOCALNRANKS", "0")])), None);
        assert_eq!(slurm_tasks_on("2(x3),1", 2), Some(2));
        assert_eq!(slurm_tasks_on("16", 0), Some(16));
        assert_eq!(slurm_tasks_on("2(x3),1", 4), None);
        assert_eq!(slurm_tasks_on("2(x3", 0), None);
    }

    #[test]
    fn counts_parse_and_zero_or_words_are_refused() {
        assert_eq!(parse(" 3 "), Ok(3));
        assert!(parse("0").is_err());
        assert!(parse("all").is_err());
        assert!(parse("").is_err());
    }
}
