//! Recovery at agent start (docs/design.md §5): settle every rollout the journal says was in progress
//! when the previous agent process ended (it crashed, was killed, or the machine rebooted).
//!
//! | journal | the node | recovery | reported |
//! |---|---|---|---|
//! | preparing / prepared | nothing visible changed (staging only) | discard what was staged | `aborted` |
//! | committing / rolling back | somewhere past the point of no return | roll back to the permanent release (the runtime's default rollback) | `rolled_back` (`failed` if that fails) |
//! | committed, and the app's permanent release is already the new one | make-permanent finished but was not journaled | nothing | `permanent` |
//! | done | settled | nothing | its recorded outcome |
//!
//! Recovery runs after the runtime booted (the process runtime has by then stopped whatever
//! service instances the dead agent left — SIGCONTing suspended ones first — and started the
//! app's services from `current`, which always names a whole release: it is swapped by an
//! atomic rename) and before the first session, so the first Hello already carries the settled
//! journal: the coordinator learns the node's real outcome from it. A rollback runs the default
//! rollback, not the script's `down` list: that may wait at barriers with the rest of the fleet,
//! which a node that lost its place cannot do; returning to the permanent release is what the
//! design asks for.
//!
//! Afterwards the journal keeps answering for the rollout: a command of it that the coordinator
//! sends again (it re-sends a node's last command when the node comes back) gets the recorded
//! outcome ([`answer_from_journal`]); the rollout never runs again on this node.

use std::time::Duration;

use super::Env;
use crate::cancel::CancelToken;
use crate::journal::{JournalRecord, Scope};
use crate::report::{NodeState, Phase, Report, StepList};
use crate::runtime::{AppStatus, RolloutContext, StepContext};

/// How long recovery gives one discard or rollback.
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);

/// What recovery does with a rollout that was in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Before the point of no return: drop what was staged.
    Discard,
    /// After it: return to the permanent release.
    RollBack,
    /// Make-permanent completed; only its journal record was missing.
    AlreadyPermanent,
}

/// The action for an unfinished `record`, given the node's apps (`None` for a finished one).
pub fn decide(record: &JournalRecord, apps: &[AppStatus]) -> Option<Action> {
    match record.phase {
        Phase::Done => None,
        Phase::Preparing | Phase::Prepared => Some(Action::Discard),
        Phase::Committing | Phase::RollingBack => {
            let made_permanent = record.phase == Phase::Committing
                && record.node_state == NodeState::Committed
                && record.scope.as_ref().is_some_and(|scope| {
                    scope.to != scope.from
                        && apps
                            .iter()
                            .any(|a| a.app == scope.app && a.permanent == scope.to)
                });
            Some(if made_permanent {
                Action::AlreadyPermanent
            } else {
                Action::RollBack
            })
        }
    }
}

/// Settle every unfinished rollout of the journal (see the module docs). Errors are logged:
/// the agent starts anyway and reports what it could establish.
pub async fn recover(env: &Env) {
    let entries = match env.journal.entries() {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the journal; nothing recovered");
            return;
        }
    };
    for record in entries {
        let Some(action) = decide(&record, &env.runtime.apps()) else {
            continue;
        };
        tracing::warn!(
            rollout_id = %record.rollout_id,
            step = record.step,
            phase = ?record.phase,
            node_state = ?record.node_state,
            ?action,
            "a rollout was interrupted by an agent restart; recovering"
        );
        let (state, error) = settle(env, &record, action).await;
        // Crash-safety tests: die after the discard or rollback, before its result is durable
        // (the next start must do it again, harmlessly).
        if crate::fault::armed() {
            crate::fault::point(&format!("recovery {action:?}"));
        }
        let mut done = JournalRecord::new(
            &record.rollout_id,
            record.epoch,
            record.step,
            Phase::Done,
            state,
        )
        .with_error(error.clone());
        done.scope = record.scope.clone();
        match env.journal.record(done).await {
            Ok(()) => {
                tracing::info!(rollout_id = %record.rollout_id, state = ?state, %error, "rollout recovered")
            }
            Err(e) => {
                tracing::error!(rollout_id = %record.rollout_id, error = %e, "cannot journal the recovered outcome")
            }
        }
    }
}

