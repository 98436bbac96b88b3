//! What a rollout waits for from the coordinator: Commit at the point of no return, and the
//! release of a `sync_nodes` barrier. Both re-send their report after a reconnect.

use std::time::Duration;

use super::{Control, Event, Run, StepFailure, StepOutcome, Stop};
use crate::executor::{BARRIER_SLACK, LOG_TARGET};
use crate::report::{NodeState, Phase, Report, StepList};
use crate::runtime::StepOutput;

impl Run {
    /// The point of no return: report Prepared and wait for Commit. `Err` says why `up` stops
    /// before the point of no return instead (Abort, Rollback, a journal failure, shutdown).
    /// `next`: the instruction of `up` that runs after the commit, if any. The Committing
    /// record names it, so that it is also that instruction's record and the step does not
    /// write the same again.
    pub(super) async fn prepare_and_wait(&mut self, next: Option<usize>) -> Result<(), Stop> {
        self.journal(Phase::Prepared, NodeState::Prepared, "")
            .await
            .map_err(|e| {
                Stop::Journal(format!(
                    "cannot write the journal at the point of no return: {e}"
                ))
            })?;
        let prepared = Report::Prepared {
            rollout_id: self.rollout.rollout_id.clone(),
            epoch: self.rollout.epoch,
        };
        tracing::info!(rollout_id = %self.rollout.rollout_id, "prepared; waiting for Commit");
        self.push(prepared.clone());
        loop {
            match self.inbox.next().await {
                Event::Shutdown => return Err(Stop::Shutdown),
                Event::Reconnected => self.push(prepared.clone()),
                Event::Control(Control::Commit) => break,
                // Before the point of no return a Rollback means the same as an Abort: nothing
                // changed yet, so there is nothing to roll back.
                Event::Control(Control::Abort(reason)) => return Err(Stop::Abort(reason)),
                Event::Control(Control::Rollback(reason)) => return Err(Stop::Rollback(reason)),
                Event::Control(other) => self.inbox.keep(other),
            }
        }
        // Recovery must know that the node went past the point of no return before anything
        // changes: if this write fails, nothing has changed yet, so abort.
        let step = next.map_or(self.last_up_step, |n| u32::try_from(n).unwrap_or(u32::MAX));
        self.journal_at(step, Phase::Committing, NodeState::Committing, "")
            .await
            .map_err(|e| {
                Stop::Journal(format!(
                    "cannot journal the commit, so not going past the point of no return: {e}"
                ))
            })?;
        tracing::info!(rollout_id = %self.rollout.rollout_id, "committed: past the point of no return");
        Ok(())
    }

    /// `sync_nodes`: arrive and wait for the release, bounded by the barrier's timeout plus
    /// [`BARRIER_SLACK`].
    pub(super) async fn barrier(
        &mut self,
        list: StepList,
        index: usize,
        barrier_id: &str,
        timeout: Duration,
        interruptible: bool,
    ) -> StepOutcome {
        let arrive = Report::BarrierArrive {
            rollout_id: self.rollout.rollout_id.clone(),
            epoch: self.rollout.epoch,
            barrier_id: barrier_id.to_string(),
            step: u32::try_from(index).unwrap_or(u32::MAX),
        };
        // The scale bench reads this event (under the executor's target) as the arrival time.
        tracing::info!(target: LOG_TARGET, rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, barrier_id, "arrived at barrier; waiting for its release");
        self.push(arrive.clone());
        let released = |ok: bool, reason: String| {
            if ok {
                Ok(StepOutput::default())
            } else if reason.is_empty() {
                Err(StepFailure::new(format!("barrier `{barrier_id}` failed")))
            } else {
                Err(StepFailure::new(format!(
                    "barrier `{barrier_id}` failed: {reason}"
                )))
            }
        };
        if let Some((ok, reason)) = self.inbox.releases.remove(barrier_id) {
            return (released(ok, reason), None);
        }
        let backstop = timeout.saturating_add(BARRIER_SLACK);
        let deadline = tokio::time::sleep(backstop);
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                () = &mut deadline => {
                    return (
                        Err(StepFailure::new(format!(
                            "barrier `{barrier_id}` was not released within {backstop:?} (its timeout plus {BARRIER_SLACK:?}); giving up"
                        ))),
                        None,
                    );
                }
                event = self.inbox.next() => event,
            };
            match event {
                Event::Shutdown => {
                    return (
                        Err(StepFailure::new(Stop::Shutdown.describe())),
                        Some(Stop::Shutdown),
                    );
                }
                Event::Reconnected => self.push(arrive.clone()),
                Event::Control(Control::BarrierRelease {
                    barrier_id: id,
                    ok,
                    reason,
                }) if id == barrier_id => return (released(ok, reason), None),
                Event::Control(Control::Abort(reason)) if interruptible => {
                    let stop = Stop::Abort(reason);
                    return (Err(StepFailure::new(stop.describe())), Some(stop));
                }
                Event::Control(Control::Rollback(reason)) if interruptible => {
                    let stop = Stop::Rollback(reason);
                    return (Err(StepFailure::new(stop.describe())), Some(stop));
                }
                Event::Control(other) => self.inbox.keep(other),
            }
        }
    }
}
