//! The OTP release runtime (docs/design.md §13): nodes running a rebar3/relx release
//! (`[[release]]` in agent.toml), upgraded by the node's own `release_handler`, driven over the
//! Erlang distribution ([`crate::runtime::beam::dist`]: hidden node, TCP_NODELAY, a deadline on
//! every call). The fleet-wide version of relx's `bin/<rel> upgrade`:
//!
//! * `unpack_release` (prepare; the node's vote): the tarball from the content store (verified
//!   against its digest) is copied to `<root>/releases/<vsn>/<rel>.tar.gz`,
//!   `release_handler:unpack_release("<vsn>/<rel>")`, then `check_install_release(Vsn, [purge])`;
//!   the new release's `vm.args(.src)`, with this node's variables, must boot the same node name
//!   and cookie.
//! * `install_release` (after the point of no return): `release_handler:install_release(Vsn,
//!   [{update_paths, true}])`: the relup runs. It is called through the in-node helper
//!   (`hotroll_upgrade:install_release/5`), which does what the release handler does not: the
//!   processes running a module the relup code_changes that no supervisor knows (a registered
//!   gen_server started by hand) are suspended before the relup, converted with its Extra after
//!   it and resumed; one whose code_change fails is stopped and the step fails (the node is
//!   rolled back), never left with a state its code cannot read. A code_change that reached no
//!   process is reported as a warning (the step's `warnings`, the history's `warning`).
//! * make permanent: `release_handler:make_permanent(Vsn)` and `bin/<rel>-<vsn>` copied over
//!   `bin/<rel>` (as relx does), so a restart boots the new release.
//! * abort before the point of no return: `release_handler:remove_release(Vsn)`.
//! * rollback after it (before make permanent): the relup's downgrade
//!   (`install_release(Permanent)`, in-memory state kept) when the release has one, else the node
//!   is stopped and started again from its permanent release (in-memory state lost); the step's
//!   output says which. Either way the new release is removed afterwards.
//!
//! What the rollout did is written to `<data_dir>/otp_release/<app>/rollout.json` before each
//! change, so an agent that restarts mid-rollout rolls the node back at boot.

mod identity;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use erl_dist::term::Term;
use hotroll_script::{Instruction, Located, Runtime as ScriptRuntime};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::beam::dist::{DistClient, NodeAddress, epmd_port_from_env};
use super::beam::helper;
use super::beam::term::{atom, boolean, int, list, tagged, text, texts, tuple};
use super::{
    AppStatus, BoxFuture, RolloutContext, Runtime, RuntimeError, StepContext, StepOutput,
    StepResult,
};
use crate::artifacts::Fetcher;
use crate::boot::write_atomically;
use crate::config::{Config, ReleaseConfig};
use crate::report::ReleaseStatus;

/// Bound of the small calls (which_releases, make_permanent, remove_release) when the step
/// gives none shorter.
const SHORT_CALL: Duration = Duration::from_secs(15);
/// How long a node stopped for a restart gets to go away before it is halted.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// The bound of a rollback the agent runs on its own at boot.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);

/// One release as `release_handler:which_releases/0` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseEntry {
    pub name: String,
    pub version: String,
    /// `current`, `permanent`, `unpacked` or `old`.
    pub status: String,
}

/// The OTP release runtime of one agent: one [`Node`] per `[[release]]` entry.
pub struct OtpReleaseRuntime {
    nodes: BTreeMap<String, Node>,
    fetcher: Fetcher,
}

impl std::fmt::Debug for OtpReleaseRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtpReleaseRuntime")
            .field("apps", &self.nodes.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct Node {
    config: ReleaseConfig,
    client: DistClient,
    /// `<data_dir>/otp_release/<app>`.
    dir: PathBuf,
    /// The last `which_releases` answer (Hello and reports read it without calling the node).
    releases: StdMutex<Vec<ReleaseEntry>>,
    /// The rollout in progress; also serialises the node's operations.
    run: Mutex<Option<RunState>>,
}

/// What a rollout did to the node so far (`rollout.json`, written before each change).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct RunState {
    rollout_id: String,
    from: String,
    to: String,
    /// The tarball was handed to unpack_release (the new release may exist on the node).
    unpacked: bool,
    /// install_release was called (the relup may have run).
    installed: bool,
}

