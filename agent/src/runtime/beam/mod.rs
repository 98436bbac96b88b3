//! The BEAM runtime (docs/design.md §3, §9): real hot code loading in the local Erlang nodes that
//! `[[beam]]` entries of `agent.toml` declare.
//!
//! * The agent talks to each node as a hidden node over the Erlang distribution protocol
//!   ([`dist`]), with TCP_NODELAY and a deadline on every call, and loads its helper module
//!   `hotroll_upgrade` ([`helper`]) into the node.
//! * `suspend`, `load`, `code_change` and `resume` of a group of modules are collected while the
//!   script runs them and executed at the group's `resume` in ONE call to the helper, inside the
//!   node: suspend (processes found through the supervision trees, as the release handler does),
//!   load (`code:load_binary` after a soft purge), `sys:change_code` with the old version that
//!   `release_handler_1:get_current_vsn/1` reads, resume in an `after`. A failed load or
//!   code_change is undone in the node before the processes are resumed: they keep their old
//!   code and their old state, and the step fails (the node then rolls back). An agent that dies
//!   mid-group cannot leave anything suspended: the helper's process is not linked to it. The
//!   step before the group (a `load` outside any group) is one helper call too.
//! * Releases on the node (`<data_dir>/beam/<app>/`): `releases/<vsn>/<mod>.beam` (the staged
//!   new modules; the permanent release's `code_dir` is copied to `releases/<from>/` before the
//!   first change, for rollback), `state.json` (current and permanent version), `rollout.json`
//!   (what the running rollout changed, written before each change, for a rollback after an
//!   agent restart). `code_dir` always holds the release the node boots: the new modules are
//!   written there at make-permanent (or before `restart_new_emulator`).
//! * Rollback (default, without a `down` list): the modules this rollout loaded go back to the
//!   permanent release's binaries in one helper call (code_change down where the upgrade
//!   changed code, then the old code loaded); when the node cannot be reached or that fails,
//!   `code_dir` gets the permanent release back and the node is restarted with `start`.
//! * `purge` is soft (old code that a process still runs is reported, not killed); a brutal
//!   purge is deferred to make-permanent. `apply` calls only the app's `mfa_allow`, each script
//!   argument passed as a binary. `stop`/`start`/`restart` act on supervisor children by id.

pub mod dist;
pub mod fetch;
pub mod helper;
pub(crate) mod term;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use erl_dist::term::Term;
use hotroll_script::{ChangeMode, Instruction, Located, Runtime as ScriptRuntime};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use self::dist::{DistClient, DistError, NodeAddress};
use self::term::{as_i64, atom, bin, boolean, int, is_atom, list, tagged, text, texts, tuple};
use super::{
    AppStatus, ArtifactRef, BoxFuture, RolloutContext, Runtime, RuntimeError, StepContext,
    StepOutput, StepResult,
};
use crate::boot::write_atomically;
use crate::cancel::CancelToken;
use crate::config::{BeamConfig, Config};

/// Bound of the small calls (version checks, status, purge) when the step gives none shorter.
const SHORT_CALL: Duration = Duration::from_secs(10);
/// How long a stopped node gets to go away before it is halted.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a starting or stopping node is polled.
const POLL: Duration = Duration::from_millis(100);

/// Where the bytes of a rollout's artifacts come from (the agent's artifact fetcher: the
/// coordinator's `FetchArtifact`, verified against the digest). The BEAM runtime only needs the
/// bytes of each `.beam` file.
pub trait ArtifactSource: Send + Sync + 'static {
    fn bytes<'a>(
        &'a self,
        rollout: &'a RolloutContext,
        artifact: &'a ArtifactRef,
        cancel: &'a CancelToken,
    ) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// The BEAM runtime of one agent: one [`App`] per `[[beam]]` entry.
pub struct BeamRuntime {
    apps: BTreeMap<String, Arc<App>>,
    artifacts: Arc<dyn ArtifactSource>,
}

impl std::fmt::Debug for BeamRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeamRuntime")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct App {
    config: BeamConfig,
    client: DistClient,
    /// `<data_dir>/beam/<app>`.
    dir: PathBuf,
    versions: StdMutex<Versions>,
    /// The rollout in progress on this app; also serialises the app's operations.
    run: Mutex<Option<RunState>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Versions {
    current: String,
    permanent: String,
}

