//! The step runner: one step of `up` or `down`, run the same way on both paths — its journal
//! record first, the Started report, the work (bounded by its deadline, stopped by the commands
//! that may stop it), then the Succeeded or Failed report.

use std::time::{Duration, Instant};

use hotroll_script::{Instruction, Runtime as ScriptRuntime, Script, Step};

use super::{Control, Event, Inbox, Run, StepFailure, StepOutcome, Stop};
use crate::cancel::{CancelSource, CancelToken};
use crate::executor::{CANCEL_GRACE, DEFAULT_ROLLBACK, Env, LOG_TARGET};
use crate::hooks::{self, Invocation};
use crate::report::{NodeState, Phase, StepList, StepPhase};
use crate::runtime::{BoxFuture, RolloutContext, RuntimeError, StepContext, StepOutput};

/// What a step does.
pub(super) enum Work<'s> {
    /// `point_of_no_return` in `up`: Prepared, then wait for Commit.
    PointOfNoReturn,
    /// `sync_nodes`: arrive, wait for the release.
    Barrier { id: &'s str, timeout: Duration },
    /// A hook or a runtime instruction.
    Instruction(&'s Step),
    /// The runtime's default rollback (a script without `down`).
    DefaultRollback,
    /// Nothing (`point_of_no_return` in `down`).
    Nothing,
}

impl<'s> Work<'s> {
    /// What `step` of `list` does.
    pub(super) fn of(script: &Script, list: StepList, step: &'s Step) -> Self {
        match &step.instruction {
            Instruction::SyncNodes { id, .. } => Work::Barrier {
                id: &id.value,
                timeout: script.step_deadline(step),
            },
            Instruction::PointOfNoReturn if list == StepList::Up => Work::PointOfNoReturn,
            Instruction::PointOfNoReturn => Work::Nothing,
            _ => Work::Instruction(step),
        }
    }
}

/// The journal record written before a step runs.
pub(super) enum JournalFirst {
    /// `up`: the step runs only once this record is durable.
    Required(Phase, NodeState),
    /// `down`: rolling back goes on without it (stopping would leave the node half-changed);
    /// the record carries the rollback's reason.
    BestEffort(Phase, NodeState, String),
    /// Nothing new to record.
    Skip,
}

/// How a step ended.
pub(super) enum Ran {
    /// It ran to its end and was reported; `stop` when a command stopped it.
    Ended {
        result: Result<StepOutput, StepFailure>,
        stop: Option<Stop>,
    },
    /// The agent shuts down: the step was stopped and not reported (the journal says where
    /// the rollout was).
    Shutdown,
}

impl Run {
    /// Run one step (see the module docs). `interruptible`: Abort and Rollback stop it (`up`).
    pub(super) async fn run_step(
        &mut self,
        list: StepList,
        index: usize,
        name: &str,
        first: JournalFirst,
        work: Work<'_>,
        interruptible: bool,
    ) -> Ran {
        let started = Instant::now();
        match first {
            JournalFirst::Required(phase, state) => {
                if let Err(e) = self.journal(phase, state, "").await {
                    let result = Err(StepFailure::new(format!(
                        "cannot write the journal before running it: {e}"
                    )));
                    self.report_end(list, index, name, started, &result);
                    return Ran::Ended { result, stop: None };
                }
            }
            JournalFirst::BestEffort(phase, state, error) => {
                if let Err(e) = self.journal(phase, state, &error).await {
                    tracing::warn!(error = %e, "rolling back without a journal record");
                }
            }
            JournalFirst::Skip => {}
        }
        tracing::info!(target: LOG_TARGET, node = %self.env.config.node, rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, instruction = name, "step started");
        self.report_step(
            list,
            index,
            name,
            StepPhase::Started,
            Duration::ZERO,
            "",
            &StepOutput::default(),
        );
        let (result, stop) = match work {
            Work::PointOfNoReturn => match self
                .prepare_and_wait((index + 1 < self.script.up.len()).then_some(index + 1))
                .await
            {
                Ok(()) => (Ok(StepOutput::default()), None),
                Err(stop) => (Err(StepFailure::new(stop.describe())), Some(stop)),
            },
            Work::Barrier { id, timeout } => {
                self.barrier(list, index, id, timeout, interruptible).await
            }
            Work::Instruction(step) => self.run_instruction(list, index, step, interruptible).await,
            Work::DefaultRollback => self.run_default_rollback().await,
            Work::Nothing => (Ok(StepOutput::default()), None),
        };
        if stop == Some(Stop::Shutdown) {
            return Ran::Shutdown;
        }
        self.report_end(list, index, name, started, &result);
        Ran::Ended { result, stop }
    }

    /// Run a hook or runtime instruction while listening for commands: Abort or Rollback (when
    /// `interruptible`) and shutdown cancel it, and the step is then awaited to its end so that
    /// whatever it started is killed and reaped before the rollout moves on.
    async fn run_instruction(
        &mut self,
        list: StepList,
        index: usize,
        step: &Step,
        interruptible: bool,
    ) -> StepOutcome {
        let cancel = CancelSource::new();
        let work = execute(
            &self.env,
            &self.rollout,
            &self.script,
            list,
            index,
            step,
            &cancel,
        );
        drive(&mut self.inbox, &cancel, work, interruptible).await
    }

    /// The runtime's default rollback, bounded by the rollout's step timeout.
    async fn run_default_rollback(&mut self) -> StepOutcome {
        let cancel = CancelSource::new();
        let ctx = StepContext {
            rollout: &self.rollout,
            list: StepList::Down,
            step: 0,
            deadline: self.script.rollout.step_timeout,
            cancel: cancel.token(),
        };
        let work = bounded(
            self.env.runtime.default_rollback(&ctx),
            ctx.deadline,
            &cancel,
            DEFAULT_ROLLBACK,
        );
        drive(&mut self.inbox, &cancel, work, false).await
    }
}

/// Poll `work` to its end while handling commands. A stop cancels `work` through `cancel` but
/// keeps polling it, so that its cleanup (killing and reaping a hook) completes.
async fn drive<F>(
    inbox: &mut Inbox,
    cancel: &CancelSource,
    work: F,
    interruptible: bool,
) -> StepOutcome
where
    F: Future<Output = Result<StepOutput, StepFailure>>,
{
    tokio::pin!(work);
    let mut stop = None;
    loop {
        let event = tokio::select! {
            result = &mut work => return (result, stop),
            event = inbox.next(), if stop.is_none() => event,
        };
        let requested = match event {
            Event::Shutdown => Some(Stop::Shutdown),
            Event::Control(Control::Abort(reason)) if interruptible => Some(Stop::Abort(reason)),
            Event::Control(Control::Rollback(reason)) if interruptible => {
                Some(Stop::Rollback(reason))
            }
            Event::Control(other) => {
                inbox.keep(other);
                None
            }
            Event::Reconnected => None,
        };
        if let Some(requested) = requested {
            tracing::info!(reason = %requested.describe(), "stopping the running step");
            cancel.cancel();
            stop = Some(requested);
        }
    }
}

/// Run a hook (`apply` of a process script, `check` of a hook) or hand the instruction to the
/// runtime.
async fn execute(
    env: &Env,
    rollout: &RolloutContext,
    script: &Script,
    list: StepList,
    index: usize,
    step: &Step,
    cancel: &CancelSource,
) -> Result<StepOutput, StepFailure> {
    let deadline = script.step_deadline(step);
    let ctx = StepContext {
        rollout,
        list,
        step: index,
        deadline,
        cancel: cancel.token(),
    };
    match &step.instruction {
        // In a beam script `apply` names an allow-listed MFA, which the runtime calls.
        Instruction::Apply { hook, args, .. } if rollout.runtime != ScriptRuntime::Beam => {
            run_hook(
                env,
                rollout,
                list,
                index,
                &hook.value,
                args,
                deadline,
                &ctx.cancel,
            )
            .await
        }
        Instruction::Check {
            hook: Some(hook),
            args,
            ..
        } => {
            run_hook(
                env,
                rollout,
                list,
                index,
                &hook.value,
                args,
                deadline,
                &ctx.cancel,
            )
            .await
        }
        Instruction::Gate { gate } => run_gate(env, gate, deadline, cancel).await,
        // Handled by the rollout itself; nothing to do if one ever reaches here.
        Instruction::SyncNodes { .. } | Instruction::PointOfNoReturn => Ok(StepOutput::default()),
        instruction => {
            let work = env.runtime.step(&ctx, instruction);
            bounded(work, deadline, cancel, instruction.name()).await
        }
    }
}

/// A node gate against the Prometheus this agent's config declares (`$node` = this node);
/// passing is success, anything else (no Prometheus configured, an error, a value that breaks
/// the condition, the timeout) fails the step with the reason.
async fn run_gate(
    env: &Env,
    spec: &hotroll_script::GateSpec,
    deadline: Duration,
    cancel: &CancelSource,
) -> Result<StepOutput, StepFailure> {
    let Some(prometheus) = &env.config.prometheus else {
        return Err(StepFailure::new(
            "the `gate` instruction needs a Prometheus: this agent's config has no [prometheus] url",
        ));
    };
    let gate = hotroll_gate::Gate::for_node(spec, &env.config.node);
    let work: BoxFuture<'_, Result<StepOutput, RuntimeError>> = Box::pin(async {
        let outcome = hotroll_gate::evaluate(prometheus, &gate).await;
        let reason = outcome.reason(&gate);
        if outcome.passed() {
            Ok(StepOutput::new(reason))
        } else {
            Err(RuntimeError::Failed {
                message: format!("gate failed: {reason}"),
                output: String::new(),
            })
        }
    });
    bounded(work, deadline, cancel, "gate").await
}

