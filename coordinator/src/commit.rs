//! The manifest commit, off the event thread.
//!
//! Publishing an epoch's manifest reads every rank's part and syncs the
//! store: on shared storage that can take seconds, or hang. The event loop
//! meanwhile keeps reading agents and answering `cryo status`, and the
//! epoch waits in `Committing`, where only the commit's outcome can end it.

use std::sync::mpsc::Sender;
use std::thread;

use cryo_core::fault;
use cryo_core::protocol::AbortReason;
use cryo_core::store::JobStore;

use crate::peers::Event;

/// What a finished commit reports: the warnings its manifest records (what
/// a restart will not give back), or why it failed.
pub(crate) type CommitResult = Result<Vec<String>, AbortReason>;

/// Commits epochs on a thread of their own and reports each outcome as an
/// [`Event::Committed`].
pub(crate) struct Committer {
    job: JobStore,
    ranks: u32,
    chunk_size: u32,
    events: Sender<Event>,
}

impl Committer {
    pub(crate) fn new(job: JobStore, ranks: u32, chunk_size: usize, events: Sender<Event>) -> Self {
        Committer {
            job,
            ranks,
            chunk_size: u32::try_from(chunk_size).unwrap_or(u32::MAX),
            events,
        }
    }

    /// Starts committing `epoch`, whose every rank is durable.
    pub(crate) fn start(&self, epoch: u64) {
        let (job, ranks, chunk_size, events) = (
            self.job.clone(),
            self.ranks,
            self.chunk_size,
            self.events.clone(),
        );
        let commit = move || {
            fault::pause_at(fault::Phase::Commit, epoch, job.name());
            let result = job
                .commit_epoch(epoch, ranks, chunk_size)
                .map(|manifest| crate::holdings::warnings(&manifest))
                .map_err(|err| AbortReason::store(&err));
            let _ = events.send(Event::Committed { epoch, result });
        };
        let spawned = thread::Builder::new()
            .name(format!("cryo-commit-{epoch}"))
            .spawn(commit);
        if let Err(err) = spawned {
            let _ = self.events.send(Event::Committed {
                epoch,
                result: Err(AbortReason::Agent {
                    detail: format!("the coordinator could not start its commit thread: {err}"),
                }),
            });
        }
    }
}