/// What a rollout did to the node so far (persisted as `rollout.json` before every change).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunState {
    rollout_id: String,
    from: String,
    to: String,
    /// Staged modules: module -> file under `releases/<to>/`.
    staged: BTreeMap<String, PathBuf>,
    /// Modules that may have been loaded, in order, with the `extra` of their code_change when
    /// they had one.
    touched: Vec<Touched>,
    /// `restart_new_emulator` ran: the node runs the new release from `code_dir`.
    restarted: bool,
    /// Brutal purges deferred to make-permanent.
    brutal: BTreeSet<String>,
    /// The open suspend…resume group (memory only: nothing of it has run yet).
    #[serde(skip)]
    group: Option<Group>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Touched {
    module: String,
    /// `Some(extra)` when the module's processes went through code_change.
    changed: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Group {
    suspend: Vec<String>,
    suspend_timeout: Duration,
    change_timeout: Duration,
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    Load {
        module: String,
    },
    CodeChange {
        modules: Vec<String>,
        extra: String,
        mode: ChangeMode,
    },
}

fn failed(message: impl Into<String>) -> RuntimeError {
    RuntimeError::failed(message)
}

fn dist_failed(e: DistError) -> RuntimeError {
    failed(e.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ok(output: impl Into<String>) -> StepResult {
    Ok(StepOutput::new(output))
}

/// Module names from a script, checked to be plain atoms before they go anywhere near the node.
fn modules(targets: &[Located<String>]) -> Result<Vec<String>, RuntimeError> {
    targets
        .iter()
        .map(|t| {
            if crate::config::is_atom(&t.value) {
                Ok(t.value.clone())
            } else {
                Err(failed(format!(
                    "`{}` is not a module name (an unquoted Erlang atom)",
                    t.value
                )))
            }
        })
        .collect()
}

fn atoms(names: &[String]) -> Term {
    list(names.iter().map(|n| atom(n)).collect())
}

impl BeamRuntime {
    /// A runtime for the `[[beam]]` apps of `config`.
    pub fn new(config: &Config, artifacts: Arc<dyn ArtifactSource>) -> Self {
        let epmd_port = dist::epmd_port_from_env();
        let apps = config
            .beam
            .values()
            .map(|beam| {
                let dir = config.data_dir.join("beam").join(&beam.app);
                let versions = read_json(&dir.join("state.json")).unwrap_or_default();
                let app = App {
                    client: DistClient::new(NodeAddress {
                        node: beam.node.clone(),
                        cookie: String::new(),
                        epmd_port,
                    }),
                    config: beam.clone(),
                    dir,
                    versions: StdMutex::new(versions),
                    run: Mutex::new(None),
                };
                (beam.app.clone(), Arc::new(app))
            })
            .collect();
        Self { apps, artifacts }
    }

    /// Whether any `[[beam]]` app is declared.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    fn app(&self, rollout: &RolloutContext) -> Result<&Arc<App>, RuntimeError> {
        self.apps.get(&rollout.app).ok_or_else(|| {
            let declared: Vec<&str> = self.apps.keys().map(String::as_str).collect();
            failed(format!(
                "app `{}` is not declared as a [[beam]] app in this agent's config (declared: {})",
                rollout.app,
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ))
        })
    }

    /// After an agent restart: a rollout that changed a node and was not made permanent is
    /// rolled back to the permanent release (docs/design.md §5). Once at boot, before rollouts.
    async fn recover(&self) {
        for app in self.apps.values() {
            let mut run = app.run.lock().await;
            let Some(state) = read_json::<RunState>(&app.dir.join("rollout.json")) else {
                continue;
            };
            tracing::warn!(app = %app.config.app, rollout_id = %state.rollout_id, "an upgrade was interrupted by an agent restart; rolling back to the permanent release");
            *run = Some(state);
            let deadline = Duration::from_secs(120);
            match app.rollback(&mut run, deadline).await {
                Ok(out) => tracing::info!(app = %app.config.app, %out, "rolled back after restart"),
                Err(e) => {
                    tracing::error!(app = %app.config.app, error = %e, "rollback after restart failed")
                }
            }
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| failed(format!("cannot encode {}: {e}", path.display())))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
    }
    write_atomically(path, &text)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
}

/// The outcome of a group in the node.
#[derive(Debug)]
struct GroupResult {
    ok: bool,
    message: String,
    window_us: i64,
    suspended: i64,
    /// Modules whose code_change reached no process although they export code_change/3.
    warnings: Vec<String>,
}

impl GroupResult {
    fn describe(&self) -> String {
        format!(
            "suspend→resume window {} µs ({} process{} suspended, window_us={})",
            self.window_us,
            self.suspended,
            if self.suspended == 1 { "" } else { "es" },
            self.window_us
        )
    }
}

impl App {
    fn release_dir(&self, version: &str) -> PathBuf {
        self.dir.join("releases").join(version)
    }

    fn versions(&self) -> Versions {
        self.versions.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn set_versions(&self, versions: Versions) -> Result<(), RuntimeError> {
        write_json(&self.dir.join("state.json"), &versions)?;
        if let Ok(mut v) = self.versions.lock() {
            *v = versions;
        }
        Ok(())
    }

    fn save_run(&self, state: &RunState) -> Result<(), RuntimeError> {
        write_json(&self.dir.join("rollout.json"), state)
    }

    fn clear_run(&self) {
        let _ = std::fs::remove_file(self.dir.join("rollout.json"));
    }

    /// (Re)read the cookie: it may be rotated with the node.
    fn client(&self) -> Result<&DistClient, RuntimeError> {
        Ok(&self.client)
    }

    async fn cookie(&self) -> Result<String, RuntimeError> {
        read_cookie(&self.config.node, &self.config.cookie_file).await
    }

    /// A call into the node, the helper loaded first when it is a helper call.
    async fn call(
        &self,
        module: &str,
        function: &str,
        args: Vec<Term>,
        timeout: Duration,
    ) -> Result<Term, RuntimeError> {
        let client = self.client()?;
        client.set_cookie(self.cookie().await?).await;
        if module == helper::MODULE {
            helper::ensure(client, timeout).await.map_err(dist_failed)?;
        }
        client
            .call(module, function, args, timeout)
            .await
            .map_err(dist_failed)
    }

    /// Run a helper call answering `ok | {ok, _} | {error, Text}`.
    async fn helper_ok(
        &self,
        function: &str,
        args: Vec<Term>,
        timeout: Duration,
    ) -> Result<Term, RuntimeError> {
        let answer = self.call(helper::MODULE, function, args, timeout).await?;
        if let Some(rest) = tagged(&answer, "error") {
            return Err(failed(rest.first().map(text).unwrap_or_default()));
        }
        Ok(answer)
    }

    /// The group in one helper call.
    async fn run_group(
        &self,
        group: &Group,
        state: &RunState,
        timeout: Duration,
    ) -> Result<GroupResult, RuntimeError> {
        let mut ops = Vec::new();
        for op in &group.ops {
            match op {
                Op::Load { module } => {
                    let path = state.staged.get(module).ok_or_else(|| {
                        failed(format!(
                            "`load` of `{module}`, which `load_object_code` did not stage"
                        ))
                    })?;
                    let bytes = tokio::fs::read(path).await.map_err(|e| {
                        failed(format!("cannot read the staged {}: {e}", path.display()))
                    })?;
                    ops.push(tuple(vec![
                        atom("load"),
                        atom(module),
                        bin(path.to_string_lossy().as_bytes().to_vec()),
                        bin(bytes),
                    ]));
                }
                Op::CodeChange {
                    modules,
                    extra,
                    mode,
                } => ops.push(tuple(vec![
                    atom("code_change"),
                    atoms(modules),
                    bin(extra.as_bytes().to_vec()),
                    atom(match mode {
                        ChangeMode::Up => "up",
                        ChangeMode::Down => "down",
                    }),
                ])),
            }
        }
        self.group_call(
            &group.suspend,
            ops,
            group.suspend_timeout,
            group.change_timeout,
            timeout,
        )
        .await
    }

    async fn group_call(
        &self,
        suspend: &[String],
        ops: Vec<Term>,
        suspend_timeout: Duration,
        change_timeout: Duration,
        timeout: Duration,
    ) -> Result<GroupResult, RuntimeError> {
        let spec = tuple(vec![
            atoms(suspend),
            list(ops),
            int(ms(suspend_timeout.min(timeout))),
            int(ms(change_timeout.min(timeout))),
        ]);
        let answer = self
            .call(
                helper::MODULE,
                "run_group",
                vec![spec, int(ms(timeout))],
                timeout,
            )
            .await?;
        let number = |t: Option<&Term>| t.and_then(as_i64).unwrap_or(0);
        if let Some(rest) = tagged(&answer, "ok") {
            Ok(GroupResult {
                ok: true,
                window_us: number(rest.first()),
                suspended: number(rest.get(1)),
                message: rest.get(2).map(text).unwrap_or_default(),
                warnings: rest.get(3).map(texts).unwrap_or_default(),
            })
        } else if let Some(rest) = tagged(&answer, "error") {
            Ok(GroupResult {
                ok: false,
                message: rest.first().map(text).unwrap_or_default(),
                window_us: number(rest.get(1)),
                suspended: number(rest.get(2)),
                warnings: Vec::new(),
            })
        } else {
            Err(failed(format!(
                "unexpected answer from the helper: {answer}"
            )))
        }
    }

    /// Run a group, record what it touched before it runs, report its window.
    async fn execute_group(
        &self,
        state: &mut RunState,
        group: Group,
        timeout: Duration,
    ) -> StepResult {
        // Journal first: if the agent dies during the call, recovery must know what may have
        // changed.
        let mut touched = state.touched.clone();
        for op in &group.ops {
            if let Op::Load { module } = op
                && !touched.iter().any(|t| &t.module == module)
            {
                touched.push(Touched {
                    module: module.clone(),
                    changed: None,
                });
            }
        }
        for op in &group.ops {
            if let Op::CodeChange {
                modules,
                extra,
                mode: ChangeMode::Up,
            } = op
            {
                for t in touched.iter_mut().filter(|t| modules.contains(&t.module)) {
                    t.changed = Some(extra.clone());
                }
            }
        }
        let before = state.touched.clone();
        state.touched = touched;
        self.save_run(state)?;
        let result = self.run_group(&group, state, timeout).await;
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                // Unknown whether it ran: keep `touched` as written, rollback checks each module.
                return Err(e);
            }
        };
        tracing::info!(app = %self.config.app, node = %self.config.node, ok = result.ok, window_us = result.window_us, suspended = result.suspended, "in-node upgrade group finished");
        if result.ok {
            let mut versions = self.versions();
            if versions.current != state.to {
                versions.current = state.to.clone();
                self.set_versions(versions)?;
            }
            Ok(StepOutput {
                output: format!("{}; {}", result.describe(), result.message),
                warnings: result.warnings,
            })
        } else {
            // The helper undid the group: the node is as before it.
            state.touched = before;
            self.save_run(state)?;
            Err(RuntimeError::Failed {
                message: format!(
                    "{}; the node's previous code was reloaded and its processes resumed with their old state",
                    result.message
                ),
                output: result.describe(),
            })
        }
    }

    /// Back to the permanent release: in the node when possible, else by restarting it.
    async fn rollback(
        &self,
        run: &mut Option<RunState>,
        timeout: Duration,
    ) -> Result<String, RuntimeError> {
        let Some(state) = run.as_mut() else {
            return Ok("nothing to roll back".into());
        };
        let versions = self.versions();
        let permanent = if versions.permanent.is_empty() {
            state.from.clone()
        } else {
            versions.permanent.clone()
        };
        let old_dir = self.release_dir(&permanent);
        let mut output = String::new();
        let in_node = if state.restarted {
            Err(failed("the node was restarted on the new release"))
        } else if state.touched.is_empty() {
            Ok("no module was loaded".to_string())
        } else {
            let mut ops = Vec::new();
            let mut suspend = Vec::new();
            for t in state.touched.iter().rev() {
                let path = old_dir.join(format!("{}.beam", t.module));
                let Ok(bytes) = tokio::fs::read(&path).await else {
                    // A module the upgrade added: the old release does not call it.
                    continue;
                };
                suspend.push(t.module.clone());
                ops.push(tuple(vec![
                    atom("downgrade"),
                    atom(&t.module),
                    bin(path.to_string_lossy().as_bytes().to_vec()),
                    bin(bytes),
                    bin(t.changed.clone().unwrap_or_default().into_bytes()),
                    boolean(t.changed.is_some()),
                ]));
            }
            match self
                .group_call(&suspend, ops, timeout / 4, timeout / 4, timeout)
                .await
            {
                Ok(r) if r.ok => Ok(format!("old code reloaded in the node: {}", r.describe())),
                Ok(r) => Err(failed(format!(
                    "downgrade in the node failed: {}",
                    r.message
                ))),
                Err(e) => Err(e),
            }
        };
        match in_node {
            Ok(out) => output.push_str(&out),
            Err(e) => {
                tracing::warn!(app = %self.config.app, error = %e, "rolling back by restarting the node on the permanent release");
                self.restore_code_dir(&old_dir)?;
                self.restart_node(timeout).await?;
                output.push_str(&format!(
                    "{e}; node restarted on the permanent release {permanent}"
                ));
            }
        }
        self.set_versions(Versions {
            current: permanent.clone(),
            permanent,
        })?;
        self.clear_run();
        *run = None;
        Ok(output)
    }

    /// Copy the `.beam` files of `code_dir` to `releases/<version>/` unless already there.
    fn snapshot_code_dir(&self, version: &str) -> Result<(), RuntimeError> {
        let dest = self.release_dir(version);
        if dest.join(".complete").exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dest)
            .map_err(|e| failed(format!("cannot create {}: {e}", dest.display())))?;
        let entries = std::fs::read_dir(&self.config.code_dir).map_err(|e| {
            failed(format!(
                "cannot read code_dir {}: {e}",
                self.config.code_dir.display()
            ))
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "beam" || e == "app") {
                let target = dest.join(entry.file_name());
                let bytes = std::fs::read(&path)
                    .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
                write_atomically(&target, &bytes)
                    .map_err(|e| failed(format!("cannot write {}: {e}", target.display())))?;
            }
        }
        write_atomically(&dest.join(".complete"), b"")
            .map_err(|e| failed(format!("cannot mark {} complete: {e}", dest.display())))
    }

    /// Write the staged modules into `code_dir` (each file atomically).
    fn install_code_dir(&self, state: &RunState) -> Result<(), RuntimeError> {
        for (module, path) in &state.staged {
            let bytes = std::fs::read(path)
                .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
            let target = self.config.code_dir.join(format!("{module}.beam"));
            write_atomically(&target, &bytes)
                .map_err(|e| failed(format!("cannot write {}: {e}", target.display())))?;
        }
        Ok(())
    }

    /// Put the snapshot of a release back into `code_dir`.
    fn restore_code_dir(&self, release: &Path) -> Result<(), RuntimeError> {
        let entries = std::fs::read_dir(release)
            .map_err(|e| failed(format!("cannot read {}: {e}", release.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "beam" || e == "app") {
                let bytes = std::fs::read(&path)
                    .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
                let target = self.config.code_dir.join(entry.file_name());
                write_atomically(&target, &bytes)
                    .map_err(|e| failed(format!("cannot write {}: {e}", target.display())))?;
            }
        }
        Ok(())
    }

    /// Whether the node answers and runs the app.
    async fn app_running(&self, timeout: Duration) -> Result<bool, RuntimeError> {
        let apps = self
            .call("application", "which_applications", Vec::new(), timeout)
            .await?;
        let running = match &apps {
            Term::List(l) => l.elements.iter().any(|e| match e {
                Term::Tuple(t) => {
                    matches!(t.elements.first(), Some(Term::Atom(a)) if a.name == self.config.app)
                }
                _ => false,
            }),
            _ => false,
        };
        Ok(running)
    }

    /// Stop the node (init:stop, then halt) and start it again with `start`, waiting until it
    /// runs the app.
    async fn restart_node(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let client = self.client()?;
        // init:stop/0 answers before the node goes down.
        let _ = self
            .call("init", "stop", Vec::new(), SHORT_CALL.min(timeout))
            .await;
        let gone_by = Instant::now() + STOP_GRACE.min(timeout);
        loop {
            client.reset().await;
            match self
                .call("erlang", "node", Vec::new(), Duration::from_secs(1))
                .await
            {
                Err(_) => break,
                Ok(_) if Instant::now() >= gone_by => {
                    let _ = self
                        .call("erlang", "halt", Vec::new(), Duration::from_secs(1))
                        .await;
                }
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
        client.reset().await;
        self.spawn_start()?;
        let left = timeout.saturating_sub(started.elapsed());
        let deadline = Instant::now() + left;
        loop {
            client.reset().await;
            if let Ok(true) = self.app_running(Duration::from_secs(2)).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "node {} did not come back running `{}` within {left:?} after `{}`",
                    self.config.node,
                    self.config.app,
                    self.config.start.join(" ")
                )));
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    /// Start the node with the declared `start` command, in its own process group, output to
    /// `<dir>/node.log`. The child is reaped in the background; the node outlives the agent.
    fn spawn_start(&self) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", self.dir.display())))?;
        let log_path = self.dir.join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))?;
        let Some((program, args)) = self.config.start.split_first() else {
            return Err(failed("`start` is empty"));
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot run `{}`: {e}", self.config.start.join(" "))))?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }
}

impl BeamRuntime {
    async fn load_object_code(
        &self,
        ctx: &StepContext<'_>,
        artifacts: &[Located<String>],
    ) -> StepResult {
        let rollout = ctx.rollout;
        let app = self.app(rollout)?;
        let mut run = app.run.lock().await;
        if run
            .as_ref()
            .is_none_or(|r| r.rollout_id != rollout.rollout_id)
        {
            *run = Some(RunState {
                rollout_id: rollout.rollout_id.clone(),
                from: rollout.from.clone(),
                to: rollout.to.clone(),
                ..RunState::default()
            });
        }
        let Some(state) = run.as_mut() else {
            return Err(failed("no rollout state"));
        };
        let dest = app.release_dir(&rollout.to);
        tokio::fs::create_dir_all(&dest)
            .await
            .map_err(|e| failed(format!("cannot create {}: {e}", dest.display())))?;
        let mut lines = Vec::new();
        for name in artifacts {
            let Some(module) = name.value.strip_suffix(".beam") else {
                return Err(failed(format!(
                    "artifact `{}` is not a .beam file (the beam runtime stages modules)",
                    name.value
                )));
            };
            let module = Path::new(module)
                .file_name()
                .and_then(|m| m.to_str())
                .unwrap_or(module);
            if !crate::config::is_atom(module) {
                return Err(failed(format!(
                    "`{}`: `{module}` is not a module name",
                    name.value
                )));
            }
            let Some(artifact) = rollout.artifacts.iter().find(|a| a.name == name.value) else {
                return Err(failed(format!(
                    "the rollout carries no artifact `{}`",
                    name.value
                )));
            };
            let bytes = self
                .artifacts
                .bytes(rollout, artifact, &ctx.cancel)
                .await
                .map_err(|e| failed(format!("cannot fetch `{}`: {e}", name.value)))?;
            // The node itself checks that the file is a BEAM file of that module (and, on the
            // way, that it is reachable: a node that is down aborts before the point of no return).
            let answer = app
                .helper_ok(
                    "check_binary",
                    vec![atom(module), bin(bytes.clone())],
                    ctx.deadline,
                )
                .await
                .map_err(|e| failed(format!("`{}`: {e}", name.value)))?;
            let path = dest.join(format!("{module}.beam"));
            write_atomically(&path, &bytes)
                .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
            lines.push(format!(
                "staged {} (vsn {})",
                name.value,
                tagged(&answer, "ok")
                    .and_then(|r| r.first())
                    .map(text)
                    .unwrap_or_default()
            ));
            state.staged.insert(module.to_string(), path);
        }
        // The permanent release, for a rollback by restart.
        let versions = app.versions();
        let permanent = if versions.permanent.is_empty() {
            rollout.from.clone()
        } else {
            versions.permanent
        };
        app.snapshot_code_dir(&permanent)?;
        if app.versions().permanent.is_empty() {
            app.set_versions(Versions {
                current: rollout.from.clone(),
                permanent: rollout.from.clone(),
            })?;
        }
        ok(lines.join("\n"))
    }

    async fn with_state<F>(&self, ctx: &StepContext<'_>, f: F) -> StepResult
    where
        F: for<'s> FnOnce(&'s Arc<App>, &'s mut RunState) -> BoxFuture<'s, StepResult> + Send,
    {
        let app = self.app(ctx.rollout)?;
        let mut run = app.run.lock().await;
        match run.as_mut() {
            Some(state) if state.rollout_id == ctx.rollout.rollout_id => f(app, state).await,
            _ => {
                let mut state = RunState {
                    rollout_id: ctx.rollout.rollout_id.clone(),
                    from: ctx.rollout.from.clone(),
                    to: ctx.rollout.to.clone(),
                    ..RunState::default()
                };
                let result = f(app, &mut state).await;
                *run = Some(state);
                result
            }
        }
    }
}

impl Runtime for BeamRuntime {
    fn name(&self) -> &'static str {
        "beam"
    }

    fn supported_instructions(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        if runtime != ScriptRuntime::Beam || self.apps.is_empty() {
            return BTreeSet::new();
        }
        [
            "load_object_code",
            "check",
            "suspend",
            "load",
            "code_change",
            "resume",
            "stop",
            "start",
            "restart",
            "apply",
            "health",
            "purge",
            "restart_new_emulator",
        ]
        .into_iter()
        .collect()
    }

    fn supports_module_checks(&self, runtime: ScriptRuntime) -> bool {
        runtime == ScriptRuntime::Beam && !self.apps.is_empty()
    }

    /// An upgrade an earlier agent process left unfinished is rolled back first (docs/design.md §5).
    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.recover().await;
            Ok(())
        })
    }

    fn apps(&self) -> Vec<AppStatus> {
        self.apps
            .values()
            .map(|app| {
                let v = app.versions();
                AppStatus {
                    app: app.config.app.clone(),
                    current: v.current,
                    permanent: v.permanent,
                    ..AppStatus::default()
                }
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
                    self.load_object_code(ctx, artifacts).await
                }
                Instruction::Check { modules, .. } => self.check_modules(ctx, modules).await,
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
                Instruction::Stop { targets } => self.children(ctx, targets, "stop_child").await,
                Instruction::Start { targets } => self.children(ctx, targets, "start_child").await,
                Instruction::Restart { targets } => {
                    self.children(ctx, targets, "restart_child").await
                }
                // `apply` in a beam script names an allow-listed MFA, never a hook.
                Instruction::Apply {
                    hook: mfa, args, ..
                } => self.apply(ctx, mfa, args).await,
                Instruction::Health { .. } => self.health(ctx).await,
                Instruction::Purge { targets, brutal } => self.purge(ctx, targets, *brutal).await,
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
            let app = self.app(ctx)?;
            let mut run = app.run.lock().await;
            let Some(state) = run.as_mut().filter(|s| s.rollout_id == ctx.rollout_id) else {
                // Nothing staged by this agent process (e.g. hooks only): just record versions.
                app.set_versions(Versions {
                    current: ctx.to.clone(),
                    permanent: ctx.to.clone(),
                })?;
                return Ok(());
            };
            if !state.brutal.is_empty() {
                let mods: Vec<String> = state.brutal.iter().cloned().collect();
                app.helper_ok("purge", vec![atoms(&mods), boolean(true)], SHORT_CALL)
                    .await?;
            }
            // The node boots the new release from now on.
            app.install_code_dir(state)?;
            app.snapshot_code_dir(&ctx.to)?;
            app.set_versions(Versions {
                current: ctx.to.clone(),
                permanent: ctx.to.clone(),
            })?;
            app.clear_run();
            *run = None;
            Ok(())
        })
    }

    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let Ok(app) = self.app(ctx) else {
                return Ok(());
            };
            let mut run = app.run.lock().await;
            if run.as_ref().is_some_and(|s| s.rollout_id == ctx.rollout_id) {
                *run = None;
            }
            app.clear_run();
            let versions = app.versions();
            if ctx.to != versions.permanent && ctx.to != versions.current {
                let _ = tokio::fs::remove_dir_all(app.release_dir(&ctx.to)).await;
            }
            Ok(())
        })
    }

    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            let app = self.app(ctx.rollout)?;
            let mut run = app.run.lock().await;
            if run
                .as_ref()
                .is_some_and(|s| s.rollout_id != ctx.rollout.rollout_id)
            {
                return ok("nothing of this rollout to roll back");
            }
            if let Some(state) = run.as_mut() {
                // A group that never ran changed nothing.
                state.group = None;
            }
            let out = app.rollback(&mut run, ctx.deadline).await?;
            ok(out)
        })
    }
}