/// Enforce a runtime operation's deadline: cancel it when it passes, give it [`CANCEL_GRACE`]
/// to clean up, then stop waiting.
async fn bounded(
    work: BoxFuture<'_, Result<StepOutput, RuntimeError>>,
    deadline: Duration,
    cancel: &CancelSource,
    name: &str,
) -> Result<StepOutput, StepFailure> {
    let mut work = work;
    tokio::select! {
        result = &mut work => result.map_err(StepFailure::from),
        () = tokio::time::sleep(deadline) => {
            cancel.cancel();
            let output = match tokio::time::timeout(CANCEL_GRACE, &mut work).await {
                Ok(Ok(out)) => out.output,
                Ok(Err(e)) => e.output().to_string(),
                Err(_) => String::new(),
            };
            Err(StepFailure {
                error: format!("`{name}` did not finish within {deadline:?}"),
                output,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_hook(
    env: &Env,
    rollout: &RolloutContext,
    list: StepList,
    index: usize,
    name: &str,
    args: &[String],
    deadline: Duration,
    cancel: &CancelToken,
) -> Result<StepOutput, StepFailure> {
    // Validation refused undeclared hooks already; this lookup is what makes it impossible to
    // run anything else.
    let Some(hook) = env.config.hooks.get(name) else {
        return Err(StepFailure::new(format!(
            "hook `{name}` is not declared in this agent's config"
        )));
    };
    let timeout = hook.timeout.map_or(deadline, |own| own.min(deadline));
    let vars = [
        ("HOTROLL_NODE", rollout.node.clone()),
        ("HOTROLL_ROLLOUT_ID", rollout.rollout_id.clone()),
        ("HOTROLL_APP", rollout.app.clone()),
        ("HOTROLL_FROM", rollout.from.clone()),
        ("HOTROLL_TO", rollout.to.clone()),
        ("HOTROLL_STEP", index.to_string()),
        ("HOTROLL_PHASE", list.as_str().to_string()),
    ];
    let env_vars: Vec<(String, String)> =
        vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let invocation = Invocation {
        name,
        hook,
        args,
        cwd: &rollout.data_dir,
        env: &env_vars,
        timeout,
    };
    let run = hooks::run(&invocation, cancel)
        .await
        .map_err(|e| StepFailure::new(e.to_string()))?;
    match run.error() {
        None => Ok(StepOutput::new(run.output)),
        Some(error) => Err(StepFailure {
            error,
            output: run.output,
        }),
    }
}
