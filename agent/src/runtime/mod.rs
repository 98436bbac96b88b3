//! Runtimes: how the instructions that change a node (docs/design.md §3) are carried out. The executor
//! runs `sync_nodes`, `point_of_no_return`, and the hook forms of `check` and `apply` itself;
//! everything else goes through [`Runtime::step`]. The process runtime (releases, services,
//! handover) and the BEAM runtime plug in here; [`RuntimeDispatch`] gives each script the one of
//! its kind.
//!
//! The trait returns boxed futures so that it stays object safe (`Arc<dyn Runtime>`) without
//! `async_trait`.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use hotroll_script::{Instruction, Runtime as ScriptRuntime};

use crate::cancel::CancelToken;
pub use crate::report::AppStatus;
use crate::report::StepList;

pub mod beam;
mod dispatch;
pub mod otp_release;
pub mod process;
pub use dispatch::RuntimeDispatch;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a runtime operation produced: captured output for the step report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    pub output: String,
    /// The step succeeded but did not do everything it names (a code_change that reached no
    /// process): recorded in the rollout's history as a warning.
    pub warnings: Vec<String>,
}

impl StepOutput {
    pub fn new(output: impl Into<String>) -> Self {
        Self {
            output: output.into(),
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeError {
    /// The script was validated against [`Runtime::supported_instructions`], so this only shows
    /// up if a runtime lists an instruction it does not implement.
    #[error("instruction `{0}` is not supported by this agent yet")]
    Unsupported(&'static str),
    #[error("{message}")]
    Failed { message: String, output: String },
    /// From [`Runtime::make_permanent`]: the node no longer runs the new release (it died and
    /// came back, or was never reached), so there is nothing to make permanent; the agent rolls
    /// it back to its permanent release and reports it rolled back.
    #[error("{0}")]
    NotRunningNew(String),
}

impl RuntimeError {
    pub fn failed(message: impl Into<String>) -> Self {
        RuntimeError::Failed {
            message: message.into(),
            output: String::new(),
        }
    }

    pub fn output(&self) -> &str {
        match self {
            RuntimeError::Unsupported(_) | RuntimeError::NotRunningNew(_) => "",
            RuntimeError::Failed { output, .. } => output,
        }
    }
}

pub type StepResult = Result<StepOutput, RuntimeError>;

/// An artifact of the rollout, as RunScript names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub mode: u32,
    pub unpack: bool,
}

/// The rollout a runtime operation belongs to.
#[derive(Debug, Clone)]
pub struct RolloutContext {
    /// Which runtime the script targets (process or beam).
    pub runtime: hotroll_script::Runtime,
    pub rollout_id: String,
    pub epoch: u64,
    pub node: String,
    pub app: String,
    pub from: String,
    pub to: String,
    pub artifacts: Vec<ArtifactRef>,
    pub data_dir: PathBuf,
}

/// One instruction being run.
#[derive(Debug, Clone)]
pub struct StepContext<'a> {
    pub rollout: &'a RolloutContext,
    pub list: StepList,
    /// Index into `list`.
    pub step: usize,
    /// The instruction's deadline. The executor enforces it too (cancel, then a short grace);
    /// a runtime uses it to bound its own waits.
    pub deadline: Duration,
    /// Fired on abort, rollback, shutdown or deadline: stop, clean up, return.
    pub cancel: CancelToken,
}

/// What a runtime does for the rollouts of one agent. The executor runs `sync_nodes`,
/// `point_of_no_return` and the hook forms of `check` and `apply` itself and hands every other
/// instruction to [`Runtime::step`]; a runtime lists the ones it carries out in
/// [`Runtime::supported_instructions`], which the agent uses to refuse a script before anything
/// runs.
pub trait Runtime: Send + Sync + 'static {
    /// For logs.
    fn name(&self) -> &'static str;

    /// Names (as in scripts) of the instructions this runtime carries out for a script of
    /// `runtime`. A runtime that serves one kind of app supports nothing for the other.
    fn supported_instructions(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str>;

    /// Whether `check` with `modules` (an old-code check) is supported for a script of
    /// `runtime`.
    fn supports_module_checks(&self, _runtime: ScriptRuntime) -> bool {
        false
    }

    /// Apps on this node with their current and permanent versions.
    fn apps(&self) -> Vec<AppStatus>;

    /// Once, when the agent starts: after it holds its data dir (the journal lock), before
    /// journal recovery and the first session. The process runtime starts the services it
    /// supervises here; the BEAM runtime rolls back an upgrade an earlier agent process left
    /// unfinished.
    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    /// Once, on a clean shutdown, after the running rollout stopped: stop what `boot` started.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Carry out one instruction of the script (of `up` or `down`, as `ctx.list` says). An
    /// instruction this runtime does not list answers [`RuntimeError::Unsupported`].
    fn step<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        instruction: &'a Instruction,
    ) -> BoxFuture<'a, StepResult>;

    /// After MakePermanent: the new release becomes the one a rollback or a restart returns to;
    /// deferred purges run.
    fn make_permanent<'a>(
        &'a self,
        ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// After a failure or Abort before the point of no return: drop whatever was staged.
    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// After the point of no return, for a script without a `down` list: make the permanent
    /// release current again and restart the app's services on it.
    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult>;
}

/// The runtime of an agent that can only run hooks: it supports no runtime instruction, so a
/// script using one is refused before anything runs; with nothing staged or activated, the
/// lifecycle operations have nothing to do and succeed.
#[derive(Debug, Clone, Copy, Default)]
pub struct HooksOnlyRuntime;

impl Runtime for HooksOnlyRuntime {
    fn name(&self) -> &'static str {
        "hooks-only"
    }

    fn supported_instructions(&self, _runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        BTreeSet::new()
    }

    fn apps(&self) -> Vec<AppStatus> {
        Vec::new()
    }

    fn step<'a>(
        &'a self,
        _ctx: &'a StepContext<'a>,
        instruction: &'a Instruction,
    ) -> BoxFuture<'a, StepResult> {
        Box::pin(async move { Err(RuntimeError::Unsupported(instruction.name())) })
    }

    fn make_permanent<'a>(
        &'a self,
        _ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn discard<'a>(&'a self, _ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn default_rollback<'a>(&'a self, _ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        Box::pin(async { Ok(StepOutput::default()) })
    }
}