impl BeamRuntime {
    async fn check_modules(
        &self,
        ctx: &StepContext<'_>,
        targets: &[Located<String>],
    ) -> StepResult {
        let mods = modules(targets)?;
        let app = self.app(ctx.rollout)?;
        app.helper_ok("check_old_code", vec![atoms(&mods)], ctx.deadline)
            .await?;
        ok(format!("no process runs old code of {}", mods.join(", ")))
    }

    async fn suspend(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mods = modules(targets)?;
        let deadline = ctx.deadline;
        self.with_state(ctx, move |_app, state| {
            Box::pin(async move {
                let group = state.group.get_or_insert_with(|| Group {
                    suspend_timeout: deadline,
                    change_timeout: deadline,
                    ..Group::default()
                });
                group.suspend_timeout = group.suspend_timeout.min(deadline);
                group.suspend.extend(mods.iter().cloned());
                ok(format!(
                    "{}: suspended inside the node together with the load and code_change that follow, at `resume`",
                    mods.join(", ")
                ))
            })
        })
        .await
    }

    async fn load(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mods = modules(targets)?;
        let deadline = ctx.deadline;
        self.with_state(ctx, move |app, state| {
            Box::pin(async move {
                for m in &mods {
                    if !state.staged.contains_key(m) {
                        return Err(failed(format!(
                            "`load` of `{m}`, which `load_object_code` did not stage"
                        )));
                    }
                }
                let ops = mods.iter().map(|m| Op::Load { module: m.clone() });
                if let Some(group) = state.group.as_mut() {
                    group.ops.extend(ops);
                    return ok(format!(
                        "{}: loaded inside the node at `resume`",
                        mods.join(", ")
                    ));
                }
                // Not within suspend…resume: load at once (one helper call, undone
                // together on failure).
                let group = Group {
                    suspend: Vec::new(),
                    suspend_timeout: deadline,
                    change_timeout: deadline,
                    ops: ops.collect(),
                };
                app.execute_group(state, group, deadline).await
            })
        })
        .await
    }