fn failed(message: impl Into<String>) -> RuntimeError {
    RuntimeError::failed(message)
}

fn ok(output: impl Into<String>) -> StepResult {
    Ok(StepOutput::new(output))
}

fn string(value: &str) -> Term {
    Term::from(value.to_string())
}

/// `[{Name, Vsn, Libs, Status}]`.
fn parse_which_releases(answer: &Term) -> Result<Vec<ReleaseEntry>, String> {
    let Term::List(entries) = answer else {
        return Err(format!("which_releases answered {answer}"));
    };
    entries
        .elements
        .iter()
        .map(|entry| match entry {
            Term::Tuple(t) if t.elements.len() == 4 => Ok(ReleaseEntry {
                name: text(&t.elements[0]),
                version: text(&t.elements[1]),
                status: match &t.elements[3] {
                    Term::Atom(a) => a.name.clone(),
                    other => other.to_string(),
                },
            }),
            other => Err(format!("which_releases listed {other}")),
        })
        .collect()
}

impl OtpReleaseRuntime {
    /// A runtime for the `[[release]]` entries of `config`, fetching tarballs with `fetcher`.
    pub fn new(config: &Config, fetcher: Fetcher) -> Self {
        let epmd_port = epmd_port_from_env();
        let nodes = config
            .releases
            .values()
            .map(|release| {
                let node = Node {
                    client: DistClient::new(NodeAddress {
                        node: release.node.clone(),
                        cookie: String::new(),
                        epmd_port,
                    }),
                    config: release.clone(),
                    dir: config.data_dir.join("otp_release").join(&release.app),
                    releases: StdMutex::new(Vec::new()),
                    run: Mutex::new(None),
                };
                (release.app.clone(), node)
            })
            .collect();
        Self { nodes, fetcher }
    }

    fn node(&self, rollout: &RolloutContext) -> Result<&Node, RuntimeError> {
        self.nodes.get(&rollout.app).ok_or_else(|| {
            let declared: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
            failed(format!(
                "app `{}` is not declared as a [[release]] in this agent's config (declared: {})",
                rollout.app,
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ))
        })
    }

    async fn unpack_release(&self, ctx: &StepContext<'_>, name: &Located<String>) -> StepResult {
        let rollout = ctx.rollout;
        let node = self.node(rollout)?;
        let started = Instant::now();
        let mut run = node.run.lock().await;
        let releases = node.which_releases(ctx.deadline).await?;
        let current = current_of(&releases);
        if current.as_deref() != Some(rollout.from.as_str()) {
            return Err(failed(format!(
                "{} runs release {} of `{}`, but this script upgrades from {}",
                node.config.node,
                current.as_deref().unwrap_or("(none)"),
                node.config.name,
                rollout.from
            )));
        }
        let Some(artifact) = rollout.artifacts.iter().find(|a| a.name == name.value) else {
            return Err(failed(format!(
                "the rollout carries no artifact `{}`",
                name.value
            )));
        };
        let fetched = self
            .fetcher
            .ensure(&artifact.digest, artifact.size, &ctx.cancel)
            .await
            .map_err(|e| failed(format!("cannot fetch `{}`: {e}", name.value)))?;
        let state = RunState {
            rollout_id: rollout.rollout_id.clone(),
            from: rollout.from.clone(),
            to: rollout.to.clone(),
            unpacked: true,
            installed: false,
        };
        let already = releases.iter().any(|r| r.version == rollout.to);
        if !already {
            // Journal first: from here on the node may hold the new release.
            node.save_run(&state)?;
            *run = Some(state);
            let tarball = node.tarball_path(&rollout.to);
            copy_atomically(&fetched.path, &tarball).await?;
            let package = format!("{}/{}", rollout.to, node.config.name);
            let answer = node
                .call(
                    "release_handler",
                    "unpack_release",
                    vec![string(&package)],
                    ctx.deadline,
                )
                .await?;
            match tagged(&answer, "ok").and_then(|r| r.first()).map(text) {
                Some(vsn) if vsn == rollout.to => {}
                Some(vsn) => {
                    return Err(failed(format!(
                        "`{}` holds release {vsn}, but the script installs {}",
                        name.value, rollout.to
                    )));
                }
                None => {
                    return Err(failed(format!(
                        "release_handler:unpack_release(\"{package}\") on {} answered {answer}",
                        node.config.node
                    )));
                }
            }
        } else {
            *run = Some(state);
        }
        let answer = node
            .call(
                "release_handler",
                "check_install_release",
                vec![string(&rollout.to), list(vec![atom("purge")])],
                ctx.deadline,
            )
            .await?;
        if tagged(&answer, "ok").is_none() {
            return Err(failed(format!(
                "release_handler:check_install_release(\"{}\", [purge]) on {} answered {answer}",
                rollout.to, node.config.node
            )));
        }
        // check_install_release does not look at the relup or sys.config: the node's own
        // parser does, so a package install_release would fail on is refused here.
        let froms = node.relup_froms(&rollout.to, ctx.deadline).await?;
        if !froms.iter().any(|f| f == &rollout.from) {
            return Err(failed(format!(
                "the relup of {} has no UpFrom entry for {}, the release {} runs (it upgrades from: {})",
                rollout.to,
                rollout.from,
                node.config.node,
                if froms.is_empty() {
                    "nothing".to_string()
                } else {
                    froms.join(", ")
                }
            )));
        }
        node.check_sys_config(&rollout.to, ctx.deadline).await?;
        let identity = node.check_identity(&rollout.to).await?;
        node.which_releases(SHORT_CALL.min(ctx.deadline)).await?;
        ok(format!(
            "release {} unpacked on {} and checked (check_install_release with purge) in {} ms; {identity}",
            rollout.to,
            node.config.node,
            started.elapsed().as_millis()
        ))
    }