async fn settle(env: &Env, record: &JournalRecord, action: Action) -> (NodeState, String) {
    let step = record.step;
    let context = record
        .scope
        .as_ref()
        .and_then(|scope| context(env, record, scope));
    match action {
        Action::AlreadyPermanent => (NodeState::Permanent, String::new()),
        Action::Discard => {
            let what = format!(
                "the agent restarted before the point of no return (at up[{step}]); what was \
                 staged was discarded"
            );
            let Some(ctx) = context else {
                return (
                    NodeState::Aborted,
                    format!("{what} (nothing to discard: the journal does not name the app)"),
                );
            };
            match tokio::time::timeout(RECOVERY_DEADLINE, env.runtime.discard(&ctx)).await {
                Ok(Ok(())) => (NodeState::Aborted, what),
                Ok(Err(e)) => (
                    NodeState::Aborted,
                    format!("{what}; discarding it failed: {e}"),
                ),
                Err(_) => (
                    NodeState::Aborted,
                    format!("{what}; discarding it did not finish within {RECOVERY_DEADLINE:?}"),
                ),
            }
        }
        Action::RollBack => {
            let what = format!(
                "the agent restarted after the point of no return (at up[{step}]) before the \
                 release was made permanent"
            );
            let Some(ctx) = context else {
                return (
                    NodeState::Failed,
                    format!("{what}; cannot roll back: the journal does not name the app"),
                );
            };
            let step_ctx = StepContext {
                rollout: &ctx,
                list: StepList::Down,
                step: 0,
                deadline: RECOVERY_DEADLINE,
                cancel: CancelToken::never(),
            };
            let rollback = env.runtime.default_rollback(&step_ctx);
            match tokio::time::timeout(RECOVERY_DEADLINE, rollback).await {
                Ok(Ok(output)) => {
                    tracing::info!(rollout_id = %record.rollout_id, output = %output.output, "rolled back to the permanent release");
                    (
                        NodeState::RolledBack,
                        format!("{what}; rolled back to the permanent release"),
                    )
                }
                Ok(Err(e)) => (
                    NodeState::Failed,
                    format!("{what}; rolling back failed: {e}"),
                ),
                Err(_) => (
                    NodeState::Failed,
                    format!("{what}; rolling back did not finish within {RECOVERY_DEADLINE:?}"),
                ),
            }
        }
    }
}

fn context(env: &Env, record: &JournalRecord, scope: &Scope) -> Option<RolloutContext> {
    Some(RolloutContext {
        runtime: scope.runtime()?,
        rollout_id: record.rollout_id.clone(),
        epoch: record.epoch,
        node: env.config.node.clone(),
        app: scope.app.clone(),
        from: scope.from.clone(),
        to: scope.to.clone(),
        artifacts: Vec::new(),
        data_dir: env.config.data_dir.clone(),
    })
}

/// The outcome report a journal record stands for.
pub fn outcome_of(record: &JournalRecord, apps: Vec<AppStatus>) -> Report {
    Report::Outcome {
        rollout_id: record.rollout_id.clone(),
        epoch: record.epoch,
        state: record.node_state,
        error: record.error.clone(),
        step: record.step,
        apps,
    }
}