    async fn code_change(
        &self,
        ctx: &StepContext<'_>,
        targets: &[Located<String>],
        extra: Option<&str>,
        mode: ChangeMode,
    ) -> StepResult {
        let mods = modules(targets)?;
        let deadline = ctx.deadline;
        let extra = extra.unwrap_or_default().to_string();
        self.with_state(ctx, move |_app, state| {
            Box::pin(async move {
                let Some(group) = state.group.as_mut() else {
                    return Err(failed(format!(
                        "`code_change` of {} outside suspend…resume",
                        mods.join(", ")
                    )));
                };
                group.change_timeout = group.change_timeout.min(deadline);
                group.ops.push(Op::CodeChange {
                    modules: mods.clone(),
                    extra,
                    mode,
                });
                ok(format!(
                    "{}: code_change inside the node at `resume`",
                    mods.join(", ")
                ))
            })
        })
        .await
    }

    async fn resume(&self, ctx: &StepContext<'_>, targets: &[Located<String>]) -> StepResult {
        let mods = modules(targets)?;
        let deadline = ctx.deadline;
        self.with_state(ctx, move |app, state| {
            Box::pin(async move {
                let Some(group) = state.group.take() else {
                    return ok(format!("{}: already resumed", mods.join(", ")));
                };
                // The group's own timeouts bound the suspend and code_change parts; the
                // call as a whole gets the longest of the steps' deadlines.
                let timeout = deadline
                    .max(group.suspend_timeout)
                    .max(group.change_timeout);
                app.execute_group(state, group, timeout).await
            })
        })
        .await
    }