    async fn install_release(&self, ctx: &StepContext<'_>) -> StepResult {
        let rollout = ctx.rollout;
        let node = self.node(rollout)?;
        let mut run = node.run.lock().await;
        let Some(state) = run
            .as_mut()
            .filter(|s| s.rollout_id == rollout.rollout_id && s.unpacked)
        else {
            return Err(failed(format!(
                "`install_release` of {} without an `unpack_release` of this rollout",
                rollout.to
            )));
        };
        state.installed = true;
        node.save_run(state)?;
        let started = Instant::now();
        let installed = node
            .install(
                &rollout.to,
                Relup::Up {
                    from: &rollout.from,
                },
                ctx.deadline,
            )
            .await?;
        let took = started.elapsed();
        let releases = node.which_releases(SHORT_CALL.min(ctx.deadline)).await;
        match tagged(&installed.answer, "ok") {
            Some(rest) => {
                let from = rest.first().map(text).unwrap_or_default();
                let current = releases.ok().and_then(|r| current_of(&r));
                if current.as_deref() != Some(rollout.to.as_str()) {
                    return Err(failed(format!(
                        "install_release answered ok but {} runs {}",
                        node.config.node,
                        current.as_deref().unwrap_or("(unknown)")
                    )));
                }
                if !installed.failures.is_empty() {
                    // The relup ran, but a process it does not see could not take the new
                    // state: the step fails and the node is rolled back.
                    return Err(failed(installed.failures.join("; ")));
                }
                Ok(StepOutput {
                    output: format!(
                        "release {} installed on {} from {from}: the relup ran in {} ms (install_release_ms={}){}",
                        rollout.to,
                        node.config.node,
                        took.as_millis(),
                        took.as_millis(),
                        installed.describe_unsupervised()
                    ),
                    warnings: installed.warnings,
                })
            }
            None => Err(failed(format!(
                "release_handler:install_release(\"{}\") on {} answered {}",
                rollout.to, node.config.node, installed.answer
            ))),
        }
    }
}

/// Which entry of which relup `install_release` runs.
enum Relup<'a> {
    /// An UpFrom entry of the new release's relup.
    Up { from: &'a str },
    /// A DownTo entry of the relup of the release the node runs.
    Down { current: &'a str, to: &'a str },
}

