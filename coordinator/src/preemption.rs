//! A preemption's last checkpoint. An agent that lost its link (a network
//! partition) dials in again by itself once the network heals, so a
//! preemption that finds one away waits for it (`--rejoin-wait`) rather
//! than stopping the job at once with nothing saved since the last epoch.

use std::time::Instant;

use cryo_core::protocol::JobResponse;

use crate::refusal::Refusal;
use crate::running::Coordinator;

/// The wait of a stop for its agents: the whole stop waits at most
/// `--rejoin-wait` in all, however often an agent goes away.
pub(crate) struct StopWait {
    /// What asked for the checkpoint held back, while one is.
    why: Option<String>,
    /// When the stop first waited.
    began: Instant,
}

impl Coordinator {
    /// Starts the checkpoint a stop takes. `Ok(None)`: an agent is away,
    /// and the checkpoint starts once it is back ([`Self::retry_stop_checkpoint`]).
    pub(crate) fn start_stop_checkpoint(&mut self, why: &str) -> Result<Option<u64>, Refusal> {
        let refusal = match self.start_checkpoint(why) {
            Ok(epoch) => return Ok(Some(epoch)),
            Err(refusal) => refusal,
        };
        let budget = self.opts.rejoin_wait;
        if !refusal.awaits_an_agent() || budget.is_zero() {
            self.stop_waiting();
            return Err(refusal);
        }
        let wait = self.stop_wait.get_or_insert_with(|| StopWait {
            why: None,
            began: Instant::now(),
        });
        let left = budget.saturating_sub(wait.began.elapsed());
        if left.is_zero() {
            wait.why = None;
            return Err(refusal);
        }
        if wait.why.is_none() {
            wait.why = Some(why.to_owned());
            tracing::info!(job = %self.opts.job, why, reason = %refusal, "stop.awaiting_agent");
            cryo_core::say!(
                "cryo: {why}: {refusal}; the checkpoint waits up to {:.0} s for it \
                 (--rejoin-wait) before the job stops without one",
                left.as_secs_f64()
            );
        }
        Ok(None)
    }

    /// The stop waits for no agent any more.
    pub(crate) fn stop_waiting(&mut self) {
        if let Some(wait) = &mut self.stop_wait {
            wait.why = None;
        }
    }

    /// On every tick: starts the checkpoint a stop is waiting for once its
    /// agent is back, or gives it up past `--rejoin-wait` (or when the
    /// reason changed to one that does not pass).
    pub(crate) fn retry_stop_checkpoint(&mut self) {
        let Some(why) = self.stop_wait.as_ref().and_then(|w| w.why.clone()) else {
            return;
        };
        if self.epoch.is_some() {
            return;
        }
        match self.start_stop_checkpoint(&why) {
            Ok(Some(epoch)) => tracing::info!(job = %self.opts.job, epoch, "stop.agent_back"),
            Ok(None) => {}
            Err(refusal) => self.stop_without_checkpoint(&refusal.to_string()),
        }
    }

    /// A SIGTERM while a stop waits for an agent: Slurm's kill is near, and
    /// the job stops now without a new checkpoint.
    pub(crate) fn give_up_waiting(&mut self, signal: &str) {
        let Some(wait) = self.stop_wait.as_mut().filter(|w| w.why.is_some()) else {
            return;
        };
        wait.why = None;
        let waited = wait.began.elapsed().as_secs_f64();
        self.stop_without_checkpoint(&format!(
            "{signal} after {waited:.0} s of waiting for an agent that lost its link"
        ));
    }

    /// The stop goes ahead with the last committed epoch; a `cryo
    /// preempt` waiting hears why.
    fn stop_without_checkpoint(&mut self, reason: &str) {
        tracing::info!(job = %self.opts.job, reason, "stop.without_checkpoint");
        cryo_core::say!("cryo: stopping without a new checkpoint: {reason}");
        self.preempt_result = Some(false);
        self.answer(&JobResponse::Refused {
            reason: format!("{reason}; the job is stopped without a new checkpoint"),
        });
    }

    /// Whether a stop is waiting for an agent to come back.
    pub(crate) fn is_awaiting_agent(&self) -> bool {
        self.stop_wait.as_ref().is_some_and(|w| w.why.is_some())
    }
}

#[cfg(test)]
#[path = "preemption_tests.rs"]
mod tests;
