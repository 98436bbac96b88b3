//! The process runtime (docs/design.md §3, §7, §8): releases as directories, artifacts from the
//! content store, and the services of `agent.toml` supervised by the agent.
//!
//! | instruction | here |
//! |---|---|
//! | `load_object_code` | fetch the named artifacts into the content store (resumable, verified), then build `releases/<to>`: the current release hard-linked, the artifacts on top, archives unpacked; nothing running changes |
//! | `load` | swap `current` to `<to>` (in `down`: back to the permanent release); a first install starts the app's services |
//! | `suspend` / `resume` | SIGSTOP / SIGCONT of the service's process group, or its `drain` / `undrain` hook |
//! | `code_change` | a service with `handover = true`: the state handover (`supervisor/handover`, `docs/handover.md`): the running instance exports its state, an instance of the current release starts with it and the same sockets, the old one stops once the new one is ready (any failure: the new one is stopped, the old one carries on); other services: restart on the current release. Either way the agent holds the sockets, so connections wait in the listen queue and none is refused |
//! | `stop` / `start` / `restart` | the supervisor's operations |
//! | `health` | probe `ready` until it succeeds, within the step's timeout |
//! | `purge` | delete the named releases, or every release but current, permanent and `to` |
//! | `restart_new_emulator` | activate `<to>` (staging it if needed) and restart every service of the app |
//!
//! Default rollback: `current` back to the permanent release (none: the app is uninstalled
//! again), and every service of the app that is not running unsuspended on it is restarted —
//! or, for a `handover = true` service running another release, handed over to the permanent
//! release with its state (mode `down`), and restarted only if that fails.
//! Make permanent: `permanent` written atomically, then releases beyond `keep_releases` removed.
//!
//! Services start with the agent (from `current`) and stop on its clean shutdown: the agent is
//! their supervisor, and a supervisor that exits takes its children down rather than leave
//! them unsupervised. After a crash of the agent, the next start stops what the previous run
//! left (pid files) before it binds the sockets again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hotroll_script::{ChangeMode, Instruction, Located, Runtime as ScriptRuntime};
use nix::sys::signal::Signal;

use crate::artifacts::{ArtifactStore, Fetcher};
use crate::cancel::CancelToken;
use crate::config::{Config, HookConfig, ServiceConfig, check_name};
use crate::coordinators::Coordinators;
use crate::dialer::Dialer;
use crate::hooks::{self, Invocation};
use crate::report::StepList;

use super::{
    AppStatus, ArtifactRef, BoxFuture, RolloutContext, Runtime, RuntimeError, StepContext,
    StepOutput, StepResult,
};

mod confine;
mod listen;
mod probe;
pub mod release;
mod supervisor;
mod unpack;

pub use release::Apps;
pub use supervisor::Status as ServiceStatus;
pub use supervisor::handover::{self, Mode as HandoverMode, Report as HandoverReport};
use supervisor::{ServiceEnv, Supervisor};

/// The instructions this runtime carries out.
const INSTRUCTIONS: [&str; 11] = [
    "load_object_code",
    "suspend",
    "load",
    "code_change",
    "resume",
    "stop",
    "start",
    "restart",
    "health",
    "purge",
    "restart_new_emulator",
];

/// A supervisor operation of `stop`, `start` or `restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Stop,
    Start,
    Restart,
}

