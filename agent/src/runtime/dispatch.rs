//! One runtime per kind of app: a script's `runtime` (process or beam) picks which one runs it.
//! The executor sees a single [`Runtime`].

use std::collections::BTreeSet;
use std::sync::Arc;

use hotroll_script::{Instruction, Runtime as ScriptRuntime};

use crate::artifacts::{ArtifactStore, Fetcher};
use crate::config::Config;
use crate::coordinators::Coordinators;
use crate::dialer::Dialer;

use super::beam::BeamRuntime;
use super::beam::fetch::StoreArtifacts;
use super::otp_release::OtpReleaseRuntime;
use super::process::ProcessRuntime;
use super::{
    AppStatus, BoxFuture, HooksOnlyRuntime, RolloutContext, Runtime, RuntimeError, StepContext,
    StepResult,
};

/// The runtimes of one agent, by the kind of app a script upgrades.
pub struct RuntimeDispatch {
    pub process: Arc<dyn Runtime>,
    pub beam: Arc<dyn Runtime>,
    /// `[[release]]` nodes (`runtime = "otp_release"`).
    pub release: Arc<dyn Runtime>,
}

impl std::fmt::Debug for RuntimeDispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeDispatch")
            .field("process", &self.process.name())
            .field("beam", &self.beam.name())
            .field("release", &self.release.name())
            .finish()
    }
}

impl Default for RuntimeDispatch {
    fn default() -> Self {
        Self {
            process: Arc::new(HooksOnlyRuntime),
            beam: Arc::new(HooksOnlyRuntime),
            release: Arc::new(HooksOnlyRuntime),
        }
    }
}

impl RuntimeDispatch {
    /// The runtimes `config` declares: the process runtime for `[[services]]`, the BEAM runtime
    /// for `[[beam]]`, the OTP release runtime for `[[release]]` (none declared: hooks only);
    /// all fetch artifacts through `dialer` from the coordinator `coordinators` talks to now.
    pub fn declared_by(config: &Config, dialer: &Dialer, coordinators: &Coordinators) -> Self {
        let fetcher = || {
            Fetcher::new(
                ArtifactStore::new(&config.data_dir),
                coordinators.clone(),
                config.node.clone(),
                dialer.clone(),
            )
        };
        let beam: Arc<dyn Runtime> = if config.beam.is_empty() {
            Arc::new(HooksOnlyRuntime)
        } else {
            Arc::new(BeamRuntime::new(
                config,
                Arc::new(StoreArtifacts { fetcher: fetcher() }),
            ))
        };
        let release: Arc<dyn Runtime> = if config.releases.is_empty() {
            Arc::new(HooksOnlyRuntime)
        } else {
            Arc::new(OtpReleaseRuntime::new(config, fetcher()))
        };
        Self {
            process: Arc::new(ProcessRuntime::new(
                config,
                dialer.clone(),
                coordinators.clone(),
            )),
            beam,
            release,
        }
    }

    fn of(&self, runtime: ScriptRuntime) -> &dyn Runtime {
        match runtime {
            ScriptRuntime::Process => self.process.as_ref(),
            ScriptRuntime::Beam => self.beam.as_ref(),
            ScriptRuntime::OtpRelease => self.release.as_ref(),
        }
    }
}

impl Runtime for RuntimeDispatch {
    fn name(&self) -> &'static str {
        "process+beam+otp_release"
    }

    fn supported_instructions(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        self.of(runtime).supported_instructions(runtime)
    }

    fn supports_module_checks(&self, runtime: ScriptRuntime) -> bool {
        self.of(runtime).supports_module_checks(runtime)
    }

    fn apps(&self) -> Vec<AppStatus> {
        let mut apps = self.process.apps();
        apps.extend(self.beam.apps());
        apps.extend(self.release.apps());
        apps
    }

    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.process.boot().await?;
            self.beam.boot().await?;
            self.release.boot().await
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            futures::join!(
                self.process.shutdown(),
                self.beam.shutdown(),
                self.release.shutdown()
            );
        })
    }

    fn step<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        instruction: &'a Instruction,
    ) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout.runtime).step(ctx, instruction)
    }

    fn make_permanent<'a>(
        &'a self,
        ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.of(ctx.runtime).make_permanent(ctx)
    }

    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.of(ctx.runtime).discard(ctx)
    }

    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        self.of(ctx.rollout.runtime).default_rollback(ctx)
    }
}
