//! Runs rollouts on this node, exactly as `docs/protocol.md` describes: one rollout at a time,
//! each in its own task, driven by the coordinator's commands and reporting through the outbox.
//!
//! [`Node`] is the node's single rollout slot: it validates a `RunScript` ([`preflight`]), starts
//! the rollout, and routes later commands (filtered by rollout id and epoch) to it. `rollout`
//! runs one: `up` in order, the point of no return, barriers, and the abort and rollback paths,
//! every step through one step runner. [`recovery`] settles what a previous agent process left.

mod preflight;
pub mod recovery;
mod rollout;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotroll_script::diagnostic::render_short;
use hotroll_script::{Declared, Diagnostic, Script};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use self::preflight::preflight;
use self::rollout::{Control, Run};
use crate::cancel::CancelSource;
use crate::config::Config;
use crate::journal::Journal;
use crate::outbox::Outbox;
use crate::report::Report;
use crate::runtime::{ArtifactRef, RolloutContext, Runtime};

/// How long the agent waits past a barrier's own timeout for the coordinator's release before it
/// gives up on its own (a coordinator that went away must not hang the node).
pub const BARRIER_SLACK: Duration = Duration::from_secs(10);

/// The tracing target of the executor's step events, whichever submodule logs them: the scale
/// bench reads barrier arrivals and step ends under it.
const LOG_TARGET: &str = module_path!();

/// After a runtime operation overruns its deadline it is cancelled and given this long to clean
/// up before the executor stops waiting for it.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long a graceful shutdown waits for the running rollout to stop its step.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Control messages buffered for a running rollout; the coordinator sends a handful at most.
const CONTROL_QUEUE: usize = 64;

/// Instructions the executor runs itself, whatever the runtime.
pub const EXECUTOR_INSTRUCTIONS: [&str; 5] =
    ["sync_nodes", "point_of_no_return", "check", "apply", "gate"];

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
        supported.extend(self.env.runtime.supported_instructions(runtime));
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
            if recovery::answer_from_journal(&self.env, rollout_id, epoch) {
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
            if recovery::answer_from_journal(&self.env, rollout_id, epoch) {
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
        if recovery::answer_from_journal(&self.env, &rollout_id, epoch) {
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
        let run = Run::new(
            self.env.clone(),
            rollout,
            script,
            control_rx,
            shutdown.token(),
            connected,
            Arc::clone(&final_outcome),
        );
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

#[cfg(test)]
mod tests;