/// Interval between readiness probes of `health`: the first retry comes soon, then each wait
/// doubles up to the longest. A native service is ready milliseconds after its start, and a
/// fixed 100 ms wait made `health` take 100 ms on most nodes of a fleet (docs/performance.md,
/// "Fleet upgrades"); a slow one is still probed only every 100 ms.
const PROBE_FIRST_INTERVAL: Duration = Duration::from_millis(5);
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The process runtime of one agent.
#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("data_dir", &self.inner.data_dir)
            .field("services", &self.inner.specs.len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    data_dir: PathBuf,
    keep_releases: usize,
    hooks: BTreeMap<String, HookConfig>,
    specs: Vec<Arc<ServiceConfig>>,
    apps: Apps,
    fetcher: Fetcher,
    services: OnceLock<BTreeMap<String, Supervisor>>,
    /// Services whose `drain` hook ran (`resume` runs `undrain`).
    drained: Mutex<BTreeSet<String>>,
    /// Releases built by a rollout still running: (app, version) → rollout id. A second
    /// `load_object_code` of the same rollout adds to that build instead of starting over.
    staged: Mutex<HashMap<(String, String), String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn failed(message: impl Into<String>) -> RuntimeError {
    RuntimeError::failed(message)
}

fn ok(lines: Vec<String>) -> StepResult {
    Ok(StepOutput::new(lines.join("\n")))
}

/// The mode of a materialised artifact: the script's, else 0755 under `bin/` and 0644 elsewhere.
fn effective_mode(artifact: &ArtifactRef) -> u32 {
    if artifact.mode != 0 {
        artifact.mode & 0o7777
    } else if artifact.name.starts_with("bin/") {
        0o755
    } else {
        0o644
    }
}

impl ProcessRuntime {
    /// Read the services of `config`; nothing starts before [`Runtime::boot`].
    pub fn new(config: &Config, dialer: Dialer, coordinators: Coordinators) -> Self {
        let specs = config.services.iter().cloned().map(Arc::new).collect();
        let store = ArtifactStore::new(&config.data_dir);
        let fetcher = Fetcher::new(store, coordinators, config.node.clone(), dialer);
        Self {
            inner: Arc::new(Inner {
                data_dir: config.data_dir.clone(),
                keep_releases: config.keep_releases.max(1),
                hooks: config.hooks.clone(),
                specs,
                apps: Apps::new(&config.data_dir),
                fetcher,
                services: OnceLock::new(),
                drained: Mutex::default(),
                staged: Mutex::default(),
            }),
        }
    }

    /// The supervisor of a declared service.
    fn service(&self, name: &str) -> Result<&Supervisor, RuntimeError> {
        self.inner
            .services
            .get()
            .and_then(|s| s.get(name))
            .ok_or_else(|| failed(format!("service `{name}` is not supervised by this agent")))
    }

    fn services_of(&self, app: &str) -> Vec<&Supervisor> {
        self.inner
            .services
            .get()
            .map(|s| s.values().filter(|s| s.spec.app == app).collect())
            .unwrap_or_default()
    }

    /// The current status of a service (for tests and embedding).
    pub fn service_status(&self, name: &str) -> Option<ServiceStatus> {
        self.service(name).ok().map(Supervisor::status)
    }

    async fn run_service_hook(
        &self,
        hook_name: &str,
        service: &Supervisor,
        ctx: &StepContext<'_>,
    ) -> Result<String, RuntimeError> {
        let Some(hook) = self.inner.hooks.get(hook_name) else {
            return Err(failed(format!(
                "hook `{hook_name}` is not declared in this agent's config"
            )));
        };
        let status = service.status();
        let env = vec![
            ("HOTROLL_NODE".to_string(), ctx.rollout.node.clone()),
            (
                "HOTROLL_ROLLOUT_ID".to_string(),
                ctx.rollout.rollout_id.clone(),
            ),
            ("HOTROLL_APP".to_string(), ctx.rollout.app.clone()),
            ("HOTROLL_FROM".to_string(), ctx.rollout.from.clone()),
            ("HOTROLL_TO".to_string(), ctx.rollout.to.clone()),
            ("HOTROLL_SERVICE".to_string(), service.spec.name.clone()),
            (
                "HOTROLL_PID".to_string(),
                status.pid.map(|p| p.to_string()).unwrap_or_default(),
            ),
        ];
        let timeout = hook
            .timeout
            .map_or(ctx.deadline, |own| own.min(ctx.deadline));
        let invocation = Invocation {
            name: hook_name,
            hook,
            args: &[],
            cwd: &self.inner.data_dir,
            env: &env,
            timeout,
        };
        let run = hooks::run(&invocation, &ctx.cancel)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match run.error() {
            None => Ok(run.output),
            Some(error) => Err(RuntimeError::Failed {
                message: error,
                output: run.output,
            }),
        }
    }

    /// Fetch `names` (artifacts of the rollout) and build `releases/<to>` with them.
    async fn stage(
        &self,
        ctx: &StepContext<'_>,
        names: &[String],
    ) -> Result<Vec<String>, RuntimeError> {
        let rollout = ctx.rollout;
        let app = rollout.app.as_str();
        let to = rollout.to.as_str();
        check_name("the app", app).map_err(failed)?;
        release::check_version(to).map_err(|e| failed(e.to_string()))?;
        let apps = &self.inner.apps;
        let current = apps.current(app);
        if current.as_deref() == Some(to) {
            return Err(failed(format!(
                "release {to} of {app} is already current on this node"
            )));
        }
        if let Some(current) = &current
            && current != &rollout.from
        {
            return Err(failed(format!(
                "this node runs {app} {current}, but the script upgrades from {}",
                rollout.from
            )));
        }

        let mut lines = Vec::new();
        let mut files = Vec::new();
        let mut wanted = Vec::new();
        for name in names {
            let Some(artifact) = rollout.artifacts.iter().find(|a| &a.name == name) else {
                return Err(failed(format!(
                    "artifact `{name}` has no digest in the rollout (RunScript)"
                )));
            };
            wanted.push((name, artifact));
        }
        // The downloads run at once (one channel, one stream each): a release of several files
        // waits for the slowest, not for their sum.
        let downloads = wanted.iter().map(|(_, artifact)| {
            self.inner
                .fetcher
                .ensure(&artifact.digest, artifact.size, &ctx.cancel)
        });
        let fetched_all = futures::future::try_join_all(downloads)
            .await
            .map_err(|e| failed(e.to_string()))?;
        for ((name, artifact), fetched) in wanted.into_iter().zip(fetched_all) {
            lines.push(format!("{name}: {}", fetched.describe()));
            let source = fetched.path;
            files.push(release::NewFile {
                name: name.clone(),
                source,
                mode: effective_mode(artifact),
                unpack: artifact.unpack,
            });
        }

        let key = (app.to_string(), to.to_string());
        let target = apps
            .release_dir(app, to)
            .map_err(|e| failed(e.to_string()))?;
        let ours = lock(&self.inner.staged).get(&key) == Some(&rollout.rollout_id);
        let (base, base_name) = if ours && target.is_dir() {
            (
                Some(target),
                format!("{to} (staged earlier in this rollout)"),
            )
        } else {
            match apps.current_release(app) {
                Some((version, dir)) => (Some(dir), version),
                None => (None, String::new()),
            }
        };
        let build_apps = apps.clone();
        let (build_app, build_to) = (app.to_string(), to.to_string());
        let cancel = ctx.cancel.clone();
        let built = tokio::task::spawn_blocking(move || {
            build_apps.build(&build_app, &build_to, base.as_deref(), &files, &cancel)
        })
        .await
        .map_err(|e| failed(format!("staging task failed: {e}")))?
        .map_err(|e| failed(format!("cannot stage release {to} of {app}: {e}")))?;
        lock(&self.inner.staged).insert(key, rollout.rollout_id.clone());
        let mut summary = format!(
            "staged release {to} of {app}: {} file(s) written, {} unchanged, {} archive entries unpacked",
            built.written, built.unchanged, built.unpacked
        );
        if !base_name.is_empty() {
            summary.push_str(&format!(", {} hard-linked from {base_name}", built.linked));
        }
        tracing::info!(
            app,
            release = to,
            written = built.written,
            unchanged = built.unchanged,
            unpacked = built.unpacked,
            linked = built.linked,
            "release staged"
        );
        lines.push(summary);
        Ok(lines)
    }

    /// Make the permanent release current again (or uninstall a first install). Returns what
    /// it did and the version now current.
    fn reactivate_permanent(&self, app: &str) -> Result<(String, Option<String>), RuntimeError> {
        let apps = &self.inner.apps;
        let current = apps.current(app);
        match apps.permanent(app) {
            Some(permanent) => {
                if current.as_deref() == Some(permanent.as_str()) {
                    Ok((format!("{app}: {permanent} is current"), Some(permanent)))
                } else {
                    apps.activate(app, &permanent)
                        .map_err(|e| failed(e.to_string()))?;
                    Ok((
                        format!(
                            "{app}: current {} -> {permanent} (the permanent release)",
                            current.as_deref().unwrap_or("none")
                        ),
                        Some(permanent),
                    ))
                }
            }
            None => {
                apps.deactivate(app).map_err(|e| failed(e.to_string()))?;
                let line = match current {
                    Some(current) => format!(
                        "{app}: no permanent release (a first install): {current} deactivated"
                    ),
                    None => format!("{app}: not installed; nothing to re-activate"),
                };
                Ok((line, None))
            }
        }
    }

    /// Every service of `app` running, unsuspended and undrained on `release` (stopped when
    /// `None`): restart the ones that are not.
    async fn settle_services(
        &self,
        ctx: &StepContext<'_>,
        app: &str,
        release: Option<&str>,
        force: bool,
    ) -> Result<Vec<String>, RuntimeError> {
        let started = tokio::time::Instant::now();
        let mut lines = Vec::new();
        for service in self.services_of(app) {
            let name = service.spec.name.clone();
            let was_drained = lock(&self.inner.drained).remove(&name);
            if was_drained && let Some(undrain) = service.spec.undrain.clone() {
                let output = self.run_service_hook(&undrain, service, ctx).await?;
                lines.push(format!("{name}: undrained ({undrain}) {}", output.trim()));
            }
            let status = service.status();
            let Some(release) = release else {
                if status.running() || status.wanted {
                    service.stop().await.map_err(failed)?;
                    lines.push(format!("{name}: stopped (no release to run)"));
                }
                continue;
            };
            let fine = status.running()
                && status.wanted
                && !status.suspended
                && status.release.as_deref() == Some(release);
            if fine && !force {
                lines.push(format!(
                    "{name}: already runs {release} (pid {})",
                    status.pid.unwrap_or_default()
                ));
                continue;
            }
            if service.spec.handover && status.running() && !force {
                // Back to the permanent release with the state (the relup's `down`).
                let request = handover::Request {
                    mode: HandoverMode::Down,
                    extra: None,
                    budget: step_budget(ctx).saturating_sub(started.elapsed()),
                    cancel: ctx.cancel.clone(),
                };
                match service.handover(request).await {
                    Ok(report) => {
                        lines.push(report.describe(&name));
                        continue;
                    }
                    Err(e) => lines.push(format!("{e}; restarting it instead")),
                }
            }
            let after = service.restart().await.map_err(failed)?;
            lines.push(format!(
                "{name}: restarted on {release} (pid {} -> {}); its sockets stayed open",
                status.pid.map_or("-".to_string(), |p| p.to_string()),
                after.pid.unwrap_or_default()
            ));
        }
        Ok(lines)
    }

    /// Probe `service` until it is ready or `budget` passes.
    async fn wait_ready(
        &self,
        service: &Supervisor,
        budget: Duration,
        cancel: &CancelToken,
    ) -> StepResult {
        let name = &service.spec.name;
        let ready = &service.spec.ready;
        let started = tokio::time::Instant::now();
        let crashes_before = service.status().crashes;
        let mut last;
        let mut wait = PROBE_FIRST_INTERVAL;
        loop {
            let status = service.status();
            let remaining = budget.saturating_sub(started.elapsed());
            match probe::probe(name, ready, &status, remaining, cancel).await {
                Ok(()) => {
                    return ok(vec![format!(
                        "{name} is ready ({}) after {:?}: pid {}, release {}",
                        ready.describe(),
                        started.elapsed(),
                        status.pid.unwrap_or_default(),
                        status.release.as_deref().unwrap_or("?")
                    )]);
                }
                Err(why) => last = why,
            }
            if started.elapsed() >= budget || cancel.is_cancelled() {
                let crashes = service.status().crashes.saturating_sub(crashes_before);
                let mut message = format!(
                    "service `{name}` did not become ready ({}) within {budget:?}: {last}",
                    ready.describe()
                );
                if crashes > 0 {
                    message.push_str(&format!("; it exited {crashes} time(s) meanwhile"));
                }
                return Err(failed(message));
            }
            let left = budget.saturating_sub(started.elapsed());
            tokio::select! {
                () = tokio::time::sleep(wait.min(left)) => {}
                () = cancel.cancelled() => {}
            }
            wait = (wait * 2).min(PROBE_INTERVAL);
        }
    }

    /// Every target of `load` must be the script's app (the validator says so; this is what
    /// makes anything else impossible).
    fn check_app_target(ctx: &StepContext<'_>, target: &str) -> Result<(), RuntimeError> {
        if target != ctx.rollout.app {
            return Err(failed(format!(
                "`load` of app `{target}`, but this rollout upgrades `{}`",
                ctx.rollout.app
            )));
        }
        Ok(())
    }

    async fn load(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mut lines = Vec::new();
        for target in targets {
            let app = target.value.as_str();
            Self::check_app_target(ctx, app)?;
            if ctx.list == StepList::Down {
                let (line, _) = self.reactivate_permanent(app)?;
                lines.push(line);
                continue;
            }
            let to = ctx.rollout.to.as_str();
            let (owned_app, owned_to) = (app.to_string(), to.to_string());
            let (before, activated) = self
                .off_the_workers(move |runtime| {
                    let apps = &runtime.inner.apps;
                    let before = apps.current(&owned_app);
                    (before, apps.activate(&owned_app, &owned_to))
                })
                .await?;
            activated.map_err(|e| failed(e.to_string()))?;
            tracing::info!(app, release = to, previous = ?before, "release activated");
            lines.push(format!(
                "{app}: current {} -> {to}",
                before.as_deref().unwrap_or("none")
            ));
            if before.is_none() {
                // A first install: the app's services have waited for a release.
                for service in self.services_of(app) {
                    let status = service.start().await.map_err(failed)?;
                    lines.push(format!(
                        "{}: started on {to} (first release, pid {})",
                        service.spec.name,
                        status.pid.unwrap_or_default()
                    ));
                }
            }
        }
        ok(lines)
    }

    async fn suspend(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mut lines = Vec::new();
        for target in targets {
            let service = self.service(&target.value)?;
            let name = &service.spec.name;
            if let Some(drain) = service.spec.drain.clone() {
                let output = self.run_service_hook(&drain, service, ctx).await?;
                lock(&self.inner.drained).insert(name.clone());
                lines.push(format!("{name}: drained ({drain}) {}", output.trim()));
            } else {
                let status = service.signal(Signal::SIGSTOP).await.map_err(failed)?;
                lines.push(format!(
                    "{name}: suspended (SIGSTOP to process group {})",
                    status.pid.unwrap_or_default()
                ));
            }
        }
        ok(lines)
    }

    async fn resume(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mut lines = Vec::new();
        for target in targets {
            let service = self.service(&target.value)?;
            let name = service.spec.name.clone();
            if lock(&self.inner.drained).remove(&name) {
                match service.spec.undrain.clone() {
                    Some(undrain) => {
                        let output = self.run_service_hook(&undrain, service, ctx).await?;
                        lines.push(format!("{name}: undrained ({undrain}) {}", output.trim()));
                    }
                    None => lines.push(format!("{name}: drained; no `undrain` hook declared")),
                }
                continue;
            }
            if !service.status().running() {
                lines.push(format!("{name}: not running; nothing to resume"));
                continue;
            }
            match service.signal(Signal::SIGCONT).await {
                Ok(status) => lines.push(format!(
                    "{name}: resumed (SIGCONT to process group {})",
                    status.pid.unwrap_or_default()
                )),
                // It exited between the check and the signal: nothing is left suspended (the
                // supervisor starts a fresh instance).
                Err(_) if !service.status().running() => {
                    lines.push(format!("{name}: not running; nothing to resume"));
                }
                Err(e) => return Err(failed(e)),
            }
        }
        ok(lines)
    }

    async fn supervise(&self, targets: &[Located<String>], op: Op) -> StepResult {
        let mut lines = Vec::new();
        for target in targets {
            let service = self.service(&target.value)?;
            let name = &service.spec.name;
            let before = service.status();
            let after = match op {
                Op::Stop => service.stop().await,
                Op::Start => service.start().await,
                Op::Restart => service.restart().await,
            }
            .map_err(failed)?;
            let line = match op {
                Op::Stop if !before.running() => format!("{name}: was not running"),
                Op::Stop => format!(
                    "{name}: stopped (pid {} {})",
                    before.pid.unwrap_or_default(),
                    after.last_exit.as_deref().unwrap_or("ended")
                ),
                Op::Start if before.running() => format!(
                    "{name}: already running (pid {})",
                    before.pid.unwrap_or_default()
                ),
                Op::Start | Op::Restart => format!(
                    "{name}: {} on {} (pid {})",
                    if op == Op::Start {
                        "started"
                    } else {
                        "restarted"
                    },
                    after.release.as_deref().unwrap_or("?"),
                    after.pid.unwrap_or_default()
                ),
            };
            lines.push(line);
        }
        ok(lines)
    }

    async fn purge(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let app = ctx.rollout.app.as_str();
        let apps = &self.inner.apps;
        let mut keep: BTreeSet<String> = [ctx.rollout.to.clone(), ctx.rollout.from.clone()].into();
        keep.extend(apps.current(app));
        keep.extend(apps.permanent(app));
        let candidates: Vec<String> = if targets.is_empty() {
            apps.releases(app)
        } else {
            targets.iter().map(|t| t.value.clone()).collect()
        };
        let mut removed = Vec::new();
        let mut lines = Vec::new();
        for version in candidates {
            release::check_version(&version).map_err(|e| failed(e.to_string()))?;
            if keep.contains(&version) {
                if !targets.is_empty() {
                    return Err(failed(format!(
                        "`purge` cannot delete release {version} of {app}: it is current, \
                         permanent, or part of this rollout"
                    )));
                }
                continue;
            }
            if !apps
                .release_dir(app, &version)
                .map_err(|e| failed(e.to_string()))?
                .exists()
            {
                lines.push(format!("{app} {version}: not on this node"));
                continue;
            }
            apps.remove_release(app, &version)
                .map_err(|e| failed(e.to_string()))?;
            removed.push(version);
        }
        if removed.is_empty() {
            lines.push(format!("{app}: no old release to delete"));
        } else {
            lines.push(format!("{app}: deleted release(s) {}", removed.join(", ")));
        }
        ok(lines)
    }

    async fn restart_new_emulator(&self, ctx: &StepContext<'_>) -> StepResult {
        let app = ctx.rollout.app.clone();
        let mut lines = Vec::new();
        let release = if ctx.list == StepList::Down {
            let (line, current) = self.reactivate_permanent(&app)?;
            lines.push(line);
            current
        } else {
            let to = ctx.rollout.to.clone();
            let apps = &self.inner.apps;
            let dir = apps
                .release_dir(&app, &to)
                .map_err(|e| failed(e.to_string()))?;
            let staged = lock(&self.inner.staged).get(&(app.clone(), to.clone()))
                == Some(&ctx.rollout.rollout_id);
            if !(staged && dir.is_dir()) {
                let names: Vec<String> = ctx
                    .rollout
                    .artifacts
                    .iter()
                    .map(|a| a.name.clone())
                    .collect();
                lines.extend(self.stage(ctx, &names).await?);
            }
            let before = apps.current(&app);
            apps.activate(&app, &to)
                .map_err(|e| failed(e.to_string()))?;
            lines.push(format!(
                "{app}: current {} -> {to}",
                before.as_deref().unwrap_or("none")
            ));
            Some(to)
        };
        lines.extend(
            self.settle_services(ctx, &app, release.as_deref(), true)
                .await?,
        );
        ok(lines)
    }

    async fn code_change(
        &self,
        ctx: &StepContext<'_>,
        targets: &[Located<String>],
        extra: Option<&str>,
        mode: ChangeMode,
    ) -> StepResult {
        let started = tokio::time::Instant::now();
        let mut lines = Vec::new();
        for target in targets {
            let service = self.service(&target.value)?;
            let name = &service.spec.name;
            let before = service.status();
            if service.spec.handover && before.running() {
                let request = handover::Request {
                    mode: match mode {
                        ChangeMode::Up => HandoverMode::Up,
                        ChangeMode::Down => HandoverMode::Down,
                    },
                    extra: extra.map(str::to_string),
                    budget: step_budget(ctx).saturating_sub(started.elapsed()),
                    cancel: ctx.cancel.clone(),
                };
                let report = service.handover(request).await.map_err(failed)?;
                lines.push(report.describe(name));
                continue;
            }
            let after = service.restart().await.map_err(failed)?;
            let direction = match mode {
                ChangeMode::Up => "up",
                ChangeMode::Down => "down",
            };
            let mut line = format!(
                "{name}: code_change ({direction}) by restart: {} (pid {}) -> {} (pid {}); \
                 its listening sockets stayed open",
                before.release.as_deref().unwrap_or("-"),
                before.pid.map_or("-".to_string(), |p| p.to_string()),
                after.release.as_deref().unwrap_or("?"),
                after.pid.unwrap_or_default()
            );
            if extra.is_some() {
                line.push_str(" (`extra` is for the handover protocol; unused by a restart)");
            }
            lines.push(line);
        }
        ok(lines)
    }

    async fn health(&self, ctx: &StepContext<'_>, service: &Located<String>) -> StepResult {
        let supervisor = self.service(&service.value)?;
        // Answer a little before the executor's own deadline so the report says why.
        self.wait_ready(supervisor, step_budget(ctx), &ctx.cancel)
            .await
    }

    /// Blocking file system work on the release tree, on a blocking thread: a directory fsync
    /// can take long on a busy disk, and the runtime's workers also carry the session.
    async fn off_the_workers<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> T + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let runtime = self.clone();
        tokio::task::spawn_blocking(move || work(&runtime))
            .await
            .map_err(|e| failed(format!("file system task failed: {e}")))
    }

    /// Remove releases of `app` beyond `keep_releases` (never current or permanent).
    fn prune(&self, app: &str) -> Vec<String> {
        let apps = &self.inner.apps;
        let current = apps.current(app);
        let permanent = apps.permanent(app);
        let mut kept = 0usize;
        let mut removed = Vec::new();
        let releases = apps.releases(app);
        let protected = |v: &String| Some(v) == current.as_ref() || Some(v) == permanent.as_ref();
        let protected_count = releases.iter().filter(|v| protected(v)).count();
        let room = self.inner.keep_releases.saturating_sub(protected_count);
        for version in releases {
            if protected(&version) {
                continue;
            }
            if kept < room {
                kept += 1;
                continue;
            }
            match apps.remove_release(app, &version) {
                Ok(()) => removed.push(version),
                Err(e) => {
                    tracing::warn!(app, release = %version, error = %e, "cannot remove an old release")
                }
            }
        }
        removed
    }
}

