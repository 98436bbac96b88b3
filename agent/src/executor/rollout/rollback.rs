//! The ways back: before the point of no return, discard what was staged (ABORTED); after it,
//! the script's `down` list or the runtime's default rollback (ROLLED_BACK, or FAILED).

use super::Run;
use super::step::{JournalFirst, Ran, Work};
use crate::executor::DEFAULT_ROLLBACK;
use crate::report::{NodeState, Phase, Report, StepList};

impl Run {
    /// Failure before the point of no return: discard what was staged, report ABORTED.
    pub(super) async fn abort(&mut self, error: String) -> Report {
        tracing::warn!(rollout_id = %self.rollout.rollout_id, %error, "aborting before the point of no return");
        let bound = self.script.rollout.step_timeout;
        let mut error = error;
        match tokio::time::timeout(bound, self.env.runtime.discard(&self.rollout)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error = format!("{error}; discarding what was staged also failed: {e}"),
            Err(_) => {
                error =
                    format!("{error}; discarding what was staged did not finish within {bound:?}")
            }
        }
        let _ = self.journal(Phase::Done, NodeState::Aborted, &error).await;
        let outcome = self.outcome(NodeState::Aborted, &error);
        self.push(outcome.clone());
        outcome
    }

    /// Failure after the point of no return: ROLLING_BACK, the `down` list or the default
    /// rollback, then ROLLED_BACK or FAILED. `None` when shut down midway.
    pub(super) async fn rollback(&mut self, error: String) -> Option<Report> {
        tracing::warn!(rollout_id = %self.rollout.rollout_id, %error, "rolling back");
        let _ = self
            .journal(Phase::RollingBack, NodeState::RollingBack, &error)
            .await;
        self.push(self.outcome(NodeState::RollingBack, &error));
        // Releases kept from `up` must not satisfy a barrier of `down`.
        self.inbox.releases.clear();

        let mut failed = None;
        let mut how = None;
        match self.script.down.clone() {
            Some(down) => {
                for (index, step) in down.iter().enumerate() {
                    let name = step.instruction.name();
                    let work = Work::of(&self.script, StepList::Down, step);
                    let first = JournalFirst::BestEffort(
                        Phase::RollingBack,
                        NodeState::RollingBack,
                        error.clone(),
                    );
                    match self
                        .run_step(StepList::Down, index, name, first, work, false)
                        .await
                    {
                        Ran::Shutdown => return None,
                        Ran::Ended { result: Err(f), .. } => {
                            failed = Some(format!(
                                "rollback failed at down[{index}] `{name}`: {}",
                                f.error
                            ));
                            break;
                        }
                        Ran::Ended { .. } => {}
                    }
                }
            }
            None => {
                let work = Work::DefaultRollback;
                match self
                    .run_step(
                        StepList::Down,
                        0,
                        DEFAULT_ROLLBACK,
                        JournalFirst::Skip,
                        work,
                        false,
                    )
                    .await
                {
                    Ran::Shutdown => return None,
                    Ran::Ended { result: Err(f), .. } => {
                        failed = Some(format!("default rollback failed: {}", f.error));
                    }
                    // An OTP release node is rolled back by the relup's downgrade or by a
                    // restart: the node's outcome says which, and whether its in-memory state
                    // survived.
                    Ran::Ended {
                        result: Ok(out), ..
                    } if self.rollout.runtime == hotroll_script::Runtime::OtpRelease
                        && !out.output.is_empty() =>
                    {
                        how = Some(out.output);
                    }
                    Ran::Ended { .. } => {}
                }
            }
        }

        let outcome = match failed {
            Some(failure) => {
                tracing::error!(rollout_id = %self.rollout.rollout_id, error = %failure, "rollback failed");
                let _ = self.journal(Phase::Done, NodeState::Failed, &failure).await;
                self.outcome(NodeState::Failed, &failure)
            }
            None => {
                let error = match how {
                    Some(how) => format!("{error}; rolled back: {how}"),
                    None => error,
                };
                tracing::info!(rollout_id = %self.rollout.rollout_id, "rolled back");
                let _ = self
                    .journal(Phase::Done, NodeState::RolledBack, &error)
                    .await;
                self.outcome(NodeState::RolledBack, &error)
            }
        };
        self.push(outcome.clone());
        Some(outcome)
    }
}