    async fn health(&self, ctx: &StepContext<'_>) -> StepResult {
        let app = self.app(ctx.rollout)?;
        let deadline = Instant::now() + ctx.deadline;
        loop {
            match app.app_running(Duration::from_secs(2)).await {
                Ok(true) => {
                    return ok(format!("{} runs `{}`", app.config.node, app.config.app));
                }
                Ok(false) | Err(_) if Instant::now() < deadline && !ctx.cancel.is_cancelled() => {
                    tokio::time::sleep(POLL * 2).await;
                }
                Ok(false) => {
                    return Err(failed(format!(
                        "{} does not run `{}`",
                        app.config.node, app.config.app
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn purge(
        &self,
        ctx: &StepContext<'_>,
        targets: &[Located<String>],
        brutal: bool,
    ) -> StepResult {
        let mods = modules(targets)?;
        let deadline = ctx.deadline;
        self.with_state(ctx, move |app, state| {
            Box::pin(async move {
                let mods = if mods.is_empty() {
                    state.touched.iter().map(|t| t.module.clone()).collect()
                } else {
                    mods
                };
                if mods.is_empty() {
                    return ok("no module to purge");
                }
                if brutal {
                    state.brutal.extend(mods.iter().cloned());
                    app.save_run(state)?;
                }
                // Soft now; brutal (killing what still runs old code) only at make-permanent.
                match app
                    .helper_ok("purge", vec![atoms(&mods), boolean(false)], deadline)
                    .await
                {
                    Ok(_) => ok(format!("old code of {} purged", mods.join(", "))),
                    Err(e) => ok(format!(
                        "soft purge left old code in place: {e}{}",
                        if brutal {
                            "; purged brutally at make-permanent"
                        } else {
                            ""
                        }
                    )),
                }
            })
        })
        .await
    }

    async fn restart_new_emulator(&self, ctx: &StepContext<'_>) -> StepResult {
        let deadline = ctx.deadline;
        self.with_state(ctx, move |app, state| {
            Box::pin(async move {
                let versions = app.versions();
                let permanent = if versions.permanent.is_empty() {
                    state.from.clone()
                } else {
                    versions.permanent
                };
                app.snapshot_code_dir(&permanent)?;
                state.restarted = true;
                app.save_run(state)?;
                app.install_code_dir(state)?;
                app.restart_node(deadline).await?;
                app.set_versions(Versions {
                    current: state.to.clone(),
                    permanent,
                })?;
                ok(format!(
                    "{} restarted on release {}",
                    app.config.node, state.to
                ))
            })
        })
        .await
    }

    async fn apply(
        &self,
        ctx: &StepContext<'_>,
        mfa: &Located<String>,
        args: &[String],
    ) -> StepResult {
        let app = self.app(ctx.rollout)?;
        // Validation refused unlisted MFAs already; this lookup is what makes it impossible
        // to call anything else.
        if !app.config.mfa_allow.contains(&mfa.value) {
            return Err(failed(format!(
                "MFA `{}` is not in the mfa_allow list of beam app `{}`",
                mfa.value, app.config.app
            )));
        }
        let parsed = mfa.value.split_once(':').and_then(|(m, rest)| {
            let (f, a) = rest.split_once('/')?;
            Some((m, f, a.parse::<usize>().ok()?))
        });
        let Some((module, function, arity)) = parsed else {
            return Err(failed(format!(
                "`{}` is not module:function/arity",
                mfa.value
            )));
        };
        if arity != args.len() {
            return Err(failed(format!(
                "`{}` takes {arity} arguments, the script gives {}",
                mfa.value,
                args.len()
            )));
        }
        let args = args.iter().map(|a| bin(a.as_bytes().to_vec())).collect();
        let answer = app.call(module, function, args, ctx.deadline).await?;
        if tagged(&answer, "error").is_some() || is_atom(&answer, "error") {
            return Err(failed(format!("{} returned {answer}", mfa.value)));
        }
        ok(format!("{} returned {answer}", mfa.value))
    }

    async fn children(
        &self,
        ctx: &StepContext<'_>,
        targets: &[Located<String>],
        function: &'static str,
    ) -> StepResult {
        let app = self.app(ctx.rollout)?;
        let mut done = Vec::new();
        for child in targets {
            app.helper_ok(
                function,
                vec![bin(child.value.as_bytes().to_vec()), int(ms(ctx.deadline))],
                ctx.deadline,
            )
            .await?;
            done.push(child.value.clone());
        }
        ok(format!("{function}: {}", done.join(", ")))
    }
}

/// The Erlang cookie of `node`, from `path` (trimmed, as `erl -setcookie` takes it).
pub(crate) async fn read_cookie(
    node: &str,
    path: &std::path::Path,
) -> Result<String, RuntimeError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        failed(format!(
            "cannot read the cookie of {node} from {}: {e}",
            path.display()
        ))
    })?;
    Ok(text.trim().to_string())
}
