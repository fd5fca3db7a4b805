//! Periodic checkpoints (`--interval`). One that finds an agent away (a
//! network partition) is tried again every [`RETRY`] until the agent is
//! back, rather than a whole interval later: the job has computed a whole
//! interval unsaved by then.

use std::time::Duration;

use crate::running::Coordinator;

/// How soon a periodic checkpoint held back by an away agent is tried
/// again.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

impl Coordinator {
    /// The interval has come: starts its checkpoint unless one is under
    /// way. Returns how long until the next try.
    pub(crate) fn on_interval(&mut self, interval: Duration) -> Duration {
        if self.epoch.is_some() {
            return interval;
        }
        match self.start_checkpoint("interval") {
            Ok(_) => {
                self.interval_deferred = false;
                interval
            }
            Err(refusal) if refusal.awaits_an_agent() => {
                if !self.interval_deferred {
                    self.interval_deferred = true;
                    tracing::info!(job = %self.opts.job, reason = %refusal, "interval.deferred");
                    cryo_core::say!(
                        "cryo: the periodic checkpoint waits: {refusal}; it is taken as soon as \
                         the agent is back"
                    );
                }
                RETRY.min(interval)
            }
            Err(refusal) => {
                self.interval_deferred = false;
                tracing::info!(job = %self.opts.job, reason = %refusal, "interval.skipped");
                interval
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use cryo_core::protocol::PROTOCOL_VERSION;

    use super::RETRY;
    use crate::running_fixture::{coordinator, registered, timed_out, writer};

    #[test]
    fn a_periodic_checkpoint_held_back_by_an_away_agent_is_taken_once_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = coordinator(dir.path(), 1);
        let interval = Duration::from_secs(600);
        c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
        c.on_agent_message("a", registered(0));
        c.on_agent_lost("a", &timed_out(), 1);
        assert_eq!(c.on_interval(interval), RETRY);
        assert_eq!(c.on_interval(interval), RETRY);
        assert!(c.epoch.is_none());

        c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 2);
        c.on_agent_message("a", registered(0));
        assert_eq!(c.on_interval(interval), interval);
        assert_eq!(c.epoch.as_ref().map(|e| e.epoch), Some(1));
        // Under way: the next interval only waits for the next one.
        assert_eq!(c.on_interval(interval), interval);
    }

    #[test]
    fn a_periodic_checkpoint_refused_for_good_waits_a_whole_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = coordinator(dir.path(), 2);
        c.on_agent_connected("a".into(), writer(), PROTOCOL_VERSION, 1);
        c.on_agent_message("a", registered(0));
        // Rank 1 never registered.
        let interval = Duration::from_secs(600);
        assert_eq!(c.on_interval(interval), interval);
        assert!(c.epoch.is_none());
    }
}
