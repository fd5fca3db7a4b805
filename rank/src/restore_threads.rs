//! How many threads a restarting rank decodes its regions, mappings and
//! files with: `CRYO_RESTORE_THREADS`, or by default one per core (rayon's
//! pool).
//!
//! Several ranks on one node each restore with every core unless told
//! otherwise; the variable caps that, and lets a benchmark show how the
//! restart scales with threads.

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
    let value = std::env::var(ENV_RESTORE_THREADS).ok()?;
    let threads = match parse(&value) {
        Ok(threads) => threads,
        Err(why) => {
            tracing::warn!(value = %value, why, "{ENV_RESTORE_THREADS} ignored");
            return None;
        }
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cryo-restore-{i}"))
        .build()
        .inspect_err(|err| tracing::warn!(error = %err, "no restore thread pool; using rayon's"))
        .ok()
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
    fn counts_parse_and_zero_or_words_are_refused() {
        assert_eq!(parse(" 3 "), Ok(3));
        assert!(parse("0").is_err());
        assert!(parse("all").is_err());
        assert!(parse("").is_err());
    }
}