/// What `hotroll_upgrade:install_release/5` answered.
struct Installed {
    /// `release_handler:install_release/2`'s own answer.
    answer: Term,
    /// The unsupervised processes converted, as `[{Pid, Module}]` text.
    unsupervised: String,
    warnings: Vec<String>,
    /// One line per unsupervised process whose code_change failed (it was stopped).
    failures: Vec<String>,
}

impl Installed {
    fn describe_unsupervised(&self) -> String {
        if self.unsupervised.is_empty() || self.unsupervised == "[]" {
            String::new()
        } else {
            format!(
                "; processes in no supervision tree converted with the relup's code_change: {}",
                self.unsupervised
            )
        }
    }
}

/// The release a node runs: the one marked `current`, else the `permanent` one.
fn current_of(releases: &[ReleaseEntry]) -> Option<String> {
    releases
        .iter()
        .find(|r| r.status == "current")
        .or_else(|| releases.iter().find(|r| r.status == "permanent"))
        .map(|r| r.version.clone())
}

fn permanent_of(releases: &[ReleaseEntry]) -> Option<String> {
    releases
        .iter()
        .find(|r| r.status == "permanent")
        .map(|r| r.version.clone())
}

async fn copy_atomically(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
    }
    let bytes = tokio::fs::read(from)
        .await
        .map_err(|e| failed(format!("cannot read {}: {e}", from.display())))?;
    let target = to.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
        .await
        .map_err(|e| failed(format!("cannot write {}: {e}", to.display())))?
        .map_err(|e| failed(format!("cannot write {}: {e}", to.display())))
}

impl Node {
    fn tarball_path(&self, version: &str) -> PathBuf {
        self.config
            .root_dir
            .join("releases")
            .join(version)
            .join(format!("{}.tar.gz", self.config.name))
    }

    fn save_run(&self, state: &RunState) -> Result<(), RuntimeError> {
        let text = serde_json::to_vec_pretty(state)
            .map_err(|e| failed(format!("cannot encode the rollout state: {e}")))?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", self.dir.display())))?;
        let path = self.dir.join("rollout.json");
        write_atomically(&path, &text)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }

    fn load_run(&self) -> Option<RunState> {
        let text = std::fs::read_to_string(self.dir.join("rollout.json")).ok()?;
        serde_json::from_str(&text)
            .map_err(|e| tracing::warn!(app = %self.config.app, error = %e, "ignoring an unreadable rollout.json"))
            .ok()
    }

    fn clear_run(&self) {
        let _ = std::fs::remove_file(self.dir.join("rollout.json"));
    }

    async fn cookie(&self) -> Result<String, RuntimeError> {
        crate::runtime::beam::read_cookie(&self.config.node, &self.config.cookie_file).await
    }

    async fn call(
        &self,
        module: &str,
        function: &str,
        args: Vec<Term>,
        timeout: Duration,
    ) -> Result<Term, RuntimeError> {
        self.client.set_cookie(self.cookie().await?).await;
        self.client
            .call(module, function, args, timeout)
            .await
            .map_err(|e| failed(e.to_string()))
    }

    /// Ask the node and remember the answer for [`Runtime::apps`].
    async fn which_releases(&self, timeout: Duration) -> Result<Vec<ReleaseEntry>, RuntimeError> {
        let answer = self
            .call("release_handler", "which_releases", Vec::new(), timeout)
            .await?;
        let releases = parse_which_releases(&answer).map_err(failed)?;
        if let Ok(mut cached) = self.releases.lock() {
            cached.clone_from(&releases);
        }
        Ok(releases)
    }

