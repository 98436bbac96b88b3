//! Runs rollouts on this node, exactly as `docs/protocol.md` describes: one rollout at a time,
//! each in its own task, driven by the coordinator's commands and reporting through the outbox.
//!
//! [`Node`] is the node's single rollout slot: it validates a `RunScript`, starts the rollout,
//! and routes later commands (filtered by rollout id and epoch) to it. [`Run`] is one rollout:
//! `up` in order, the point of no return, barriers, and the abort and rollback paths.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotroll_script::diagnostic::render_short;
use hotroll_script::{Declared, Diagnostic, Instruction, PonrPosition, Script, Step};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::cancel::{CancelSource, CancelToken};
use crate::config::Config;
use crate::hooks::{self, Invocation};
use crate::journal::{Journal, JournalRecord};
use crate::outbox::Outbox;
use crate::report::{NodeState, Phase, Report, StepList, StepPhase, StepReport, now_unix_ms};
use crate::runtime::{
    ArtifactRef, BoxFuture, RolloutContext, Runtime, RuntimeError, StepContext, StepOutput,
};

/// How long the agent waits past a barrier's own timeout for the coordinator's release before it
/// gives up on its own (a coordinator that went away must not hang the node).
pub const BARRIER_SLACK: Duration = Duration::from_secs(10);

/// After a runtime operation overruns its deadline it is cancelled and given this long to clean
/// up before the executor stops waiting for it.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long a graceful shutdown waits for the running rollout to stop its step.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Control messages buffered for a running rollout; the coordinator sends a handful at most.
const CONTROL_QUEUE: usize = 64;

/// Instructions the executor runs itself, whatever the runtime.
pub const EXECUTOR_INSTRUCTIONS: [&str; 4] = ["sync_nodes", "point_of_no_return", "check", "apply"];

/// The step name used in reports for the default rollback (a script without `down`).
pub const DEFAULT_ROLLBACK: &str = "default_rollback";

/// File name used in diagnostics when RunScript names none.
const DEFAULT_SCRIPT_NAME: &str = "script.toml";

/// A coordinator command that belongs to a rollout.
#[derive(Debug, Clone)]
pub struct Command {
    pub rollout_id: String,
    pub epoch: u64,
    pub kind: CommandKind,
}

#[derive(Debug, Clone)]
pub enum CommandKind {
    RunScript(RunScript),
    BarrierRelease {
        barrier_id: String,
        ok: bool,
        reason: String,
    },
    Commit,
    Abort {
        reason: String,
    },
    Rollback {
        reason: String,
    },
    MakePermanent,
}

