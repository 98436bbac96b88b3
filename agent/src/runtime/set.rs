//! One runtime per kind of app: a script's `runtime` (process or beam) picks which one runs its
//! instructions. The executor sees a single [`Runtime`].

use std::collections::BTreeSet;
use std::sync::Arc;

use hotroll_script::{ChangeMode, Located, Runtime as ScriptRuntime};

use super::{
    AppStatus, BoxFuture, HooksOnlyRuntime, RolloutContext, Runtime, RuntimeError, StepContext,
    StepResult,
};

/// The runtimes of one agent, dispatched by the rollout's script runtime.
pub struct RuntimeSet {
    pub process: Arc<dyn Runtime>,
    pub beam: Arc<dyn Runtime>,
}

impl std::fmt::Debug for RuntimeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeSet")
            .field("process", &self.process.name())
            .field("beam", &self.beam.name())
            .finish()
    }
}

impl Default for RuntimeSet {
    fn default() -> Self {
        Self {
            process: Arc::new(HooksOnlyRuntime),
            beam: Arc::new(HooksOnlyRuntime),
        }
    }
}

impl RuntimeSet {
    fn of(&self, rollout: &RolloutContext) -> &dyn Runtime {
        match rollout.runtime {
            ScriptRuntime::Process => self.process.as_ref(),
            ScriptRuntime::Beam => self.beam.as_ref(),
        }
    }
}

impl Runtime for RuntimeSet {
    fn name(&self) -> &'static str {
        "process+beam"
    }

    /// What either runtime supports; [`Runtime::supported_for`] narrows it per script.
    fn supported_instructions(&self) -> BTreeSet<&'static str> {
        let mut all = self.process.supported_instructions();
        all.extend(self.beam.supported_instructions());
        all
    }

    fn supported_for(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        match runtime {
            ScriptRuntime::Process => self.process.supported_for(runtime),
            ScriptRuntime::Beam => self.beam.supported_for(runtime),
        }
    }

    fn supports_module_checks(&self) -> bool {
        self.beam.supports_module_checks()
    }

    fn apps(&self) -> Vec<AppStatus> {
        let mut apps = self.process.apps();
        apps.extend(self.beam.apps());
        apps
    }

    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.process.boot().await?;
            self.beam.boot().await
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            futures::join!(self.process.shutdown(), self.beam.shutdown());
        })
    }

    fn load_object_code<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        artifacts: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).load_object_code(ctx, artifacts)
    }

    fn check_modules<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        modules: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).check_modules(ctx, modules)
    }

    fn suspend<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).suspend(ctx, targets)
    }

    fn load<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).load(ctx, targets)
    }

    fn code_change<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
        extra: Option<&'a str>,
        mode: ChangeMode,
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).code_change(ctx, targets, extra, mode)
    }

    fn resume<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).resume(ctx, targets)
    }

    fn stop<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).stop(ctx, targets)
    }

    fn start<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).start(ctx, targets)
    }

    fn restart<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).restart(ctx, targets)
    }

    fn health<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        service: &'a Located<String>,
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).health(ctx, service)
    }

    fn purge<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        targets: &'a [Located<String>],
        brutal: bool,
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).purge(ctx, targets, brutal)
    }

    fn restart_new_emulator<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).restart_new_emulator(ctx)
    }

    fn apply<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        mfa: &'a Located<String>,
        args: &'a [String],
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).apply(ctx, mfa, args)
    }

    fn make_permanent<'a>(
        &'a self,
        ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.of(ctx).make_permanent(ctx)
    }

    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.of(ctx).discard(ctx)
    }

    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout).default_rollback(ctx)
    }
}