    fn cached(&self) -> Vec<ReleaseEntry> {
        self.releases.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The new release's vm.args(.src) with this node's variables boots this node.
    async fn check_identity(&self, version: &str) -> Result<String, RuntimeError> {
        let dir = self.config.root_dir.join("releases").join(version);
        let mut found = None;
        for file in ["vm.args.src", "vm.args"] {
            if let Ok(text) = tokio::fs::read_to_string(dir.join(file)).await {
                found = Some((file, text));
                break;
            }
        }
        let Some((file, text)) = found else {
            return Err(failed(format!(
                "release {version} has no vm.args.src or vm.args under {}",
                dir.display()
            )));
        };
        let cookie = self.cookie().await?;
        let mut vars = self.config.env.clone();
        if let Some(var) = &self.config.cookie_env {
            vars.insert(var.clone(), cookie.clone());
        }
        identity::check(&text, &vars, &self.config.node, &cookie)
            .map_err(|e| failed(format!("release {version} ({file}): {e}")))
    }

    /// `file:consult/1` in the node.
    async fn consult(&self, path: &Path, timeout: Duration) -> Result<Vec<Term>, String> {
        let answer = self
            .call(
                "file",
                "consult",
                vec![string(&path.to_string_lossy())],
                timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
        match tagged(&answer, "ok").and_then(|r| r.first()) {
            Some(Term::List(terms)) => Ok(terms.elements.clone()),
            _ => Err(format!("file:consult answered {answer}")),
        }
    }

    /// `release_handler:install_release(Version)` through the helper, which also converts the
    /// processes the release handler does not see (running a module the relup code_changes, in
    /// no supervision tree) with the relup's own Extra, and says which code_change reached no
    /// process (`hotroll_upgrade:install_release/5`).
    async fn install(
        &self,
        version: &str,
        relup: Relup<'_>,
        timeout: Duration,
    ) -> Result<Installed, RuntimeError> {
        self.client.set_cookie(self.cookie().await?).await;
        helper::ensure(&self.client, SHORT_CALL.min(timeout))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let releases = self.config.root_dir.join("releases");
        let (relup_path, entry, options) = match relup {
            Relup::Up { from } => (
                releases.join(version).join("relup"),
                tuple(vec![atom("up"), string(from)]),
                list(vec![tuple(vec![atom("update_paths"), boolean(true)])]),
            ),
            Relup::Down { current, to } => (
                releases.join(current).join("relup"),
                tuple(vec![atom("down"), string(to)]),
                list(Vec::new()),
            ),
        };
        let answer = self
            .call(
                helper::MODULE,
                "install_release",
                vec![
                    string(version),
                    options,
                    string(&relup_path.to_string_lossy()),
                    entry,
                    int(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                ],
                timeout,
            )
            .await?;
        match &answer {
            Term::Tuple(t) if t.elements.len() == 4 => Ok(Installed {
                answer: t.elements[0].clone(),
                unsupervised: text(&t.elements[1]),
                warnings: texts(&t.elements[2]),
                failures: texts(&t.elements[3]),
            }),
            other => Err(failed(format!(
                "hotroll_upgrade:install_release on {} answered {other}",
                self.config.node
            ))),
        }
    }

    /// The UpFrom versions of `releases/<version>/relup`.
    async fn relup_froms(
        &self,
        version: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, RuntimeError> {
        let path = self
            .config
            .root_dir
            .join("releases")
            .join(version)
            .join("relup");
        let terms = self.consult(&path, timeout).await.map_err(|e| {
            failed(format!(
                "release {version} has no readable relup ({}): {e}",
                path.display()
            ))
        })?;
        let up = match terms.first() {
            Some(Term::Tuple(t)) if t.elements.len() == 3 => &t.elements[1],
            _ => {
                return Err(failed(format!(
                    "{} is not {{Vsn, UpFrom, DownTo}}",
                    path.display()
                )));
            }
        };
        Ok(match up {
            Term::List(entries) => entries
                .elements
                .iter()
                .filter_map(|e| match e {
                    Term::Tuple(t) => t.elements.first().map(text),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
    }

    /// The new release's sys.config (relx's .src with this node's variables) parses.
    async fn check_sys_config(&self, version: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let dir = self.config.root_dir.join("releases").join(version);
        let plain = dir.join("sys.config");
        let path = if tokio::fs::try_exists(&plain).await.unwrap_or(false) {
            plain
        } else {
            let src = dir.join("sys.config.src");
            let Ok(text) = tokio::fs::read_to_string(&src).await else {
                return Err(failed(format!(
                    "release {version} has no sys.config or sys.config.src"
                )));
            };
            let mut vars = self.config.env.clone();
            if let Some(var) = &self.config.cookie_env {
                vars.insert(var.clone(), self.cookie().await?);
            }
            let lookup = |v: &str| vars.get(v).cloned().or_else(|| std::env::var(v).ok());
            let substituted = identity::substitute(&text, &lookup);
            let out = self.dir.join(format!("sys.config.{version}.check"));
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| failed(format!("cannot create {}: {e}", self.dir.display())))?;
            write_atomically(&out, substituted.as_bytes())
                .map_err(|e| failed(format!("cannot write {}: {e}", out.display())))?;
            out
        };
        let result = self.consult(&path, timeout).await;
        if path.starts_with(&self.dir) {
            let _ = std::fs::remove_file(&path);
        }
        match result {
            Ok(terms) if matches!(terms.as_slice(), [Term::List(_)]) => Ok(()),
            Ok(_) => Err(failed(format!(
                "release {version}: sys.config is not one list of app configs"
            ))),
            Err(e) => Err(failed(format!(
                "release {version}: sys.config does not parse: {e}"
            ))),
        }
    }

    /// `remove_release` of `version` unless the node runs it or it is permanent.
    async fn remove(&self, version: &str, timeout: Duration) -> Result<String, RuntimeError> {
        let releases = self.which_releases(timeout).await?;
        let Some(entry) = releases.iter().find(|r| r.version == version) else {
            let _ = tokio::fs::remove_file(self.tarball_path(version)).await;
            return Ok(format!("release {version} is not on the node"));
        };
        if entry.status == "current" || entry.status == "permanent" {
            return Ok(format!("release {version} is {}: kept", entry.status));
        }
        let answer = self
            .call(
                "release_handler",
                "remove_release",
                vec![string(version)],
                timeout,
            )
            .await?;
        self.which_releases(timeout).await?;
        if matches!(&answer, Term::Atom(a) if a.name == "ok") {
            Ok(format!("release {version} removed"))
        } else {
            Err(failed(format!(
                "release_handler:remove_release(\"{version}\") answered {answer}"
            )))
        }
    }

    /// Back to the permanent release: the relup's downgrade, else a restart from it.
    async fn rollback(&self, state: &RunState, timeout: Duration) -> Result<String, RuntimeError> {
        let started = Instant::now();
        let left = || timeout.saturating_sub(started.elapsed());
        if !state.installed {
            let removed = self.remove(&state.to, left()).await?;
            return Ok(format!(
                "{} was not installed, nothing ran; {removed}",
                state.to
            ));
        }
        let releases = self.which_releases(left()).await.unwrap_or_default();
        let permanent = permanent_of(&releases).unwrap_or_else(|| state.from.clone());
        let current = current_of(&releases);
        let how = if current.as_deref() == Some(permanent.as_str()) && !releases.is_empty() {
            format!(
                "{} already runs the permanent release {permanent}",
                self.config.node
            )
        } else {
            let current = current.as_deref().unwrap_or(state.to.as_str());
            match self.downgrade(current, &permanent, left()).await {
                Ok(()) => format!(
                    "downgraded to the permanent release {permanent} by the relup (install_release): in-memory state kept"
                ),
                Err(e) => {
                    tracing::warn!(app = %self.config.app, error = %e, "no downgrade; restarting the node from its permanent release");
                    self.restart(left()).await?;
                    format!(
                        "no downgrade by the relup ({e}); node restarted from the permanent release {permanent}: in-memory state lost"
                    )
                }
            }
        };
        let removed = match self.remove(&state.to, left()).await {
            Ok(removed) => removed,
            Err(e) => format!("release {} left on the node: {e}", state.to),
        };
        Ok(format!("{how}; {removed}"))
    }

    async fn downgrade(
        &self,
        current: &str,
        permanent: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let installed = self
            .install(
                permanent,
                Relup::Down {
                    current,
                    to: permanent,
                },
                timeout,
            )
            .await?;
        if tagged(&installed.answer, "ok").is_none() {
            return Err(failed(format!(
                "install_release(\"{permanent}\") answered {}",
                installed.answer
            )));
        }
        if !installed.failures.is_empty() {
            return Err(failed(installed.failures.join("; ")));
        }
        let releases = self.which_releases(timeout).await?;
        match current_of(&releases) {
            Some(v) if v == permanent => Ok(()),
            other => Err(failed(format!(
                "after the downgrade the node runs {}",
                other.as_deref().unwrap_or("(unknown)")
            ))),
        }
    }

    /// Stop the node (init:stop, then halt) and start it with `start` and its variables; the
    /// start script boots the permanent release (make permanent has not replaced bin/<rel>).
    async fn restart(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let _ = self
            .call("init", "stop", Vec::new(), SHORT_CALL.min(timeout))
            .await;
        let gone_by = Instant::now() + STOP_GRACE.min(timeout);
        loop {
            self.client.reset().await;
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
            if started.elapsed() > timeout {
                return Err(failed(format!(
                    "{} did not stop within {timeout:?}",
                    self.config.node
                )));
            }
        }
        self.start().await?;
        let deadline = started + timeout;
        loop {
            self.client.reset().await;
            if let Ok(releases) = self.which_releases(Duration::from_secs(2)).await
                && current_of(&releases).is_some()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "{} did not come back within {timeout:?} after `{}`",
                    self.config.node,
                    self.config.start.join(" ")
                )));
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    /// Run `start` with the node's variables, output to `<dir>/node.log`; relx's `daemon`
    /// returns once the node is launched.
    async fn start(&self) -> Result<(), RuntimeError> {
        let Some((program, args)) = self.config.start.split_first() else {
            return Err(failed("`start` is empty"));
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", self.dir.display())))?;
        let log_path = self.dir.join("node.log");
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .envs(&self.config.env)
            .stdin(std::process::Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(var) = &self.config.cookie_env {
            command.env(var, self.cookie().await?);
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot run `{}`: {e}", self.config.start.join(" "))))?;
        // `daemon` detaches; anything else keeps running and is reaped in the background.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    async fn make_permanent(&self, version: &str) -> Result<(), RuntimeError> {
        // The node may have died since install_release (and been started again from its
        // permanent release, or not at all): then there is nothing to make permanent, and the
        // executor rolls it back ([`RuntimeError::NotRunningNew`]).
        self.client.reset().await;
        let releases = self.which_releases(SHORT_CALL).await.map_err(|e| {
            RuntimeError::NotRunningNew(format!(
                "{} cannot be reached since install_release of {version} ({e})",
                self.config.node
            ))
        })?;
        let current = current_of(&releases);
        if current.as_deref() != Some(version) {
            return Err(RuntimeError::NotRunningNew(format!(
                "{} runs {} since install_release of {version}",
                self.config.node,
                current.as_deref().unwrap_or("no release")
            )));
        }
        let answer = self
            .call(
                "release_handler",
                "make_permanent",
                vec![string(version)],
                SHORT_CALL,
            )
            .await?;
        if !matches!(&answer, Term::Atom(a) if a.name == "ok") {
            return Err(failed(format!(
                "release_handler:make_permanent(\"{version}\") on {} answered {answer}",
                self.config.node
            )));
        }
        // relx's own step after make_permanent: the start script of the new release becomes
        // bin/<rel>, so a restart boots it.
        let bin = self.config.root_dir.join("bin");
        let versioned = bin.join(format!("{}-{version}", self.config.name));
        if tokio::fs::try_exists(&versioned).await.unwrap_or(false) {
            let script = self.config.script();
            copy_atomically(&versioned, &script).await?;
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .await
                .map_err(|e| failed(format!("cannot chmod {}: {e}", script.display())))?;
        }
        self.which_releases(SHORT_CALL).await?;
        Ok(())
    }
}

impl Runtime for OtpReleaseRuntime {
    fn name(&self) -> &'static str {
        "otp_release"
    }

    fn supported_instructions(&self, runtime: ScriptRuntime) -> BTreeSet<&'static str> {
        if runtime != ScriptRuntime::OtpRelease || self.nodes.is_empty() {
            return BTreeSet::new();
        }
        ["unpack_release", "install_release"].into_iter().collect()
    }

    fn apps(&self) -> Vec<AppStatus> {
        self.nodes
            .values()
            .map(|node| {
                let releases = node.cached();
                AppStatus {
                    app: node.config.app.clone(),
                    current: current_of(&releases).unwrap_or_default(),
                    permanent: permanent_of(&releases).unwrap_or_default(),
                    releases: releases
                        .into_iter()
                        .map(|r| ReleaseStatus {
                            name: r.name,
                            version: r.version,
                            status: r.status,
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Read each node's releases for the first Hello; roll back what an earlier agent process
    /// left unfinished (docs/design.md §5).
    fn boot(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            for node in self.nodes.values() {
                let mut run = node.run.lock().await;
                if let Some(state) = node.load_run() {
                    tracing::warn!(app = %node.config.app, rollout_id = %state.rollout_id, "an OTP release upgrade was interrupted by an agent restart; rolling back");
                    match node.rollback(&state, RECOVERY_DEADLINE).await {
                        Ok(out) => {
                            tracing::info!(app = %node.config.app, %out, "rolled back after restart");
                            node.clear_run();
                        }
                        Err(e) => {
                            tracing::error!(app = %node.config.app, error = %e, "rollback after restart failed");
                            *run = Some(state);
                        }
                    }
                }
                if let Err(e) = node.which_releases(SHORT_CALL).await {
                    tracing::warn!(app = %node.config.app, error = %e, "cannot read the node's releases");
                }
            }
            Ok(())
        })
    }

    fn step<'a>(
        &'a self,
        ctx: &'a StepContext<'a>,
        instruction: &'a Instruction,
    ) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            match instruction {
                Instruction::UnpackRelease { artifact, .. } => {
                    self.unpack_release(ctx, artifact).await
                }
                Instruction::InstallRelease { .. } => self.install_release(ctx).await,
                other => Err(RuntimeError::Unsupported(other.name())),
            }
        })
    }

    fn make_permanent<'a>(
        &'a self,
        ctx: &'a RolloutContext,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let node = self.node(ctx)?;
            let mut run = node.run.lock().await;
            node.make_permanent(&ctx.to).await?;
            node.clear_run();
            *run = None;
            Ok(())
        })
    }

    fn discard<'a>(&'a self, ctx: &'a RolloutContext) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let Ok(node) = self.node(ctx) else {
                return Ok(());
            };
            let mut run = node.run.lock().await;
            let ours = run
                .as_ref()
                .is_some_and(|s| s.rollout_id == ctx.rollout_id && s.unpacked);
            if ours {
                let out = node.remove(&ctx.to, SHORT_CALL).await?;
                tracing::info!(app = %node.config.app, %out, "discarded the unpacked release");
            }
            node.clear_run();
            *run = None;
            Ok(())
        })
    }