/// A command for a rollout this node does not run now: if the journal knows the rollout (this
/// epoch or a later one), answer with its recorded outcome and return true — it never runs
/// again here. Returns false for a rollout the journal does not know (or a newer attempt).
pub fn answer_from_journal(env: &Env, rollout_id: &str, epoch: u64) -> bool {
    let record = match env.journal.get(rollout_id) {
        Ok(Some(record)) => record,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(rollout_id, error = %e, "cannot read the journal");
            return false;
        }
    };
    if epoch > record.epoch {
        return false;
    }
    if epoch < record.epoch {
        tracing::debug!(
            rollout_id,
            epoch,
            recorded = record.epoch,
            "ignoring a command with an older epoch"
        );
        return true;
    }
    let report = if record.phase == Phase::Done {
        outcome_of(&record, env.runtime.apps())
    } else {
        // Only when recovery could not journal its result: say so rather than run it again.
        let mut failed = record.clone();
        failed.node_state = NodeState::Failed;
        failed.error = "the rollout was interrupted on this node and recovery did not complete; \
                        see the agent's log"
            .into();
        outcome_of(&failed, env.runtime.apps())
    };
    tracing::info!(
        rollout_id,
        "answering from the journal: the rollout ended on this node"
    );
    env.outbox.push(report);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: Phase, state: NodeState) -> JournalRecord {
        JournalRecord::new("r", 1, 3, phase, state).with_scope(Scope {
            runtime: "process".into(),
            app: "web".into(),
            from: "1.0".into(),
            to: "2.0".into(),
        })
    }

    fn apps(current: &str, permanent: &str) -> Vec<AppStatus> {
        vec![AppStatus {
            app: "web".into(),
            current: current.into(),
            permanent: permanent.into(),
            ..AppStatus::default()
        }]
    }

    #[test]
    fn before_the_point_of_no_return_staging_is_discarded() {
        for (phase, state) in [
            (Phase::Preparing, NodeState::Preparing),
            (Phase::Prepared, NodeState::Prepared),
        ] {
            assert_eq!(
                decide(&record(phase, state), &apps("1.0", "1.0")),
                Some(Action::Discard)
            );
        }
    }

    #[test]
    fn after_it_the_node_rolls_back_unless_already_permanent() {
        let committing = record(Phase::Committing, NodeState::Committing);
        assert_eq!(
            decide(&committing, &apps("2.0", "1.0")),
            Some(Action::RollBack)
        );
        let committed = record(Phase::Committing, NodeState::Committed);
        assert_eq!(
            decide(&committed, &apps("2.0", "1.0")),
            Some(Action::RollBack)
        );
        // Killed between writing `permanent` and journaling it.
        assert_eq!(
            decide(&committed, &apps("2.0", "2.0")),
            Some(Action::AlreadyPermanent)
        );
        // Only a committed node can have made it permanent.
        assert_eq!(
            decide(&committing, &apps("2.0", "2.0")),
            Some(Action::RollBack)
        );
        assert_eq!(
            decide(
                &record(Phase::RollingBack, NodeState::RollingBack),
                &apps("2.0", "1.0")
            ),
            Some(Action::RollBack)
        );
        let mut unscoped = committed.clone();
        unscoped.scope = None;
        assert_eq!(
            decide(&unscoped, &apps("2.0", "2.0")),
            Some(Action::RollBack)
        );
    }

    /// A runtime that records the lifecycle calls recovery makes.
    #[derive(Default)]
    struct Recorder {
        calls: std::sync::Mutex<Vec<String>>,
        apps: Vec<AppStatus>,
        fail_rollback: bool,
    }

    impl Recorder {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
        fn note(&self, call: String) {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(call);
            }
        }
    }

    impl crate::runtime::Runtime for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn supported_instructions(
            &self,
            _runtime: hotroll_script::Runtime,
        ) -> std::collections::BTreeSet<&'static str> {
            Default::default()
        }
        fn apps(&self) -> Vec<AppStatus> {
            self.apps.clone()
        }
        fn step<'a>(
            &'a self,
            _ctx: &'a StepContext<'a>,
            instruction: &'a hotroll_script::Instruction,
        ) -> crate::runtime::BoxFuture<'a, crate::runtime::StepResult> {
            self.note(format!("step {}", instruction.name()));
            Box::pin(async move {
                Err(crate::runtime::RuntimeError::Unsupported(
                    instruction.name(),
                ))
            })
        }
        fn make_permanent<'a>(
            &'a self,
            ctx: &'a RolloutContext,
        ) -> crate::runtime::BoxFuture<'a, Result<(), crate::runtime::RuntimeError>> {
            self.note(format!("make_permanent {}", ctx.to));
            Box::pin(async { Ok(()) })
        }
        fn discard<'a>(
            &'a self,
            ctx: &'a RolloutContext,
        ) -> crate::runtime::BoxFuture<'a, Result<(), crate::runtime::RuntimeError>> {
            self.note(format!("discard {} {} {}", ctx.rollout_id, ctx.app, ctx.to));
            Box::pin(async { Ok(()) })
        }
        fn default_rollback<'a>(
            &'a self,
            ctx: &'a StepContext<'a>,
        ) -> crate::runtime::BoxFuture<'a, crate::runtime::StepResult> {
            self.note(format!(
                "rollback {} {} {:?}",
                ctx.rollout.rollout_id, ctx.rollout.app, ctx.list
            ));
            let fail = self.fail_rollback;
            Box::pin(async move {
                if fail {
                    Err(crate::runtime::RuntimeError::failed("no way back"))
                } else {
                    Ok(crate::runtime::StepOutput::default())
                }
            })
        }
    }

    fn env(runtime: Arc<Recorder>) -> (tempfile::TempDir, Env) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config =
            crate::config::Config::new("node-1", "http://127.0.0.1:1", dir.path().to_path_buf());
        let journal =
            crate::journal::Journal::open(dir.path()).unwrap_or_else(|e| panic!("journal: {e}"));
        let env = Env {
            config: Arc::new(config),
            runtime,
            journal,
            outbox: Arc::new(crate::outbox::Outbox::default()),
        };
        (dir, env)
    }

    fn write(env: &Env, record: JournalRecord) {
        env.journal
            .record_blocking(record)
            .unwrap_or_else(|e| panic!("journal: {e}"));
    }

    fn recorded(env: &Env, id: &str) -> JournalRecord {
        match env.journal.get(id) {
            Ok(Some(record)) => record,
            other => panic!("journal record of {id}: {other:?}"),
        }
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn an_interrupted_prepare_is_discarded_and_journaled_aborted() {
        let runtime = Arc::new(Recorder::default());
        let (_dir, env) = env(runtime.clone());
        write(&env, record(Phase::Preparing, NodeState::Preparing));
        recover(&env).await;
        assert_eq!(runtime.calls(), vec!["discard r web 2.0"]);
        let done = recorded(&env, "r");
        assert_eq!(
            (done.phase, done.node_state),
            (Phase::Done, NodeState::Aborted)
        );
        assert!(
            done.error.contains("before the point of no return"),
            "{}",
            done.error
        );
        assert!(done.scope.is_some());
        // Recovering again does nothing more.
        recover(&env).await;
        assert_eq!(runtime.calls().len(), 1);
    }

    #[tokio::test]
    async fn an_interrupted_commit_rolls_back_to_the_permanent_release() {
        let runtime = Arc::new(Recorder {
            apps: apps("2.0", "1.0"),
            ..Recorder::default()
        });
        let (_dir, env) = env(runtime.clone());
        write(&env, record(Phase::Committing, NodeState::Committed));
        recover(&env).await;
        assert_eq!(runtime.calls(), vec!["rollback r web Down"]);
        let done = recorded(&env, "r");
        assert_eq!(done.node_state, NodeState::RolledBack);
        assert!(
            done.error.contains("after the point of no return"),
            "{}",
            done.error
        );
    }

    #[tokio::test]
    async fn a_failed_recovery_rollback_is_journaled_failed() {
        let runtime = Arc::new(Recorder {
            fail_rollback: true,
            ..Recorder::default()
        });
        let (_dir, env) = env(runtime.clone());
        write(&env, record(Phase::RollingBack, NodeState::RollingBack));
        recover(&env).await;
        let done = recorded(&env, "r");
        assert_eq!(done.node_state, NodeState::Failed);
        assert!(done.error.contains("no way back"), "{}", done.error);
    }

    #[tokio::test]
    async fn a_completed_make_permanent_is_recognised() {
        let runtime = Arc::new(Recorder {
            apps: apps("2.0", "2.0"),
            ..Recorder::default()
        });
        let (_dir, env) = env(runtime.clone());
        write(&env, record(Phase::Committing, NodeState::Committed));
        recover(&env).await;
        assert!(runtime.calls().is_empty(), "{:?}", runtime.calls());
        assert_eq!(recorded(&env, "r").node_state, NodeState::Permanent);
    }

    #[tokio::test]
    async fn a_recovered_rollout_answers_from_the_journal_and_never_runs_again() {
        let runtime = Arc::new(Recorder::default());
        let (_dir, env) = env(runtime.clone());
        write(&env, record(Phase::Preparing, NodeState::Preparing));
        recover(&env).await;
        assert!(!answer_from_journal(&env, "unknown", 1));
        assert!(
            !answer_from_journal(&env, "r", 2),
            "a newer attempt may run"
        );
        assert!(
            answer_from_journal(&env, "r", 0),
            "an older epoch is ignored"
        );
        assert!(env.outbox.is_empty());
        assert!(answer_from_journal(&env, "r", 1));
        match env.outbox.try_pop() {
            Some(Report::Outcome {
                rollout_id,
                epoch: 1,
                state: NodeState::Aborted,
                ..
            }) if rollout_id == "r" => {}
            other => panic!("expected the recorded outcome, got {other:?}"),
        }
        // Through the executor: a RunScript sent again gets the outcome, and nothing runs.
        let mut node = crate::executor::Node::new(env.clone());
        node.handle(crate::executor::Command {
            rollout_id: "r".into(),
            epoch: 1,
            kind: crate::executor::CommandKind::RunScript(crate::executor::RunScript {
                script_name: "s.toml".into(),
                script_source: "not even toml [".into(),
                artifacts: Vec::new(),
                step_timeout: None,
                barrier_timeout: None,
            }),
        });
        assert!(!node.is_busy());
        assert!(matches!(
            env.outbox.try_pop(),
            Some(Report::Outcome {
                state: NodeState::Aborted,
                ..
            })
        ));
        node.handle(crate::executor::Command {
            rollout_id: "r".into(),
            epoch: 1,
            kind: crate::executor::CommandKind::MakePermanent,
        });
        assert!(matches!(
            env.outbox.try_pop(),
            Some(Report::Outcome {
                state: NodeState::Aborted,
                ..
            })
        ));
        assert!(env.outbox.is_empty());
    }

    #[test]
    fn finished_rollouts_are_left_alone() {
        for state in [
            NodeState::Permanent,
            NodeState::Aborted,
            NodeState::RolledBack,
        ] {
            assert_eq!(
                decide(&record(Phase::Done, state), &apps("1.0", "1.0")),
                None
            );
        }
    }
}
