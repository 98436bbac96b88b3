//! One rollout on this node: `up` in order, the point of no return, then MakePermanent — or the
//! abort and rollback paths (`rollback`). Every instruction of `up` and `down` goes through
//! the one step runner (`step`); the waits for the coordinator (Commit, barrier releases) are
//! in `waits`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotroll_script::{Instruction, PonrPosition, Script};
use tokio::sync::{mpsc, watch};

use self::step::{JournalFirst, Ran, Work};
use super::{Env, LOG_TARGET};
use crate::cancel::CancelToken;
use crate::journal::{JournalRecord, Scope};
use crate::report::{NodeState, Phase, Report, StepList, StepPhase, StepReport, now_unix_ms};
use crate::runtime::{RolloutContext, RuntimeError, StepOutput};

mod rollback;
mod step;
mod waits;

/// A command for the running rollout, after routing.
#[derive(Debug)]
pub(super) enum Control {
    BarrierRelease {
        barrier_id: String,
        ok: bool,
        reason: String,
    },
    Commit,
    Abort(String),
    Rollback(String),
    MakePermanent,
}

/// Why a rollout stops what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Abort(String),
    Rollback(String),
    /// The journal cannot record the point of no return: going on would leave recovery blind.
    Journal(String),
    /// The agent shuts down: stop the step, report nothing (the journal says where we were).
    Shutdown,
}

impl Stop {
    fn describe(&self) -> String {
        let (what, reason) = match self {
            Stop::Abort(reason) => ("aborted by the coordinator", reason),
            Stop::Rollback(reason) => ("rollback requested by the coordinator", reason),
            Stop::Journal(error) => return error.clone(),
            Stop::Shutdown => return "the agent is shutting down".to_string(),
        };
        if reason.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {reason}")
        }
    }
}

enum Event {
    Control(Control),
    Reconnected,
    Shutdown,
}

/// The rollout's view of the outside world while it waits.
struct Inbox {
    control: mpsc::Receiver<Control>,
    shutdown: CancelToken,
    /// Bumped on every Welcome: a waiting rollout re-sends what it waits with.
    connected: watch::Receiver<u64>,
    /// Barrier releases that came before the rollout waited at that barrier.
    releases: HashMap<String, (bool, String)>,
}

impl Inbox {
    async fn next(&mut self) -> Event {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Event::Shutdown,
            control = self.control.recv() => control.map_or(Event::Shutdown, Event::Control),
            changed = self.connected.changed() => match changed {
                Ok(()) => Event::Reconnected,
                // The node is gone: so is whoever this rollout reports to.
                Err(_) => Event::Shutdown,
            },
        }
    }

    /// A control message that the current wait does not consume.
    fn keep(&mut self, control: Control) {
        match control {
            Control::BarrierRelease {
                barrier_id,
                ok,
                reason,
            } => {
                self.releases.insert(barrier_id, (ok, reason));
            }
            other => {
                tracing::debug!(control = ?other, "ignoring a command that does not apply now")
            }
        }
    }
}

/// A step's failure: the error line and any captured output.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StepFailure {
    error: String,
    output: String,
}

impl StepFailure {
    fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            output: String::new(),
        }
    }
}

impl From<RuntimeError> for StepFailure {
    fn from(e: RuntimeError) -> Self {
        Self {
            output: e.output().to_string(),
            error: e.to_string(),
        }
    }
}

type StepOutcome = (Result<StepOutput, StepFailure>, Option<Stop>);

enum UpEnd {
    /// Every instruction of `up` ran, past the point of no return.
    Completed,
    Failed {
        error: String,
        committed: bool,
    },
    Shutdown,
}

/// One rollout on this node.
pub(super) struct Run {
    env: Env,
    rollout: RolloutContext,
    script: Script,
    inbox: Inbox,
    final_outcome: Arc<Mutex<Option<Report>>>,
    /// Index of the last instruction of `up` that started.
    last_up_step: u32,
    /// The last record this run made durable: a write that would say exactly the same again is
    /// left out (the point of no return's records double as the records of the steps around it;
    /// `docs/performance.md`, "The point of no return shares its records").
    journaled: Option<Journaled>,
}

/// What a journal record says, for [`Run::journaled`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Journaled {
    step: u32,
    phase: Phase,
    state: NodeState,
    error: String,
}