/// What a step may spend on its own waits: its deadline less a little, so that the step answers
/// (and says why) before the executor's own deadline cancels it.
fn step_budget(ctx: &StepContext<'_>) -> Duration {
    let margin = (ctx.deadline / 10).min(Duration::from_millis(250));
    ctx.deadline.saturating_sub(margin)
}

/// How long the agent watches a service it started at boot for readiness (only to log it).
const BOOT_READY_WATCH: Duration = Duration::from_secs(60);

/// Log when a service started with the agent becomes ready (or that it did not, in time).
async fn log_readiness(service: Supervisor) {
    let name = service.spec.name.clone();
    let started = tokio::time::Instant::now();
    let never = CancelToken::never();
    let mut last = String::new();
    while started.elapsed() < BOOT_READY_WATCH {
        let status = service.status();
        if !status.wanted {
            return;
        }
        let remaining = BOOT_READY_WATCH.saturating_sub(started.elapsed());
        match probe::probe(&name, &service.spec.ready, &status, remaining, &never).await {
            Ok(()) => {
                tracing::info!(service = %name, after = ?started.elapsed(), "service ready");
                return;
            }
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::warn!(service = %name, waited = ?BOOT_READY_WATCH, reason = %last, "service not ready");
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn supported_instructions(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        match runtime {
            ScriptRuntime::Process => INSTRUCTIONS.into_iter().collect(),
            ScriptRuntime::Beam | ScriptRuntime::OtpRelease => BTreeSet::new(),
        }
    }

    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let apps = &inner.apps;
            for app in apps.installed() {
                apps.remove_staging(&app);
                // A release installed by hand (or by an older agent) becomes the one rollback
                // returns to.
                if apps.permanent(&app).is_none()
                    && let Some(current) = apps.current(&app)
                {
                    tracing::info!(app, release = %current, "no permanent release; adopting the current one");
                    apps.set_permanent(&app, &current)
                        .map_err(|e| failed(e.to_string()))?;
                }
            }
            let env = ServiceEnv {
                apps: apps.clone(),
                logs: inner.data_dir.join("logs"),
                run: inner.data_dir.join("run"),
            };
            let mut services = BTreeMap::new();
            for spec in &inner.specs {
                let supervisor = Supervisor::launch(Arc::clone(spec), env.clone(), true).await;
                if supervisor.status().running() {
                    tokio::spawn(log_readiness(supervisor.clone()));
                }
                services.insert(spec.name.clone(), supervisor);
            }
            if inner.services.set(services).is_err() {
                return Err(failed("the process runtime was booted twice"));
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(services) = self.inner.services.get() else {
                return;
            };
            futures::future::join_all(services.values().map(Supervisor::shutdown)).await;
        })
    }

    fn apps(&self) -> Vec<AppStatus> {
        let apps = &self.inner.apps;
        let mut names: BTreeSet<String> = apps.installed().into_iter().collect();
        names.extend(self.inner.specs.iter().map(|s| s.app.clone()));
        names
            .into_iter()
            .filter_map(|app| {
                let current = apps.current(&app).unwrap_or_default();
                let permanent = apps.permanent(&app).unwrap_or_default();
                let declared = self.inner.specs.iter().any(|s| s.app == app);
                (declared || !current.is_empty() || !permanent.is_empty()).then_some(AppStatus {
                    app,
                    current,
                    permanent,
                    ..AppStatus::default()
                })
            })
            .collect()
    }

    fn step<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        instruction: &'a Instruction,
    ) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            match instruction {
                Instruction::LoadObjectCode { artifacts } => {
                    let names: Vec<String> = artifacts.iter().map(|a| a.value.clone()).collect();
                    ok(self.stage(ctx, &names).await?)
                }
                Instruction::Suspend { targets, .. } => self.suspend(ctx, targets).await,
                Instruction::Load { targets } => self.load(ctx, targets).await,
                Instruction::CodeChange {
                    targets,
                    extra,
                    mode,
                    ..
                } => {
                    self.code_change(ctx, targets, extra.as_deref(), *mode)
                        .await
                }
                Instruction::Resume { targets } => self.resume(ctx, targets).await,
                Instruction::Stop { targets } => self.supervise(targets, Op::Stop).await,
                Instruction::Start { targets } => self.supervise(targets, Op::Start).await,
                Instruction::Restart { targets } => self.supervise(targets, Op::Restart).await,
                Instruction::Health { service, .. } => self.health(ctx, service).await,
                Instruction::Purge { targets, .. } => self.purge(ctx, targets).await,
                Instruction::RestartNewEmulator => self.restart_new_emulator(ctx).await,
                other => Err(RuntimeError::Unsupported(other.name())),
            }
        })
    }

    fn make_permanent<'a>(
        &'a self,
        ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let app = ctx.app.as_str();
            let apps = &self.inner.apps;
            lock(&self.inner.staged).remove(&(app.to_string(), ctx.to.clone()));
            if apps.current(app).as_deref() != Some(ctx.to.as_str()) {
                // The script activated no release of the app (e.g. hooks only): nothing changes.
                tracing::debug!(app, release = %ctx.to, "release not current; permanent unchanged");
                return Ok(());
            }
            let (owned_app, to) = (app.to_string(), ctx.to.clone());
            let removed = self
                .off_the_workers(move |runtime| {
                    runtime
                        .inner
                        .apps
                        .set_permanent(&owned_app, &to)
                        .map(|()| runtime.prune(&owned_app))
                })
                .await?
                .map_err(|e| failed(e.to_string()))?;
            tracing::info!(app, release = %ctx.to, ?removed, keep = self.inner.keep_releases, "release made permanent");
            Ok(())
        })
    }

    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let app = ctx.app.as_str();
            let apps = &self.inner.apps;
            lock(&self.inner.staged).remove(&(app.to_string(), ctx.to.clone()));
            if check_name("the app", app).is_err() || release::check_version(&ctx.to).is_err() {
                return Ok(());
            }
            apps.remove_staging(app);
            let in_use = apps.current(app).as_deref() == Some(ctx.to.as_str())
                || apps.permanent(app).as_deref() == Some(ctx.to.as_str());
            if !in_use {
                apps.remove_release(app, &ctx.to)
                    .map_err(|e| failed(e.to_string()))?;
                tracing::info!(app, release = %ctx.to, "staged release discarded");
            }
            Ok(())
        })
    }

    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            let app = ctx.rollout.app.clone();
            if check_name("the app", &app).is_err() {
                return ok(vec![format!("{app}: nothing to roll back")]);
            }
            let (line, release) = self.reactivate_permanent(&app)?;
            let mut lines = vec![line];
            lines.extend(
                self.settle_services(ctx, &app, release.as_deref(), false)
                    .await?,
            );
            ok(lines)
        })
    }
}