impl CommandKind {
    fn name(&self) -> &'static str {
        match self {
            CommandKind::RunScript(_) => "RunScript",
            CommandKind::BarrierRelease { .. } => "BarrierRelease",
            CommandKind::Commit => "Commit",
            CommandKind::Abort { .. } => "Abort",
            CommandKind::Rollback { .. } => "Rollback",
            CommandKind::MakePermanent => "MakePermanent",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunScript {
    pub script_name: String,
    pub script_source: String,
    pub artifacts: Vec<ArtifactRef>,
    /// Effective timeouts after CLI overrides; `None` = the script's own.
    pub step_timeout: Option<Duration>,
    pub barrier_timeout: Option<Duration>,
}

/// What the executor needs from the rest of the agent.
#[derive(Clone)]
pub struct Env {
    pub config: Arc<Config>,
    pub runtime: Arc<dyn Runtime>,
    pub journal: Journal,
    pub outbox: Arc<Outbox>,
}

/// The node's rollout slot.
pub struct Node {
    env: Env,
    /// Bumped on every Welcome so that a waiting rollout re-sends what it waits with
    /// (BarrierArrive, Prepared, COMMITTED): a report in flight when the session broke is lost.
    connected: watch::Sender<u64>,
    current: Option<Running>,
}

struct Running {
    rollout_id: String,
    epoch: u64,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
    shutdown: CancelSource,
    final_outcome: Arc<Mutex<Option<Report>>>,
}

impl Running {
    fn final_outcome(&self) -> Option<Report> {
        self.final_outcome.lock().ok().and_then(|o| o.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // If the agent is torn down without a graceful shutdown, dropping the task's future
        // still kills the hook it runs (its process-group guard).
        self.task.abort();
    }
}

impl Node {
    pub fn new(env: Env) -> Self {
        Self {
            env,
            connected: watch::Sender::new(0),
            current: None,
        }
    }

    /// The session was (re-)established.
    pub fn on_connected(&self) {
        self.connected.send_modify(|generation| *generation += 1);
    }

    /// Whether a rollout is running (not yet in a final state).
    pub fn is_busy(&self) -> bool {
        self.current.as_ref().is_some_and(|c| !c.task.is_finished())
    }

    /// What this node allows scripts of `runtime` (process or beam) to use.
    pub fn declared(&self, runtime: hotroll_script::Runtime) -> Declared {
        let mut supported: BTreeSet<&'static str> = EXECUTOR_INSTRUCTIONS.into_iter().collect();
        supported.extend(self.env.runtime.supported_for(runtime));
        Declared {
            hooks: self.env.config.hook_names(),
            services: self.env.config.service_names(),
            mfas: self.env.config.mfa_names(),
            supported_instructions: supported,
        }
    }

    /// Handle one coordinator command.
    pub fn handle(&mut self, command: Command) {
        let Command {
            rollout_id,
            epoch,
            kind,
        } = command;
        match kind {
            CommandKind::RunScript(run) => self.run_script(rollout_id, epoch, run),
            kind => self.route(&rollout_id, epoch, kind),
        }
    }

    fn route(&mut self, rollout_id: &str, epoch: u64, kind: CommandKind) {
        let Some(current) = &self.current else {
            if crate::recovery::answer_from_journal(&self.env, rollout_id, epoch) {
                return;
            }
            tracing::debug!(
                rollout_id,
                command = kind.name(),
                "ignoring a command for a rollout this node does not run"
            );
            return;
        };
        if current.rollout_id != rollout_id {
            if crate::recovery::answer_from_journal(&self.env, rollout_id, epoch) {
                return;
            }
            tracing::debug!(rollout_id, running = %current.rollout_id, command = kind.name(), "ignoring a command for another rollout");
            return;
        }
        if epoch < current.epoch {
            tracing::debug!(
                rollout_id,
                epoch,
                running_epoch = current.epoch,
                command = kind.name(),
                "ignoring a command with an older epoch"
            );
            return;
        }
        if current.task.is_finished() {
            // The rollout already ended here; the coordinator may have missed the final report.
            if let Some(outcome) = current.final_outcome() {
                self.env.outbox.push(outcome);
            }
            return;
        }
        let control = match kind {
            CommandKind::RunScript(_) => return,
            CommandKind::BarrierRelease {
                barrier_id,
                ok,
                reason,
            } => Control::BarrierRelease {
                barrier_id,
                ok,
                reason,
            },
            CommandKind::Commit => Control::Commit,
            CommandKind::Abort { reason } => Control::Abort(reason),
            CommandKind::Rollback { reason } => Control::Rollback(reason),
            CommandKind::MakePermanent => Control::MakePermanent,
        };
        if let Err(e) = current.control.try_send(control) {
            tracing::warn!(rollout_id, error = %e, "cannot pass a command to the running rollout");
        }
    }

    fn refuse(&self, rollout_id: &str, epoch: u64, errors: Vec<String>) {
        tracing::warn!(rollout_id, epoch, ?errors, "script refused");
        self.env.outbox.push(Report::ScriptRefused {
            rollout_id: rollout_id.to_string(),
            epoch,
            errors,
        });
    }

    fn run_script(&mut self, rollout_id: String, epoch: u64, run: RunScript) {
        if let Some(current) = &self.current {
            let same = current.rollout_id == rollout_id;
            if !current.task.is_finished() {
                if same && current.epoch == epoch {
                    // A RunScript sent again after a reconnect: the rollout already runs.
                    self.env
                        .outbox
                        .push(Report::ScriptAccepted { rollout_id, epoch });
                } else {
                    let message = format!(
                        "node is busy with rollout {} (epoch {})",
                        current.rollout_id, current.epoch
                    );
                    self.refuse(&rollout_id, epoch, vec![message]);
                }
                return;
            }
            if same && epoch <= current.epoch {
                if let Some(outcome) = current.final_outcome() {
                    self.env.outbox.push(outcome);
                }
                return;
            }
        }
        // A rollout that ended here before (e.g. settled by recovery after a restart) never
        // runs again: its recorded outcome answers.
        if crate::recovery::answer_from_journal(&self.env, &rollout_id, epoch) {
            return;
        }

        let name = if run.script_name.is_empty() {
            DEFAULT_SCRIPT_NAME
        } else {
            run.script_name.as_str()
        };
        let parsed = match hotroll_script::parse(name, &run.script_source) {
            Ok(parsed) => parsed,
            Err(diagnostics) => {
                let mut errors: Vec<String> = diagnostics
                    .errors()
                    .map(|d| render_short(&diagnostics.name, &diagnostics.source, d))
                    .collect();
                if errors.is_empty() {
                    errors = diagnostics.to_short_lines();
                }
                if errors.is_empty() {
                    errors.push(format!("{name}: the script could not be parsed"));
                }
                self.refuse(&rollout_id, epoch, errors);
                return;
            }
        };
        self.start_parsed(rollout_id, epoch, name, &run, parsed.script);
    }

    /// Validate a parsed script against this node and start it (or refuse it).
    pub fn start_parsed(
        &mut self,
        rollout_id: String,
        epoch: u64,
        script_name: &str,
        run: &RunScript,
        mut script: Script,
    ) {
        let errors = self.check_script(&script, script_name, &run.script_source);
        if !errors.is_empty() {
            self.refuse(&rollout_id, epoch, errors);
            return;
        }
        if let Some(t) = run.step_timeout {
            script.rollout.step_timeout = t;
        }
        if let Some(t) = run.barrier_timeout {
            script.rollout.barrier_timeout = t;
        }
        let rollout = RolloutContext {
            runtime: script.runtime,
            rollout_id: rollout_id.clone(),
            epoch,
            node: self.env.config.node.clone(),
            app: script.app.value.clone(),
            from: script.from.value.clone(),
            to: script.to.value.clone(),
            artifacts: run.artifacts.clone(),
            data_dir: self.env.config.data_dir.clone(),
        };

        tracing::info!(rollout_id, epoch, app = %rollout.app, from = %rollout.from, to = %rollout.to, steps = script.up.len(), "script accepted");
        self.env.outbox.push(Report::ScriptAccepted {
            rollout_id: rollout_id.clone(),
            epoch,
        });

        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let shutdown = CancelSource::new();
        let final_outcome = Arc::new(Mutex::new(None));
        let mut connected = self.connected.subscribe();
        connected.borrow_and_update();
        let run = Run {
            env: self.env.clone(),
            rollout,
            script,
            inbox: Inbox {
                control: control_rx,
                shutdown: shutdown.token(),
                connected,
                releases: HashMap::new(),
            },
            final_outcome: Arc::clone(&final_outcome),
            last_up_step: 0,
        };
        let task = tokio::spawn(run.run());
        self.current = Some(Running {
            rollout_id,
            epoch,
            control: control_tx,
            task,
            shutdown,
            final_outcome,
        });
    }

    /// Every error that forbids running `script` here, as `FILE:LINE:COL: error: message`.
    fn check_script(&self, script: &Script, name: &str, source: &str) -> Vec<String> {
        let declared = self.declared(script.runtime);
        let mut diagnostics: Vec<Diagnostic> = hotroll_script::validate_against(script, &declared)
            .into_iter()
            .filter(Diagnostic::is_error)
            .collect();
        if diagnostics.is_empty() {
            // The shared validator is the authority; this second look only makes sure the agent
            // never starts a script that names an undeclared hook or an instruction it cannot
            // run, whatever the validator's state.
            diagnostics = preflight(script, &declared, self.env.runtime.as_ref());
        }
        diagnostics
            .iter()
            .map(|d| render_short(name, source, d))
            .collect()
    }

    /// Stop the running rollout's step (killing its hook) and wait for its task, bounded.
    pub async fn shutdown(&mut self) {
        let Some(current) = &mut self.current else {
            return;
        };
        if current.task.is_finished() {
            return;
        }
        tracing::info!(rollout_id = %current.rollout_id, "stopping the running rollout for shutdown");
        current.shutdown.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut current.task)
            .await
            .is_err()
        {
            tracing::warn!(rollout_id = %current.rollout_id, "the rollout did not stop in time; abandoning it");
            current.task.abort();
        }
    }
}

/// The agent's own check of the names a script uses (see [`Node::check_script`]).
pub fn preflight(script: &Script, declared: &Declared, runtime: &dyn Runtime) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let declared_hooks = || {
        if declared.hooks.is_empty() {
            "it declares none".to_string()
        } else {
            let names: Vec<&str> = declared.hooks.iter().map(String::as_str).collect();
            format!("declared: {}", names.join(", "))
        }
    };
    let down = script.down.as_deref().unwrap_or_default();
    for step in script.up.iter().chain(down) {
        let name = step.instruction.name();
        if !declared.supported_instructions.contains(name) {
            errors.push(Diagnostic::error(
                step.span,
                format!("instruction `{name}` is not supported by this agent yet"),
            ));
            continue;
        }
        let beam = script.runtime == hotroll_script::Runtime::Beam;
        match &step.instruction {
            // In the beam runtime `apply` names an MFA from the agent's `mfa_allow`.
            Instruction::Apply { hook: mfa, .. } if beam && !declared.mfas.contains(&mfa.value) => {
                errors.push(Diagnostic::error(
                    mfa.span,
                    format!(
                        "MFA `{}` is not in this agent's allow-list (mfa_allow of its [[beam]] apps)",
                        mfa.value
                    ),
                ));
            }
            Instruction::Apply { .. } if beam => {}
            Instruction::Apply { hook, .. }
            | Instruction::Check {
                hook: Some(hook), ..
            } if !declared.hooks.contains(&hook.value) => {
                errors.push(Diagnostic::error(
                    hook.span,
                    format!(
                        "hook `{}` is not declared in this agent's config ({})",
                        hook.value,
                        declared_hooks()
                    ),
                ));
            }
            Instruction::Check {
                hook: None,
                modules,
                ..
            } if !modules.is_empty() && !runtime.supports_module_checks() => {
                errors.push(Diagnostic::error(
                    step.span,
                    "`check` of modules is not supported by this agent yet",
                ));
            }
            _ => {}
        }
    }
    errors
}

/// A command for the running rollout, after routing.
#[derive(Debug)]
enum Control {
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
    /// The agent shuts down: stop the step, report nothing (the journal says where we were).
    Shutdown,
}

impl Stop {
    fn describe(&self) -> String {
        let (what, reason) = match self {
            Stop::Abort(reason) => ("aborted by the coordinator", reason),
            Stop::Rollback(reason) => ("rollback requested by the coordinator", reason),
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
struct Run {
    env: Env,
    rollout: RolloutContext,
    script: Script,
    inbox: Inbox,
    final_outcome: Arc<Mutex<Option<Report>>>,
    /// Index of the last instruction of `up` that started.
    last_up_step: u32,
}

impl Run {
    async fn run(mut self) {
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
        output: &str,
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
            output: output.to_string(),
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
                tracing::info!(rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, instruction, ?duration, "step succeeded");
                self.report_step(
                    list,
                    index,
                    instruction,
                    StepPhase::Succeeded,
                    duration,
                    "",
                    &out.output,
                );
            }
            Err(f) => {
                tracing::warn!(rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, instruction, ?duration, error = %f.error, "step failed");
                self.report_step(
                    list,
                    index,
                    instruction,
                    StepPhase::Failed,
                    duration,
                    &f.error,
                    &f.output,
                );
            }
        }
    }

    async fn journal(&self, phase: Phase, state: NodeState, error: &str) -> Result<(), String> {
        let record = JournalRecord::new(
            &self.rollout.rollout_id,
            self.rollout.epoch,
            self.last_up_step,
            phase,
            state,
        )
        .with_error(error)
        .with_scope(crate::journal::Scope::of(&self.rollout));
        self.env.journal.record(record).await.map_err(|e| {
            tracing::error!(error = %e, "journal write failed");
            e.to_string()
        })
    }

    async fn run_up(&mut self) -> UpEnd {
        let ponr = self.script.ponr();
        let steps = self.script.up.len();
        let mut committed = false;
        for index in 0..=steps {
            if !committed && ponr == PonrPosition::Implicit(index) {
                match self.prepare_and_wait().await {
                    Ok(()) => committed = true,
                    Err(end) => return end,
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
            let started = Instant::now();
            if let Err(e) = self.journal(phase, state, "").await {
                let failure =
                    StepFailure::new(format!("cannot write the journal before running it: {e}"));
                self.report_end(StepList::Up, index, name, started, &Err(failure.clone()));
                return UpEnd::Failed {
                    error: format!("up[{index}] `{name}`: {}", failure.error),
                    committed,
                };
            }
            tracing::info!(rollout_id = %self.rollout.rollout_id, step = index, instruction = name, "step started");
            self.report_step(
                StepList::Up,
                index,
                name,
                StepPhase::Started,
                Duration::ZERO,
                "",
                "",
            );

            let (result, stop) = match &step.instruction {
                Instruction::PointOfNoReturn => match self.prepare_and_wait().await {
                    Ok(()) => {
                        committed = true;
                        (Ok(StepOutput::default()), None)
                    }
                    Err(UpEnd::Failed { error, .. }) => {
                        let failure = Err(StepFailure::new(error.clone()));
                        self.report_end(StepList::Up, index, name, started, &failure);
                        return UpEnd::Failed {
                            error,
                            committed: false,
                        };
                    }
                    Err(_) => return UpEnd::Shutdown,
                },
                Instruction::SyncNodes { id, .. } => {
                    let timeout = self.script.step_deadline(&step);
                    self.barrier(StepList::Up, index, &id.value, timeout, true)
                        .await
                }
                _ => self.run_instruction(StepList::Up, index, &step, true).await,
            };
            if stop == Some(Stop::Shutdown) {
                return UpEnd::Shutdown;
            }
            self.report_end(StepList::Up, index, name, started, &result);
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
        }
        UpEnd::Completed
    }

    /// The point of no return: report Prepared and wait for Commit. `Err` carries how `up` ends
    /// instead: failed before the point of no return (Abort, Rollback, a journal failure) or
    /// shut down.
    async fn prepare_and_wait(&mut self) -> Result<(), UpEnd> {
        let not_committed = |error: String| UpEnd::Failed {
            error,
            committed: false,
        };
        self.journal(Phase::Prepared, NodeState::Prepared, "")
            .await
            .map_err(|e| {
                not_committed(format!(
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
                Event::Shutdown => return Err(UpEnd::Shutdown),
                Event::Reconnected => self.push(prepared.clone()),
                Event::Control(Control::Commit) => break,
                // Before the point of no return a Rollback means the same as an Abort: nothing
                // changed yet, so there is nothing to roll back.
                Event::Control(Control::Abort(reason)) => {
                    return Err(not_committed(Stop::Abort(reason).describe()));
                }
                Event::Control(Control::Rollback(reason)) => {
                    return Err(not_committed(Stop::Rollback(reason).describe()));
                }
                Event::Control(other) => self.inbox.keep(other),
            }
        }
        // Recovery must know that the node went past the point of no return before anything
        // changes: if this write fails, nothing has changed yet, so abort.
        self.journal(Phase::Committing, NodeState::Committing, "")
            .await
            .map_err(|e| {
                not_committed(format!(
                    "cannot journal the commit, so not going past the point of no return: {e}"
                ))
            })?;
        tracing::info!(rollout_id = %self.rollout.rollout_id, "committed: past the point of no return");
        Ok(())
    }

    /// `sync_nodes`: arrive and wait for the release, bounded by the barrier's timeout plus
    /// [`BARRIER_SLACK`].
    async fn barrier(
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
        tracing::info!(rollout_id = %self.rollout.rollout_id, list = list.as_str(), step = index, barrier_id, "arrived at barrier; waiting for its release");
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

    /// Failure before the point of no return: discard what was staged, report ABORTED.
    async fn abort(&mut self, error: String) -> Report {
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
    async fn rollback(&mut self, error: String) -> Option<Report> {
        tracing::warn!(rollout_id = %self.rollout.rollout_id, %error, "rolling back");
        let _ = self
            .journal(Phase::RollingBack, NodeState::RollingBack, &error)
            .await;
        self.push(self.outcome(NodeState::RollingBack, &error));
        // Releases kept from `up` must not satisfy a barrier of `down`.
        self.inbox.releases.clear();

        let mut failed = None;
        match self.script.down.clone() {
            Some(down) => {
                for (index, step) in down.iter().enumerate() {
                    let name = step.instruction.name();
                    let started = Instant::now();
                    if let Err(e) = self
                        .journal(Phase::RollingBack, NodeState::RollingBack, &error)
                        .await
                    {
                        // Keep rolling back: stopping would leave the node half-changed.
                        tracing::warn!(error = %e, "rolling back without a journal record");
                    }
                    self.report_step(
                        StepList::Down,
                        index,
                        name,
                        StepPhase::Started,
                        Duration::ZERO,
                        "",
                        "",
                    );
                    let (result, stop) = match &step.instruction {
                        Instruction::SyncNodes { id, .. } => {
                            let timeout = self.script.step_deadline(step);
                            self.barrier(StepList::Down, index, &id.value, timeout, false)
                                .await
                        }
                        Instruction::PointOfNoReturn => (Ok(StepOutput::default()), None),
                        _ => {
                            self.run_instruction(StepList::Down, index, step, false)
                                .await
                        }
                    };
                    if stop == Some(Stop::Shutdown) {
                        return None;
                    }
                    self.report_end(StepList::Down, index, name, started, &result);
                    if let Err(f) = result {
                        failed = Some(format!(
                            "rollback failed at down[{index}] `{name}`: {}",
                            f.error
                        ));
                        break;
                    }
                }
            }
            None => {
                let started = Instant::now();
                self.report_step(
                    StepList::Down,
                    0,
                    DEFAULT_ROLLBACK,
                    StepPhase::Started,
                    Duration::ZERO,
                    "",
                    "",
                );
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
                let (result, stop) = drive(&mut self.inbox, &cancel, work, false).await;
                if stop == Some(Stop::Shutdown) {
                    return None;
                }
                self.report_end(StepList::Down, 0, DEFAULT_ROLLBACK, started, &result);
                if let Err(f) = result {
                    failed = Some(format!("default rollback failed: {}", f.error));
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

/// Run one instruction that is neither a barrier nor the point of no return.
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
    let runtime = env.runtime.as_ref();
    let name = step.instruction.name();
    let work: BoxFuture<'_, Result<StepOutput, RuntimeError>> = match &step.instruction {
        // Beam: an allow-listed MFA called in the node by the runtime, never a hook.
        Instruction::Apply {
            hook: mfa, args, ..
        } if rollout.runtime == hotroll_script::Runtime::Beam => runtime.apply(&ctx, mfa, args),
        Instruction::Apply { hook, args, .. }
        | Instruction::Check {
            hook: Some(hook),
            args,
            ..
        } => {
            return run_hook(
                env,
                rollout,
                list,
                index,
                &hook.value,
                args,
                deadline,
                &ctx.cancel,
            )
            .await;
        }
        Instruction::Check { modules, .. } => runtime.check_modules(&ctx, modules),
        Instruction::LoadObjectCode { artifacts } => runtime.load_object_code(&ctx, artifacts),
        Instruction::Suspend { targets, .. } => runtime.suspend(&ctx, targets),
        Instruction::Load { targets } => runtime.load(&ctx, targets),
        Instruction::CodeChange {
            targets,
            extra,
            mode,
            ..
        } => runtime.code_change(&ctx, targets, extra.as_deref(), *mode),
        Instruction::Resume { targets } => runtime.resume(&ctx, targets),
        Instruction::Stop { targets } => runtime.stop(&ctx, targets),
        Instruction::Start { targets } => runtime.start(&ctx, targets),
        Instruction::Restart { targets } => runtime.restart(&ctx, targets),
        Instruction::Health { service, .. } => runtime.health(&ctx, service),
        Instruction::Purge { targets, brutal } => runtime.purge(&ctx, targets, *brutal),
        Instruction::RestartNewEmulator => runtime.restart_new_emulator(&ctx),
        // Handled by the rollout itself; nothing to do if one ever reaches here.
        Instruction::SyncNodes { .. } | Instruction::PointOfNoReturn => {
            return Ok(StepOutput::default());
        }
    };
    bounded(work, deadline, cancel, name).await
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
        None => Ok(StepOutput { output: run.output }),
        Some(error) => Err(StepFailure {
            error,
            output: run.output,
        }),
    }
}

#[cfg(test)]
mod tests;