impl Run {
    pub(super) fn new(
        env: Env,
        rollout: RolloutContext,
        script: Script,
        control: mpsc::Receiver<Control>,
        shutdown: CancelToken,
        connected: watch::Receiver<u64>,
        final_outcome: Arc<Mutex<Option<Report>>>,
    ) -> Self {
        Self {
            env,
            rollout,
            script,
            inbox: Inbox {
                control,
                shutdown,
                connected,
                releases: HashMap::new(),
            },
            final_outcome,
            last_up_step: 0,
            journaled: None,
        }
    }

    pub(super) async fn run(mut self) {
        let outcome = match self.run_up().await {
            UpEnd::Completed => self.await_permanent().await,
            UpEnd::Failed {
                error,
                committed: false,
            } => Some(self.abort(error).await),
            UpEnd::Failed {
                error,
                committed: true,
            } => self.rollback(error).await,
            UpEnd::Shutdown => None,
        };
        match outcome {
            Some(outcome) => {
                if let Ok(mut slot) = self.final_outcome.lock() {
                    *slot = Some(outcome);
                }
            }
            None => {
                tracing::info!(rollout_id = %self.rollout.rollout_id, "rollout stopped by shutdown; the journal keeps its state")
            }
        }
    }

    fn push(&self, report: Report) {
        self.env.outbox.push(report);
    }

