//! A restart, at `cryo_init`: the rank's record read from the store, its
//! files, mappings and closed files put back, and the outcome told to the
//! agent and settled with the other ranks.
//!
//! A rank whose own restore fails says why at once, on its stderr and to
//! its agent, before the ranks exchange their outcomes: a peer that learns
//! of the failure there may end the job (`MPI_Abort`) before this rank's
//! caller gets to print the error, and the failure must still be named.

use std::os::fd::{AsRawFd, RawFd};

use cryo_core::protocol::RankToAgent;
use cryo_core::store::Store;

use crate::error::RestoreError;
use crate::files::{restore_files, FilePolicy, FilesRestored};
use crate::mappings::restore_mappings;
use crate::runtime::{Config, Connection, Restored};

/// Where a restart restores from: its epoch, the store's root and the job
/// in it, as the agent's welcome said.
pub(crate) type Source<'a> = (u64, &'a str, &'a str);

/// Restores this rank from `source` and settles the closed files with
/// `peers`; `job` becomes the store's job. On failure the error has been
/// told to the agent (`conn`) and printed.
pub(crate) fn restore_at_start(
    config: &Config,
    (epoch, store, store_job): Source<'_>,
    job: &mut String,
    conn: Option<&Connection>,
    peers: &mut dyn crate::closed_files::Peers,
) -> Result<(Restored, FilesRestored), RestoreError> {
    let rank = config.rank;
    let reserved: Vec<RawFd> = conn
        .iter()
        .flat_map(|c| [c.sock.as_raw_fd(), c.memfd.as_raw_fd()])
        .collect();
    // An image of another job must never be poured into this process.
    let result = if !job.is_empty() && job != store_job {
        Err(RestoreError::OtherJob {
            rank,
            epoch,
            offered: store_job.to_owned(),
            ours: job.clone(),
        })
    } else {
        *job = store_job.to_owned();
        let handed = crate::prefetch::pause(epoch, store, store_job);
        load_restore(rank, epoch, store, store_job, handed)
    }
    .and_then(|r| {
        let policy = config.file_policy;
        let mut files = restore_files(&r.record, &r.store, policy, &reserved)?;
        (files.recreated).extend(crate::remake::remake_node_files(
            &r.record, &r.store, policy,
        )?);
        restore_mappings(&r.record, &r.store, policy)?;
        crate::mappings::restore_region_files(&r.record, &r.store, policy)?;
        let mut r = r;
        r.process = crate::process_state::load(&r.record, &r.store)?;
        let held = crate::floor::hold_lost(&r.record);
        tracing::debug!(rank, fds = ?held, "restart.lost_fds_held");
        // `CRYO_FILE_POLICY=keep` leaves closed files as they are too.
        let closed = match config.file_policy {
            FilePolicy::Truncate => crate::closed_files::load(&r.record, &r.store)?,
            FilePolicy::Keep => Default::default(),
        };
        // The regions come back as the application maps them.
        crate::prefetch::resume(epoch, store, job, &r.record);
        Ok((r, files, closed))
    });
    if let Err(err) = &result {
        failed(conn, job, rank, epoch, err);
        cryo_core::say!("cryo: {err}");
    }
    // Every rank takes part, whether its own restore worked or not.
    let settled = crate::closed_files::settle(
        rank,
        result.as_ref().ok().map(|(_, _, closed)| closed),
        peers,
    );
    let (r, mut files, _) = result?;
    match settled {
        Ok(truncated) => {
            files.truncated.extend(truncated);
            Ok((r, files))
        }
        Err(err) => {
            failed(conn, job, rank, epoch, &err);
            Err(err)
        }
    }
}

/// Tells the agent that this rank's restart failed, and why.
fn failed(conn: Option<&Connection>, job: &str, rank: u32, epoch: u64, err: &RestoreError) {
    if let Some(conn) = conn {
        let _ = conn.send(&RankToAgent::RestoreFailed {
            epoch,
            error: err.to_string(),
        });
    }
    tracing::error!(job = %job, rank, epoch, error = %err, "restart.failed");
}

fn load_restore(
    rank: u32,
    epoch: u64,
    store_root: &str,
    job: &str,
    handed: Option<cryo_core::format::manifest::Manifest>,
) -> Result<Restored, RestoreError> {
    // Its pack files are the runtime's: high fds, never captured.
    let store = Store::open_with_fs(store_root, crate::store_fds::RuntimeFs::shared())
        .and_then(|store| store.existing_job(job))
        .map_err(|source| RestoreError::Store {
            rank,
            epoch,
            source,
        })?;
    // Another user's job (or a job directory swapped for a link) is refused
    // before anything of it is read.
    cryo_core::store::durable::check_private_dir(store.dir()).map_err(|source| {
        RestoreError::Store {
            rank,
            epoch,
            source: source.into(),
        }
    })?;
    // The prefetch (rank/src/prefetch.rs) may have parsed it already.
    let manifest = match handed {
        Some(manifest) => manifest,
        None => store
            .load_manifest(epoch)
            .map_err(|source| RestoreError::Manifest {
                rank,
                epoch,
                source,
            })?,
    };
    let record = manifest
        .ranks
        .iter()
        .find(|r| r.rank == rank)
        .cloned()
        .ok_or_else(|| RestoreError::RankMissing {
            rank,
            epoch,
            job: job.to_owned(),
            world_size: manifest.world_size,
        })?;
    Ok(Restored {
        epoch,
        store,
        record,
        process: Default::default(),
        taken_unix_ms: manifest.created_unix_ms,
    })
}