    fn default_rollback<'a>(&'a self, ctx: &'a StepContext<'a>) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            let node = self.node(ctx.rollout)?;
            let mut run = node.run.lock().await;
            let Some(state) = run
                .as_ref()
                .filter(|s| s.rollout_id == ctx.rollout.rollout_id)
                .cloned()
            else {
                return ok("nothing of this rollout to roll back");
            };
            let out = node.rollback(&state, ctx.deadline).await?;
            node.clear_run();
            *run = None;
            ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use erl_dist::term::{Atom, List, Tuple};

    fn entry(vsn: &str, status: &str) -> Term {
        Term::from(Tuple::from(vec![
            string("pm"),
            string(vsn),
            Term::from(List::from(vec![string("pm-0.1.0")])),
            Term::from(Atom::from(status)),
        ]))
    }

    #[test]
    fn which_releases_is_read() -> Result<(), String> {
        let answer = Term::from(List::from(vec![
            entry("0.2.0", "current"),
            entry("0.1.0", "permanent"),
        ]));
        let releases = parse_which_releases(&answer)?;
        assert_eq!(current_of(&releases).as_deref(), Some("0.2.0"));
        assert_eq!(permanent_of(&releases).as_deref(), Some("0.1.0"));
        let only =
            parse_which_releases(&Term::from(List::from(vec![entry("0.1.0", "permanent")])))?;
        assert_eq!(current_of(&only).as_deref(), Some("0.1.0"));
        assert!(parse_which_releases(&atom("badrpc")).is_err());
        Ok(())
    }
}