    fn outcome(&self, state: NodeState, error: &str) -> Report {
        Report::Outcome {
            rollout_id: self.rollout.rollout_id.clone(),
            epoch: self.rollout.epoch,
            state,
            error: error.to_string(),
            step: self.last_up_step,
            apps: self.env.runtime.apps(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn report_step(
        &self,
        list: StepList,
        index: usize,
        instruction: &str,
        phase: StepPhase,
        duration: Duration,
        error: &str,
        output: &StepOutput,
    ) {
        self.push(Report::Step(StepReport {
            rollout_id: self.rollout.rollout_id.clone(),
            epoch: self.rollout.epoch,
            step: u32::try_from(index).unwrap_or(u32::MAX),
            list,
            instruction: instruction.to_string(),
            phase,
            duration,
            error: error.to_string(),
            output: output.output.clone(),
            warnings: output.warnings.clone(),
            at_unix_ms: now_unix_ms(),
        }));
    }

    fn report_end(
        &self,
        list: StepList,
        index: usize,
        instruction: &str,
        started: Instant,
        result: &Result<StepOutput, StepFailure>,
    ) {
        let duration = started.elapsed();
        match result {
            Ok(out) => {
                tracing::info!(target: LOG_TARGET, rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, instruction, ?duration, "step succeeded");
                for warning in &out.warnings {
                    tracing::warn!(target: LOG_TARGET, rollout_id = %self.rollout.rollout_id, step = index, instruction, %warning, "step succeeded with a warning");
                }
                self.report_step(
                    list,
                    index,
                    instruction,
                    StepPhase::Succeeded,
                    duration,
                    "",
                    out,
                );
            }
            Err(f) => {
                tracing::warn!(target: LOG_TARGET, rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, instruction, ?duration, error = %f.error, "step failed");
                self.report_step(
                    list,
                    index,
                    instruction,
                    StepPhase::Failed,
                    duration,
                    &f.error,
                    &StepOutput::new(f.output.clone()),
                );
            }
        }
    }

    async fn journal(&mut self, phase: Phase, state: NodeState, error: &str) -> Result<(), String> {
        self.journal_at(self.last_up_step, phase, state, error)
            .await
    }

    /// Make durable that the rollout is at `step` of `up` in `phase`, unless the journal's last
    /// record from this run already says so.
    async fn journal_at(
        &mut self,
        step: u32,
        phase: Phase,
        state: NodeState,
        error: &str,
    ) -> Result<(), String> {
        let says = Journaled {
            step,
            phase,
            state,
            error: error.to_string(),
        };
        if self.journaled.as_ref() == Some(&says) {
            return Ok(());
        }
        let record = JournalRecord::new(
            &self.rollout.rollout_id,
            self.rollout.epoch,
            step,
            phase,
            state,
        )
        .with_error(error)
        .with_scope(Scope::of(&self.rollout));
        // Whatever happens to this write, the last durable record may no longer be `journaled`.
        self.journaled = None;
        self.env.journal.record(record).await.map_err(|e| {
            tracing::error!(error = %e, "journal write failed");
            e.to_string()
        })?;
        self.journaled = Some(says);
        Ok(())
    }

    async fn run_up(&mut self) -> UpEnd {
        let ponr = self.script.ponr();
        let steps = self.script.up.len();
        let mut committed = false;
        for index in 0..=steps {
            if !committed && ponr == PonrPosition::Implicit(index) {
                // The Committing record names this step, the first to run past the point.
                let next = (index < steps).then_some(index);
                match self.prepare_and_wait(next).await {
                    Ok(()) => committed = true,
                    Err(Stop::Shutdown) => return UpEnd::Shutdown,
                    Err(stop) => {
                        return UpEnd::Failed {
                            error: stop.describe(),
                            committed: false,
                        };
                    }
                }
            }
            let Some(step) = self.script.up.get(index).cloned() else {
                break;
            };
            let name = step.instruction.name();
            self.last_up_step = u32::try_from(index).unwrap_or(u32::MAX);
            let (phase, state) = if committed {
                (Phase::Committing, NodeState::Committing)
            } else {
                (Phase::Preparing, NodeState::Preparing)
            };
            let work = Work::of(&self.script, StepList::Up, &step);
            // The point of no return's own record is `prepared`: it is the record before this
            // instruction and the one that says the node waits for Commit.
            let first = if matches!(work, Work::PointOfNoReturn) {
                JournalFirst::Required(Phase::Prepared, NodeState::Prepared)
            } else {
                JournalFirst::Required(phase, state)
            };
            let (result, stop) = match self
                .run_step(StepList::Up, index, name, first, work, true)
                .await
            {
                Ran::Ended { result, stop } => (result, stop),
                Ran::Shutdown => return UpEnd::Shutdown,
            };
            if let Some(stop) = stop {
                return UpEnd::Failed {
                    error: stop.describe(),
                    committed,
                };
            }
            if let Err(failure) = result {
                return UpEnd::Failed {
                    error: format!("up[{index}] `{name}`: {}", failure.error),
                    committed,
                };
            }
            if matches!(step.instruction, Instruction::PointOfNoReturn) {
                committed = true;
            }
        }
        UpEnd::Completed
    }

    /// After `up`: report COMMITTED and wait for MakePermanent (or a Rollback).
    async fn await_permanent(&mut self) -> Option<Report> {
        if let Err(e) = self
            .journal(Phase::Committing, NodeState::Committed, "")
            .await
        {
            // The node is committed whether or not this record lands; the previous record
            // (committing) already tells recovery to roll back, which is the safe reading.
            tracing::warn!(error = %e, "continuing without journaling COMMITTED");
        }
        let committed = self.outcome(NodeState::Committed, "");
        tracing::info!(rollout_id = %self.rollout.rollout_id, "committed; waiting for MakePermanent");
        self.push(committed.clone());
        loop {
            match self.inbox.next().await {
                Event::Shutdown => return None,
                Event::Reconnected => self.push(committed.clone()),
                Event::Control(Control::MakePermanent) => {
                    crate::fault::point("make_permanent");
                    break;
                }
                // An Abort after the commit can only mean the coordinator wants this node back
                // where it was: that is a rollback now.
                Event::Control(Control::Rollback(reason) | Control::Abort(reason)) => {
                    return self.rollback(Stop::Rollback(reason).describe()).await;
                }
                Event::Control(other) => self.inbox.keep(other),
            }
        }
        let bound = self.script.rollout.step_timeout;
        let result =
            match tokio::time::timeout(bound, self.env.runtime.make_permanent(&self.rollout)).await
            {
                // The node is not on the new release any more (an Erlang node killed after
                // install_release came back on its permanent release): roll it back, which
                // finishes the job and reports what happened.
                Ok(Err(RuntimeError::NotRunningNew(why))) => {
                    return self.rollback(format!("make_permanent: {why}")).await;
                }
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("make_permanent did not finish within {bound:?}")),
            };
        let outcome = match result {
            Ok(()) => {
                tracing::info!(rollout_id = %self.rollout.rollout_id, "release made permanent");
                let _ = self.journal(Phase::Done, NodeState::Permanent, "").await;
                self.outcome(NodeState::Permanent, "")
            }
            Err(error) => {
                let error = format!("make_permanent failed: {error}");
                tracing::error!(rollout_id = %self.rollout.rollout_id, %error);
                let _ = self.journal(Phase::Done, NodeState::Failed, &error).await;
                self.outcome(NodeState::Failed, &error)
            }
        };
        self.push(outcome.clone());
        Some(outcome)
    }
}
